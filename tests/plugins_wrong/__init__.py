"""Deliberately wrong backends: the equivalence check or the plugin manager must catch them."""

"""Deliberately wrong backends: the equivalence check must catch them."""

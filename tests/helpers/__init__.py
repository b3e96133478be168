"""Shared helpers for cxrbench's tests."""

"""Helpers shared by several test modules (importable as `support` from any test)."""

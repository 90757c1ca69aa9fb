"""Slow twins: see package docstring."""

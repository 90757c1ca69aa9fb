"""Slow, obviously correct NumPy/SciPy twins of every kernel, written from SPEC.md.

Nothing here imports numba or pacs_numba.kernels.
"""

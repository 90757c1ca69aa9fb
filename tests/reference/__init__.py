"""Slow, obviously correct NumPy/SciPy twins of every kernel, written from docs/algorithm.md.

Nothing here imports numba or pacs_numba.kernels.
"""

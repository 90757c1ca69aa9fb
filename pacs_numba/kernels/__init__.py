"""Every ``@njit`` function of the package, and nothing else.

Kernels import only numpy, numba, math and ``.._config``; they receive checked,
C-contiguous float32 arrays and never raise, log or print.
"""

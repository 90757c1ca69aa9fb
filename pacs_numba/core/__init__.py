"""The numerical core: arrays in, arrays out, no files.

Tiling, statistics, the solve, the blend, metrics, weight maps, scoring and the model object.
"""

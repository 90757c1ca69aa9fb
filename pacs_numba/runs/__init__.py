"""The commands as library code.

The engine and its stages, predict, tune, report, summarize, the demo, diagnose's checks and
the kernel warm-up.
"""

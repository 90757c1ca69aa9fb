"""Files and caches.

NIfTI, atomic writes, the volume and statistics caches, locks, layout, manifest, run record,
model file, weight-map files, registration and generated cohorts.
"""

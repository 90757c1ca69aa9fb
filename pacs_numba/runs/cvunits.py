"""One cross-validation unit of ``tune``: fit a setting on some patients, score it on others.

Shared by the K-fold sweep (:mod:`pacs_numba.runs.tune`) and nested cross-validation
(:mod:`pacs_numba.runs.nested`).  The held-out patients are blended under the HR-free
protocol of ``predict`` (algorithm B6): z-score statistics, brain mask and, for the
edge-gated model, the edge gate come from the experts; the HR is used only for the score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..core.blending import Normalisation, blend_patient, brain_mask, expert_mean
from ..core.cellstats import CellStats, StatsKey, effective_region
from ..core.gating import edge_gate
from ..core.metrics import volume_metrics
from ..core.scoring import experts_as_they_are
from ..core.tiling import TileGrid
from ..core.weightfit import fit_model
from ..errors import InputError
from ..store.statscache import StatsCache
from ..store.volumes import VolumeStore


def digest(obj: Any) -> str:
    """Return a short hash of a JSON-able object: the name of a unit's result file."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fixed_settings(pacs: Any, models: Sequence[str]) -> dict[str, Any]:
    """Return the settings every unit of a sweep shares (part of each unit's id)."""
    return {"simplex": pacs.simplex, "edge_power": pacs.edge_power,
            "grad_operator": pacs.grad_operator, "ssim_axis": pacs.ssim_axis,
            "models": list(models), "protocol": "hr-free-v1"}


def stats_key(c: Any, cell: int, pacs: Any, edge: bool, grad: bool,
              gate: bool = False) -> StatsKey:
    """Statistics key serving candidate ``c`` (``first_block`` at ``cell``, or its own)."""
    norm = getattr(c, "fit_normalisation", "hr")
    if statistics_group(c)[0] == "first_block":
        return StatsKey.make(region="first_block", stride=cell, patch_size=cell, window="flat",
                             edge_power=pacs.edge_power, grad_operator=pacs.grad_operator,
                             with_edge=edge, with_grad=grad, with_gate=gate,
                             normalisation=norm)
    return StatsKey.make(region=c.fit_region, stride=c.stride, patch_size=c.patch_size,
                         window=c.mixing_window, edge_power=pacs.edge_power,
                         grad_operator=pacs.grad_operator, with_edge=edge, with_grad=grad,
                         normalisation=norm)


def statistics_group(c: Any) -> tuple:
    """Candidates with equal groups share one statistics pass per patient.

    ``first_block`` candidates share cells at the gcd of their strides (coarser strides are
    sums of cells); ``window`` and ``centre`` candidates need their own (patch, stride,
    window); the z-scores of ``fit_normalisation`` split every group.  A ``centre``
    candidate without overlap or with flat windows is ``first_block`` (``StatsKey.make``).
    """
    norm = getattr(c, "fit_normalisation", "hr")
    region = effective_region(c.fit_region, c.patch_size, c.stride, c.mixing_window)
    if region == "first_block":
        return ("first_block", norm)
    return (region, c.stride, c.patch_size, c.window, norm)


class Patients:
    """Volumes, statistics and held-out preprocessing of one (spacing, pulse)."""

    def __init__(self, store: VolumeStore, cache: StatsCache, paths: Mapping[str, Mapping]):
        self.store = store
        self.cache = cache
        self.paths = paths
        self.reads = 0
        self._held: dict[str, tuple] = {}
        self._gates: dict[str, np.ndarray] = {}

    def files(self, pid: str) -> list[str]:
        """Return the HR then expert files of ``pid``."""
        return [self.paths[pid]["HR"], *self.paths[pid]["experts"]]

    def load(self, pid: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """Return the HR and experts of ``pid`` (memory-mapped from the volume cache)."""
        self.reads += 1
        hr = self.store.get(self.paths[pid]["HR"])
        return hr.data, [self.store.get(p).data for p in self.paths[pid]["experts"]]

    def stats(self, pid: str, key: StatsKey, pacs: Any) -> CellStats:
        """Return the cached decomposed statistics of ``pid`` at ``key``."""
        return self.cache.get(self.files(pid), key, lambda: self.load(pid),
                              edge_power=pacs.edge_power, grad_operator=pacs.grad_operator)

    def held_out(self, pid: str, ssim_axis: str) -> tuple:
        """Return HR, experts, expert normalisation and brain mask, single-expert scores.

        The normalisation, mask and scores are computed once and kept until
        :meth:`release`; the volumes are mapped again at each call (a few ms from a warm
        cache) rather than kept, so a sweep does not hold every held-out patient's
        volumes in memory at once.
        """
        if pid in self._held:
            hr, experts = self.load(pid)
            return (hr, experts, *self._held[pid])
        hr, experts = self.load(pid)
        proxy = expert_mean(experts)
        norm = Normalisation.from_experts(experts, proxy)
        mask = brain_mask(proxy)
        del proxy
        # each expert as a user gets it, the HR-free protocol's rule (one home: scoring)
        single = list(experts_as_they_are(hr, experts, [str(e) for e in range(len(experts))],
                                          ssim_axis=ssim_axis, mask=mask).values())
        # Each expert through the blend's own HR-free path (one-hot weights: z-scored,
        # mapped back with the experts' mean statistics, masked), so a gain over it is
        # the weights' alone.  A constant weight makes the overlap-add the identity (up
        # to the blend's 1e-8 guard), so the volume is computed directly.
        path = []
        for e, x in enumerate(experts):
            z = (np.where(np.isfinite(x), x, 0).astype(np.float64) - norm.mus[e]) / norm.sds[e]
            vol = ((z * norm.sd_out + norm.mu_out) * mask).astype(np.float32)
            path.append(volume_metrics(hr, vol, ssim_axis=ssim_axis))
            del z, vol
        self._held[pid] = (norm, mask, (single, path))
        return (hr, experts, *self._held[pid])

    def release(self, pids: Iterable[str]) -> None:
        """Forget the held-out data and gates of ``pids`` (their fold is done)."""
        for pid in pids:
            self._held.pop(pid, None)
            self._gates.pop(pid, None)

    def gate(self, pid: str) -> np.ndarray:
        """Return the edge gate of the experts of ``pid`` (algorithm A5.2), computed once."""
        if pid not in self._gates:
            self._gates[pid] = edge_gate(self.load(pid)[1])
        return self._gates[pid]


def fit_and_score(
    c: Any, st: CellStats, pats: Patients, test: Mapping[str, Mapping], pacs: Any,
    models: Sequence[str], timings: dict[str, float],
) -> dict[str, Any]:
    """Fit candidate ``c`` on summed statistics ``st`` and score it on the ``test`` patients.

    Returns
    -------
    dict
        ``patients``: per held-out patient its ``psnr``, ``ssim``, each expert's raw volume
        times the brain mask (``experts``) and each expert through the blend's HR-free path
        (``experts_path``); ``learned_tiles``; ``fit_s``.
    """
    t0 = time.perf_counter()
    grid = TileGrid(st.shape, c.patch_size, c.stride)
    weights, learned = fit_model(
        st, simplex=pacs.simplex, lambda_ridge=c.lambda_ridge, lambda_edge=c.lambda_edge,
        lambda_grad=c.lambda_grad, laplacian_tau=c.laplacian_tau,
        prior=getattr(c, "prior", "none"), prior_strength=getattr(c, "prior_strength", 1.0),
        gating=getattr(c, "gating", "none"),
    )
    t1 = time.perf_counter()
    timings["fit"] += t1 - t0
    per: dict[str, Any] = {}
    for pid in test:
        hr, experts, norm, mask, (single, path) = pats.held_out(pid, pacs.ssim_axis)
        if hr.shape != grid.shape:
            raise InputError(f"patient {pid}: HR shape {hr.shape}; the training grid is "
                             f"{grid.shape}")
        gate = pats.gate(pid) if weights.shape[1] != len(experts) else None
        mapping = getattr(c, "hr_free_mapping", "mean")  # algorithm B6
        blend = blend_patient(experts, grid, weights, window=c.mixing_window,
                              norm=dataclasses.replace(norm, mapping=mapping),
                              brain_mask=mask, gate=gate)
        m = volume_metrics(hr, blend, ssim_axis=pacs.ssim_axis)
        per[pid] = {
            "psnr": float(m["psnr"]), "ssim": float(m["ssim"]),
            "experts": {name: {"psnr": float(e["psnr"]), "ssim": float(e["ssim"])}
                        for name, e in zip(models, single, strict=True)},
            "experts_path": {name: {"psnr": float(e["psnr"]), "ssim": float(e["ssim"])}
                             for name, e in zip(models, path, strict=True)},
        }
    timings["blend_metrics"] += time.perf_counter() - t1
    return {"patients": per, "learned_tiles": int(learned.sum()), "fit_s": t1 - t0}

"""Start-up compile (issue 18): only what a run uses, announced, under a node lock."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from pacs_numba import _config
from pacs_numba.runs import warmup


def _pacs(**kw):
    base = dict(simplex=True, laplacian_tau=0.0, ssim_axis="axial", save_weight_volumes=False)
    return SimpleNamespace(**{**base, **kw})


def test_a_train_compiles_only_its_steps():
    got = warmup.steps_for("train", _pacs())
    assert got == ("normalisation", "statistics", "solve", "brain_mask", "score")
    full = warmup.steps_for("train", _pacs(simplex=False, laplacian_tau=0.1,
                                           save_weight_volumes=True, ssim_axis="sagittal"))
    assert set(full) == {"normalisation", "statistics", "solve_unconstrained", "smoothing",
                         "brain_mask", "blend", "metrics", "weight_maps", "weight_analysis"}
    assert "statistics" not in warmup.steps_for("evaluate", _pacs())
    assert warmup.steps_for("all") == warmup.STEPS
    assert set(warmup.TYPICAL_COMPILE_S) == set(warmup.STEPS)


def test_unknown_step_is_an_error():
    with pytest.raises(ValueError, match=r"unknown warm-up steps \['nope'\]"):
        warmup.warm_kernels(("nope",))


@pytest.mark.skipif(not _config.CACHE, reason="compile cache off")
def test_first_run_is_announced_and_compiles_under_the_node_lock(monkeypatch, caplog):
    seen = {}

    def fake_warm(steps, on_step=None):
        seen["steps"] = steps
        seen["lock"] = (_config.KERNEL_CACHE_DIR / ".compile.lock").exists()
        return {}

    monkeypatch.setattr(warmup, "kernel_index_files", lambda: (0, 10))
    monkeypatch.setattr(warmup, "warm_kernels", fake_warm)
    with caplog.at_level(logging.INFO, logger="pacs_numba.runs.warmup"):
        warmup.load_kernels("evaluate", _pacs())
    assert seen["steps"] == ("normalisation", "brain_mask", "score") and seen["lock"]
    line = next(r.getMessage() for r in caplog.records if "compiling 3 kernel groups" in
                r.getMessage())
    usual = sum(warmup.TYPICAL_COMPILE_S[k] for k in seen["steps"])
    assert f"for evaluate (first run only; usually ~{usual:.0f} s on 2 cores" in line


def test_compiled_where_names_numbas_real_folder():
    where = warmup.compiled_where()
    if _config.CACHE:
        assert where.startswith(str(_config.KERNEL_CACHE_DIR))
    else:
        assert where.startswith("nowhere")

"""The chunk runner of the two largest kernels (``resources.threads.run_chunks``)."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pacs_numba.core import cellstats, scoring
from pacs_numba.core.cellstats import StatsKey, box_statistics
from pacs_numba.core.model import StackingModel
from pacs_numba.core.scoring import score_patient
from pacs_numba.core.tiling import TileGrid
from pacs_numba.resources.threads import run_chunks


def test_every_chunk_runs_once_and_chunk_zero_on_the_caller():
    seen: dict[int, str] = {}
    lock = threading.Lock()

    def chunk(c: int) -> None:
        with lock:
            assert c not in seen
            seen[c] = threading.current_thread().name

    run_chunks(chunk, 5)
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert seen[0] == threading.current_thread().name
    seen.clear()
    run_chunks(chunk, 1)
    assert seen == {0: threading.current_thread().name}
    run_chunks(chunk, 0)  # nothing to do
    assert len(seen) == 1


def test_an_error_is_raised_after_every_chunk_finished():
    done = []
    gate = threading.Event()

    def chunk(c: int) -> None:
        if c == 1:
            raise ValueError("chunk 1 failed")
        if c == 2:
            gate.wait(5)  # still running when chunk 1 has failed
        done.append(c)

    with pytest.raises(ValueError, match="chunk 1 failed"):
        threading.Timer(0.2, gate.set).start()
        run_chunks(chunk, 3)
    assert sorted(done) == [0, 2]


def _in_child(q) -> None:
    out = []
    run_chunks(out.append, 3)
    q.put(sorted(out))


def test_a_forked_child_gets_threads_of_its_own():
    run_chunks(lambda c: None, 2)  # the parent's pool exists (its threads do not cross a fork)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_in_child, args=(q,))
    p.start()
    try:
        assert q.get(timeout=60) == [0, 1, 2]
    finally:
        p.join(60)
    assert p.exitcode == 0


def _patient(rng, shape, m):
    hr = (rng.random(shape, dtype=np.float32) * 100 + 1).astype(np.float32)
    hr[0, 0, :3] = 0.0
    experts = [(hr + rng.normal(0, 5, shape)).astype(np.float32) for _ in range(m)]
    experts[1][2, 3, 4] = np.nan
    return hr, experts


@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_the_chunked_kernels_do_not_depend_on_the_chunk_count(monkeypatch, chunks):
    rng = np.random.default_rng(5)
    shape = (23, 17, 19)  # odd sizes: uneven chunks, a part-filled last tile
    hr, experts = _patient(rng, shape, 3)
    key = StatsKey.make(region="first_block", stride=5, patch_size=8, window="hann",
                        edge_power=1.5, grad_operator="sobel", with_edge=True, with_grad=True)
    grid = TileGrid(shape, 8, 5)
    w = rng.dirichlet(np.ones(3), grid.n_tiles).astype(np.float32)
    model = StackingModel(w, np.ones(grid.n_tiles, bool), grid, ("a", "b", "c"), {})

    def run(n):
        monkeypatch.setattr(cellstats.numba, "get_num_threads", lambda: n)
        monkeypatch.setattr(scoring.numba, "get_num_threads", lambda: n)
        st = box_statistics(hr, experts, key)
        sc = score_patient(hr, experts, model, window="hann", ssim_axis="axial",
                           brain_mask=hr > 20, experts_alone=True, hr_free=True)
        return st, sc

    one_st, one_sc = run(1)
    st, sc = run(chunks)
    monkeypatch.undo()
    for name in ("parts", "counts"):
        assert_array_equal(getattr(st, name), getattr(one_st, name), err_msg=name)
    assert_array_equal(sc.blend, one_sc.blend)
    assert sc.metrics == one_sc.metrics
    assert sc.extras == one_sc.extras
    assert set(sc.extras) == {"experts", "hr_free"}

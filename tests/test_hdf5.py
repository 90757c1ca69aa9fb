"""HDF5 cohorts and fold results (store/hdf5.py, store/results_h5.py, docs/hdf5.md)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from pacs_numba.errors import InputError, OutputError  # noqa: E402
from pacs_numba.store.hdf5 import (  # noqa: E402
    H5Source,
    h5_identity,
    parse_source,
    read_h5_volume,
    write_h5_volume,
)
from pacs_numba.store.results_h5 import ResultsH5  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AFF = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])


def _vol(seed: int, shape=(9, 10, 11)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _esc(p: Path) -> str:
    return re.escape(str(p))


# --------------------------------------------------------------------------------------
# Sources and reading
# --------------------------------------------------------------------------------------


def test_round_trip_and_string_form(tmp_path):
    f = tmp_path / "source_data.h5"
    a, b = _vol(1), _vol(2, (4, 5, 6))
    src = write_h5_volume(f, "high_resolution/P001/t1c", a, AFF)
    write_h5_volume(f, "/low_resolution/3mm/P001/t1c", b, AFF.ravel())  # appends
    assert str(src) == f"{f}::high_resolution/P001/t1c"
    data, aff = read_h5_volume(str(src))
    assert data.dtype == np.float32 and data.flags.c_contiguous and data.flags.writeable
    np.testing.assert_array_equal(data, a)
    assert aff.dtype == np.float64 and aff.shape == (4, 4)
    np.testing.assert_array_equal(aff, AFF)
    data, _ = read_h5_volume(H5Source(f, "low_resolution/3mm/P001/t1c"))
    np.testing.assert_array_equal(data, b)
    with h5py.File(f, "r") as h:  # the published layout, as plain h5py sees it
        d = h["high_resolution/P001/t1c"]
        assert d.dtype == np.float32 and d.compression == "gzip" and d.compression_opts == 4
        assert d.attrs["affine"].shape == (16,) and d.attrs["affine"].dtype == np.float64


def test_parse_source_rules(tmp_path):
    assert parse_source("/data/x.nii.gz") is None
    assert parse_source("/data/x.h5::") is None
    assert parse_source("::a/b") is None
    s = parse_source("/data/we::ird/x.h5::/a/b")
    assert s == H5Source(Path("/data/we::ird/x.h5"), "a/b")
    plain = tmp_path / "odd::name.nii.gz"
    plain.write_bytes(b"x")
    assert parse_source(plain) is None  # an existing path wins
    with pytest.raises(InputError, match=r"x\.h5.*not usable"):
        parse_source("/data/x.h5::a//b")
    with pytest.raises(InputError, match="does not name an HDF5 dataset"):
        read_h5_volume(tmp_path / "v.nii.gz")


def test_squeeze_and_float_conversions(tmp_path):
    f = tmp_path / "c.h5"
    a = _vol(3)
    with h5py.File(f, "w") as h:
        h.create_dataset("four", data=a[..., None]).attrs["affine"] = AFF
        h.create_dataset("f64", data=a.astype(np.float64)).attrs["affine"] = AFF.ravel()
        h.create_dataset("f16", data=a.astype(np.float16)).attrs["affine"] = AFF.astype(int)
        h.create_dataset("be", data=a.astype(">f4")).attrs["affine"] = AFF
    np.testing.assert_array_equal(read_h5_volume(f"{f}::four")[0], a)
    np.testing.assert_array_equal(read_h5_volume(f"{f}::f64")[0], a)
    np.testing.assert_array_equal(read_h5_volume(f"{f}::f16")[0], a.astype(np.float16))
    d, _ = read_h5_volume(f"{f}::be")
    assert d.dtype == np.float32 and d.dtype.isnative
    np.testing.assert_array_equal(d, a)


@pytest.fixture
def cohort(tmp_path):
    f = tmp_path / "cohort.h5"
    with h5py.File(f, "w") as h:
        for i in range(1, 11):
            h.create_dataset(f"high_resolution/P{i:03d}/t1c", data=_vol(i)).attrs["affine"] = AFF
        h.create_dataset("flat", data=np.zeros((5, 6))).attrs["affine"] = AFF
        h.create_dataset("four", data=np.zeros((2, 3, 4, 2))).attrs["affine"] = AFF
        h.create_dataset("ints", data=np.zeros((2, 3, 4), np.int16)).attrs["affine"] = AFF
        h.create_dataset("bools", data=np.zeros((2, 3, 4), bool)).attrs["affine"] = AFF
        h.create_dataset("empty", data=np.zeros((0, 3, 4))).attrs["affine"] = AFF
        h.create_dataset("noaff", data=np.zeros((2, 3, 4)))
        h.create_dataset("aff9", data=np.zeros((2, 3, 4))).attrs["affine"] = np.eye(3)
        nan = AFF.copy()
        nan[0, 0] = np.nan
        h.create_dataset("affnan", data=np.zeros((2, 3, 4))).attrs["affine"] = nan
        row = AFF.copy()
        row[3, 0] = 2
        h.create_dataset("affrow", data=np.zeros((2, 3, 4))).attrs["affine"] = row
        h.create_dataset("affstr", data=np.zeros((2, 3, 4))).attrs["affine"] = "eye"
        h["dangling"] = h5py.SoftLink("/nowhere")
        h["ext"] = h5py.ExternalLink("missing_part.h5", "/x")
    return f


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        ("high_resolution/P011/t1c", r"no dataset 'high_resolution/P011/t1c'.*group "
         r"'/high_resolution' has no member 'P011'.*nearest existing: 'P010', 'P001'.*\(of 10\)"),
        ("high_resolution/P001/t2w", r"has no member 't2w'.*nearest existing: 't1c'"),
        ("low_resolution/3mm/P001/t1c", r"group '/' has no member 'low_resolution'"),
        ("high_resolution/P001", r"'high_resolution/P001' is a group, not a dataset.*'t1c'"),
        ("flat/x", r"'/flat' is a dataset, not a group"),
        ("flat", r"dataset 'flat' has shape \(5, 6\) \(2-D\); expected a 3-D volume"),
        ("four", r"dataset 'four' has shape \(2, 3, 4, 2\) \(4-D\)"),
        ("empty", r"dataset 'empty' has shape \(0, 3, 4\) with an empty axis"),
        ("ints", r"dataset 'ints' has type int16; expected floating point.*Integer data"),
        ("bools", r"dataset 'bools' has type bool"),
        ("noaff", r"dataset 'noaff' has no 'affine' attribute; expected 16 float64"),
        ("aff9", r"dataset 'aff9': its 'affine' attribute has shape \(3, 3\).*expected 16"),
        ("affnan", r"dataset 'affnan': its 'affine' attribute holds NaN or infinite"),
        ("affrow", r"dataset 'affrow': its 'affine' attribute's last row"),
        ("affstr", r"dataset 'affstr': its 'affine' attribute has shape \(\)"),
        ("dangling", r"'dangling' \(of dataset 'dangling'\) is a dangling soft link"),
        ("ext", r"'ext'.*external link to '/x' in 'missing_part.h5'.*cannot be followed"),
    ],
)
def test_read_errors_name_file_and_key(cohort, key, pattern):
    with pytest.raises(InputError, match=_esc(cohort) + r".*" + pattern):
        read_h5_volume(H5Source(cohort, key))


def test_file_errors_name_file_and_key(tmp_path, monkeypatch):
    key = "high_resolution/P001/t1c"
    missing = tmp_path / "nope.h5"
    with pytest.raises(InputError, match=_esc(missing) + rf".*'{key}'.*does not exist"):
        read_h5_volume(H5Source(missing, key))
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=_esc(empty) + rf".*'{key}'.*is empty \(0 bytes\)"):
        read_h5_volume(H5Source(empty, key))
    text = tmp_path / "text.h5"
    text.write_text("not hdf5 at all\n" * 100)
    with pytest.raises(InputError, match=_esc(text) + rf".*'{key}'.*not an HDF5 file or is dam"):
        read_h5_volume(H5Source(text, key))
    with pytest.raises(InputError, match=_esc(tmp_path) + rf"' is a directory.*'{key}'"):
        read_h5_volume(H5Source(tmp_path, key))
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=_esc(fifo) + rf"' is a FIFO.*'{key}'"):
        read_h5_volume(H5Source(fifo, key))

    good = tmp_path / "good.h5"
    write_h5_volume(good, key, _vol(1, (64, 64, 64)), AFF)
    raw = good.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=_esc(cut) + r".*(not an HDF5 file or is dam|damaged)"):
        read_h5_volume(H5Source(cut, key))
    # a damaged chunk: garbage in the middle of the first chunk's compressed bytes
    with h5py.File(good, "r") as h:
        info = h[key].id.get_chunk_info(0)
    bad = tmp_path / "bad.h5"
    mid = info.byte_offset + info.size // 2
    bad.write_bytes(raw[:mid] + b"\xff" * 64 + raw[mid + 64:])
    with pytest.raises(InputError, match=_esc(bad) + rf"', dataset '{key}' cannot be read, it is "
                       "damaged"):
        read_h5_volume(H5Source(bad, key))

    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(InputError, match=r"needs h5py: pip install 'pacs-numba\[hdf5\]'"):
        read_h5_volume(H5Source(good, key))


def test_reads_ignore_hdf5_file_locks(tmp_path):
    """A writer's exclusive lock (or a file system without locks) does not stop reads."""
    fcntl = pytest.importorskip("fcntl")
    src = write_h5_volume(tmp_path / "s.h5", "high_resolution/P1/t1c", _vol(1), AFF)
    res = ResultsH5(tmp_path / "exp", 0)
    res.write_blend("3mm", "t1c", "P1", _vol(2), AFF)
    fds = [os.open(p, os.O_RDWR) for p in (src.file, res.part_path("3mm", "t1c", "P1"))]
    try:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_EX)  # what HDF5 takes for a writer
        with pytest.raises(OSError, match="unable to lock file"):
            h5py.File(src.file, "r")  # h5py's default: locked out
        np.testing.assert_array_equal(read_h5_volume(src)[0], _vol(1))
        # through the index's external link: the target inherits locking=False
        via = H5Source(res.index, "3mm/blends/P1/t1c")
        np.testing.assert_array_equal(read_h5_volume(via)[0], _vol(2))
        assert h5_identity(via)["target"]["source"].endswith("P1.h5")
    finally:
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------


def _same_size_rewrite(f: Path, key: str, new: np.ndarray) -> None:
    st = os.stat(f)
    with h5py.File(f, "r+") as h:
        h[key][...] = new
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide the write from mtime
    assert os.stat(f).st_size == st.st_size


@pytest.mark.parametrize("layout", ["contiguous", "chunked-gzip"])
def test_identity_detects_same_size_rewrite_in_place(tmp_path, layout):
    f = tmp_path / "c.h5"
    key = "high_resolution/P001/t1c"
    noise = np.random.default_rng(5).integers(0, 2**32, (40, 41, 42), np.uint32).view(np.float32)
    with h5py.File(f, "w") as h:
        # gzip level 0 stores deflate blocks: a chunk's stored size depends only on its length,
        # so the rewritten chunks keep their size and address and only their bytes change
        kw = {} if layout == "contiguous" else {"compression": "gzip", "compression_opts": 0,
                                                "chunks": (10, 41, 42)}
        h.create_dataset(key, data=noise, **kw).attrs["affine"] = AFF
        h.create_dataset("other", data=_vol(9)).attrs["affine"] = AFF
    src = H5Source(f, key)
    first = h5_identity(src)
    assert first == h5_identity(str(src))  # re-opening changes nothing
    assert first["layout"] == layout.split("-")[0] and first["key"] == key
    other = h5_identity(H5Source(f, "other"))
    assert other["data_sample"] != first["data_sample"]

    new = noise.copy()
    new[:4] = np.random.default_rng(6).integers(0, 2**32, new[:4].shape, np.uint32).view(
        np.float32)
    _same_size_rewrite(f, key, new)
    second = h5_identity(src)
    assert second != first
    assert second["data_sample"] != first["data_sample"]  # the dataset's own check sees it
    assert (second["size"], second["mtime_ns"]) == (first["size"], first["mtime_ns"])
    np.testing.assert_array_equal(read_h5_volume(src)[0], new)
    if layout == "contiguous":
        return
    # the documented blind spot: a same-size change in an unsampled chunk (rows 10-19 of
    # 4 chunks; the first, middle and last are sampled) leaves the dataset fields as they
    # were; only the file's ctime (and, by chance, its whole-file sample) tells
    newer = new.copy()
    newer[12] = 0.5
    _same_size_rewrite(f, key, newer)
    third = h5_identity(src)
    assert third["data_sample"] == second["data_sample"]
    assert third["chunk_index"] == second["chunk_index"]
    assert third["ctime_ns"] != second["ctime_ns"] or third["sample"] != second["sample"]


def test_identity_through_external_link_covers_the_target_file(tmp_path):
    res = ResultsH5(tmp_path / "exp", 1)
    res.write_blend("3mm", "t1c", "P001", _vol(1), AFF)
    src = H5Source(res.index, "3mm/blends/P001/t1c")
    first = h5_identity(src)
    assert first["target"]["source"] == os.path.realpath(res.part_path("3mm", "t1c", "P001"))
    res.write_blend("3mm", "t1c", "P001", _vol(2), AFF)  # index bytes unchanged, part replaced
    assert h5_identity(src)["target"] != first["target"]


# --------------------------------------------------------------------------------------
# Fold results
# --------------------------------------------------------------------------------------


def test_results_write_read_keys_and_plain_h5py(tmp_path, monkeypatch):
    exp = tmp_path / "out" / "exp"
    res = ResultsH5(exp, 0)
    assert res.keys() == []
    blends = {(s, p, pid): _vol(hash((s, p, pid)) % 1000)
              for s in ("2mm", "3mm") for p in ("t1c", "flair") for pid in ("P1", "P2")}
    for (s, p, pid), v in blends.items():
        res.write_blend(s, p, pid, v, AFF)
    assert res.keys() == sorted(f"{s}/blends/{pid}/{p}" for s, p, pid in blends)
    for (s, p, pid), v in blends.items():
        data, aff = res.read_blend(s, p, pid)
        np.testing.assert_array_equal(data, v)
        np.testing.assert_array_equal(aff, AFF)
    assert sorted(os.listdir(exp)) == ["results_fold_0.h5", "results_fold_0.h5.lock",
                                       "results_fold_0.parts"]

    def plain_read(index: Path) -> None:
        with h5py.File(index, "r") as f:  # default locking, as a user would open it
            for (s, p, pid), v in blends.items():
                d = f[f"{s}/blends/{pid}/{p}"]
                np.testing.assert_array_equal(d[...], v)
                np.testing.assert_array_equal(d.attrs["affine"].reshape(4, 4), AFF)
                assert d.dtype == np.float32 and d.compression_opts == 4

    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # links resolve against the index's folder, not the cwd
    plain_read(exp / "results_fold_0.h5")
    plain_read(Path(os.path.relpath(exp / "results_fold_0.h5")))
    moved = tmp_path / "moved" / "exp2"
    moved.parent.mkdir()
    shutil.move(exp, moved)
    plain_read(moved / "results_fold_0.h5")
    np.testing.assert_array_equal(
        read_h5_volume(f"{moved / 'results_fold_0.h5'}::3mm/blends/P2/flair")[0],
        blends[("3mm", "flair", "P2")])
    # a reader in another process and another cwd
    code = ("import h5py,sys; f=h5py.File(sys.argv[1]); "
            "print(f['2mm/blends/P1/t1c'][...].sum(), f['2mm/blends/P1/t1c'].attrs['affine'][3])")
    out = subprocess.run([sys.executable, "-c", code, "exp2/results_fold_0.h5"],
                         cwd=moved.parent, capture_output=True, text=True, check=True).stdout
    total, a3 = out.split()
    assert np.isclose(float(total), blends[("2mm", "t1c", "P1")].sum(dtype=np.float64), rtol=1e-5)
    assert float(a3) == AFF[0, 3]


def test_results_refuse_bad_names_and_a_foreign_index(tmp_path):
    res = ResultsH5(tmp_path, 2)
    for bad in ("", "..", "a/b", ".hidden", "-x", "a::b"):
        with pytest.raises(OutputError, match="cannot be used in an HDF5 key"):
            res.write_blend("3mm", "t1c", bad, _vol(1), AFF)
    with pytest.raises(OutputError, match="expected a 3-D numeric volume"):
        res.write_blend("3mm", "t1c", "P1", np.zeros((2, 2)), AFF)
    with pytest.raises(OutputError, match="finite 4x4 affine"):
        res.write_blend("3mm", "t1c", "P1", np.zeros((2, 2, 2)), np.eye(3))
    with pytest.raises(OutputError, match="non-negative integer"):
        ResultsH5(tmp_path, -1)
    # results_fold_3.h5 written by the published tool: real datasets, never overwritten
    foreign = ResultsH5(tmp_path, 3)
    write_h5_volume(foreign.index, "3mm/blends/P1/t1c", _vol(1), AFF)
    with pytest.raises(OutputError, match="not written by pacs_numba"):
        foreign.write_blend("3mm", "t1c", "P2", _vol(2), AFF)
    np.testing.assert_array_equal(read_h5_volume(f"{foreign.index}::3mm/blends/P1/t1c")[0],
                                  _vol(1))


_WRITER = r"""
import os, sys, time
import numpy as np
from pacs_numba.store.results_h5 import ResultsH5
root, spacing, pulse, n, side, seed, go = sys.argv[1:8]
res = ResultsH5(root, 0)
while go != "-" and not os.path.exists(go):  # start together
    time.sleep(0.002)
for i in range(int(n)):
    data = np.random.default_rng(int(seed) + i).random((int(side),) * 3, dtype=np.float32)
    print("writing", i, flush=True)
    res.write_blend(spacing, pulse, f"P{i:03d}", data, AFF)
print("done", flush=True)
"""
WAFF = np.array([[2.0, 0, 0, 1], [0, 2, 0, 2], [0, 0, 2, 3], [0, 0, 0, 1]])


def _spawn(cwd: Path, root: Path, spacing: str, pulse: str, n: int, side: int, seed: int,
           go: Path | None) -> subprocess.Popen:
    code = f"AFF = __import__('numpy').array({WAFF.tolist()})\n" + _WRITER
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", code, str(root), spacing, pulse, str(n), str(side), str(seed),
         str(go) if go else "-"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _expected(seed: int, i: int, side: int) -> np.ndarray:
    return np.random.default_rng(seed + i).random((side,) * 3, dtype=np.float32)


def _check_all(res: ResultsH5, jobs: list[tuple[str, str, int, int, int]]) -> None:
    with h5py.File(res.index, "r") as f:
        for spacing, pulse, n, side, seed in jobs:
            for i in range(n):
                d = f[f"{spacing}/blends/P{i:03d}/{pulse}"]
                np.testing.assert_array_equal(d[...], _expected(seed, i, side))
                np.testing.assert_array_equal(d.attrs["affine"], WAFF.ravel())


def test_concurrent_writers_share_one_fold_file(tmp_path):
    root = tmp_path / "exp"
    go = tmp_path / "go"
    jobs = [("2mm", "t1c", 10, 12, 100), ("2mm", "flair", 10, 12, 200),
            ("3mm", "t1c", 10, 12, 300), ("4mm", "t2w", 10, 12, 400)]
    procs = [_spawn(tmp_path, root, s, p, n, side, seed, go) for s, p, n, side, seed in jobs]
    time.sleep(0.3)
    go.touch()
    for pr in procs:
        out, err = pr.communicate(timeout=60)
        assert pr.returncode == 0, err
        assert out.endswith("done\n")
    res = ResultsH5(root, 0)
    keys = res.keys()
    assert len(keys) == 40
    assert keys == sorted(f"{s}/blends/P{i:03d}/{p}" for s, p, n, _, _ in jobs for i in range(n))
    _check_all(res, jobs)
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_sigkill_mid_write_damages_nothing(tmp_path):
    root = tmp_path / "exp"
    res = ResultsH5(root, 0)
    for i in range(3):  # earlier writes
        res.write_blend("3mm", "t1c", f"P{i:03d}", _expected(500, i, 10), WAFF)
    # the victim writes large incompressible blends (about 0.25 s each) until it is killed;
    # one other writer runs alongside, another starts after the kill
    victim = _spawn(tmp_path, root, "2mm", "flair", 1000, 128, 600, None)
    during = _spawn(tmp_path, root, "4mm", "t2w", 30, 10, 700, None)
    go = tmp_path / "go"
    after = _spawn(tmp_path, root, "4mm", "t1c", 5, 10, 800, go)
    assert victim.stdout is not None
    assert victim.stdout.readline() == "writing 0\n"
    assert victim.stdout.readline() == "writing 1\n"  # blend 0 complete, now inside blend 1
    time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not res.part_path("2mm", "flair", "P001").exists()  # killed before the rename
    go.touch()
    for pr in (during, after):
        _, err = pr.communicate(timeout=60)
        assert pr.returncode == 0, err

    _check_all(res, [("3mm", "t1c", 3, 10, 500), ("4mm", "t2w", 30, 10, 700),
                     ("4mm", "t1c", 5, 10, 800)])
    with h5py.File(res.index, "r") as f:  # what the victim finished reads back whole
        np.testing.assert_array_equal(f["2mm/blends/P000/flair"][...], _expected(600, 0, 128))
    keys = res.keys()
    assert len(keys) == 3 + 30 + 5 + 1
    assert not [k for k in keys if ".tmp-" in k or "/." in k]
    assert res.rebuild_index() == len(keys)
    assert res.keys() == keys
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]  # dead writer's temp swept

"""NIfTI reading and writing, the volume cache, and the atomic writers (algorithm B1, A8)."""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from isal import igzip

import pacs_numba.store.volumes as pio
from pacs_numba.errors import InputError, PacsError
from pacs_numba.store.atomic import (
    atomic_savez,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from pacs_numba.store.nifti import read_nifti, write_nifti
from pacs_numba.store.volumes import VolumeStore, file_fingerprint

SHAPE = (7, 6, 5)  # odd, unequal sizes catch any axis or order mix-up
AFFINE = np.array(
    [[0.9, 0.1, 0.0, -40.0], [0.0, 1.1, 0.0, -50.0], [0.0, 0.05, 1.3, -30.0], [0, 0, 0, 1.0]]
)


def _vol(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 30.0, shape).astype(np.float32)


def _save(path: Path, data: np.ndarray, *, dtype=None, slope=None, inter=None, nifti2=False,
          endian=None) -> Path:
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    hdr = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)(endianness=endian)
    img = cls(data, AFFINE, hdr)
    img.set_data_dtype(dtype or data.dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


@pytest.fixture
def vol_gz(tmp_path: Path) -> Path:
    return _save(tmp_path / "vol.nii.gz", _vol())


# ---------------------------------------------------------------------------- read_nifti


@pytest.mark.parametrize(
    "name, make",
    [
        ("f32.nii.gz", lambda p: _save(p, _vol())),
        ("f32.nii", lambda p: _save(p, _vol())),
        ("i16_scaled.nii.gz", lambda p: _save(p, np.round(_vol()).astype(np.int16),
                                              slope=0.37, inter=-12.5)),
        ("u8_scaled.nii", lambda p: _save(p, np.round(_vol() / 2).astype(np.uint8),
                                          slope=2.0, inter=3.0)),
        ("f64.nii.gz", lambda p: _save(p, _vol().astype(np.float64) / 3)),
        ("i16.nii.gz", lambda p: _save(p, np.round(_vol()).astype(np.int16))),
        ("u16_bigendian.nii", lambda p: _save(p, np.round(_vol() * 300).astype(np.uint16),
                                              endian=">")),
        ("i64.nii.gz", lambda p: _save(p, (_vol().astype(np.int64) << 40) + 12345)),
        ("i32_slope1.nii", lambda p: _save(p, (_vol().astype(np.int32) << 20) + 1,
                                           slope=1.0, inter=0.0)),
        ("f32_scaled.nii.gz", lambda p: _save(p, _vol(), slope=1.5, inter=0.25)),
        ("bigendian.nii.gz", lambda p: _save(p, _vol(), endian=">")),
        ("four_d_1.nii.gz", lambda p: _save(p, _vol()[..., None])),
        ("nifti2.nii.gz", lambda p: _save(p, _vol(), nifti2=True)),
        ("with_nan.nii.gz", lambda p: _save(p, np.where(_vol() > 130, np.nan, _vol()))),
    ],
)
def test_read_nifti_equals_nibabel_in_c_order(tmp_path, name, make):
    path = make(tmp_path / name)
    data, meta = read_nifti(path)
    img = nib.load(str(path))
    ref = img.get_fdata(dtype=np.float32).reshape(SHAPE)
    assert data.dtype == np.float32 and data.flags.c_contiguous and data.shape == SHAPE
    np.testing.assert_array_equal(data, ref)  # exact, NaN in the same places
    assert meta.shape == SHAPE
    np.testing.assert_array_equal(meta.affine, img.affine)
    assert meta.affine.dtype == np.float64 and not meta.affine.flags.writeable
    assert meta.zooms == tuple(float(z) for z in img.header.get_zooms()[:3])
    hdr = meta.header
    assert type(hdr) is type(img.header)
    assert hdr.get_data_dtype() == img.get_data_dtype()
    assert meta.header is not hdr  # a fresh, private object on each access


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p, r"does not exist; expected a NIfTI volume"),
        (lambda p: (p.write_bytes(b""), p)[1], r"is empty \(0 bytes\)"),
        (lambda p: (p.write_bytes(os.urandom(3000)), p)[1],
         r"not gzip-compressed although its name ends in \.gz"),
        (lambda p: (p.write_bytes(gzip.compress(os.urandom(3000))), p)[1],
         r"gzip-compressed but not NIfTI inside \(sizeof_hdr is -?\d+, expected 348"),
        (lambda p: (p.write_bytes(gzip.compress(b"hello")), p)[1],
         r"gzip-compressed but not NIfTI inside \(only 5 bytes"),
        (lambda p: (p.mkdir(), p)[1], r"is a directory"),
    ],
    ids=["missing", "zero-byte", "random-bytes", "gzip-of-junk", "gzip-too-short", "directory"],
)
def test_read_nifti_bad_files(tmp_path, make, match):
    path = make(tmp_path / "bad.nii.gz")
    with pytest.raises(InputError, match=match) as info:
        read_nifti(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_nifti_truncated_gzip(vol_gz):
    raw = vol_gz.read_bytes()
    vol_gz.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"vol\.nii\.gz' is truncated: its gzip stream ends early"):
        read_nifti(vol_gz)


def test_read_nifti_damaged_gzip(vol_gz):
    raw = bytearray(vol_gz.read_bytes())
    raw[-8:-4] = bytes(4)  # the CRC32 of the gzip trailer
    vol_gz.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"is a damaged gzip file .*checksum"):
        read_nifti(vol_gz)


def test_read_nifti_truncated_plain(tmp_path):
    path = _save(tmp_path / "v.nii", _vol())
    path.write_bytes(path.read_bytes()[:-40])
    msg = r"v\.nii' is truncated: 800 data bytes follow the header, 840 expected"
    with pytest.raises(InputError, match=msg):
        read_nifti(path)


def test_read_nifti_rejects_non_3d(tmp_path):
    p4 = _save(tmp_path / "two.nii.gz", np.stack([_vol(), _vol()], axis=-1))
    msg = r"two\.nii\.gz' is 4-D with 2 volumes \(shape \(7, 6, 5, 2\)\); expected one 3-D"
    with pytest.raises(InputError, match=msg):
        read_nifti(p4)
    p2 = _save(tmp_path / "flat.nii.gz", _vol()[:, :, 0])
    msg = r"flat\.nii\.gz' is 2-D \(shape \(7, 6\)\); expected a 3-D"
    with pytest.raises(InputError, match=msg):
        read_nifti(p2)


def test_read_nifti_rejects_complex(tmp_path):
    path = _save(tmp_path / "c.nii", _vol().astype(np.complex64))
    with pytest.raises(InputError, match=r"stores complex64 voxels .*expected a real-valued"):
        read_nifti(path)


def test_gz_name_with_plain_content_is_read(tmp_path):
    path = tmp_path / "plain.nii.gz"
    _save(tmp_path / "plain.nii", _vol()).rename(path)
    np.testing.assert_array_equal(read_nifti(path)[0], _vol())


def test_file_fingerprint(vol_gz, tmp_path):
    fp = file_fingerprint(vol_gz)
    st = vol_gz.stat()
    assert {k: fp[k] for k in ("path", "size", "mtime_ns", "ctime_ns")} == {
        "path": str(vol_gz.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns}
    assert isinstance(fp["sample"], str) and len(fp["sample"]) == 32
    with pytest.raises(InputError, match="does not exist"):
        file_fingerprint(tmp_path / "nope.nii.gz")
    # same size and mtime, other bytes: the fingerprint differs (content sample and ctime)
    data = bytearray(vol_gz.read_bytes())
    data[-1] ^= 0xFF
    vol_gz.write_bytes(bytes(data))
    os.utime(vol_gz, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = file_fingerprint(vol_gz)
    assert (again["size"], again["mtime_ns"]) == (fp["size"], fp["mtime_ns"])
    assert again["sample"] != fp["sample"]


# --------------------------------------------------------------------------- VolumeStore


def test_store_reuses_entry_without_decompressing(vol_gz, tmp_path):
    store = VolumeStore(tmp_path / "cache")
    first = store.get(vol_gz)
    ref, meta = read_nifti(vol_gz)
    assert store.read_count == 1
    np.testing.assert_array_equal(first.data, ref)
    assert first.data.flags.c_contiguous and first.data.dtype == np.float32
    assert not first.data.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        first.data[0, 0, 0] = 1.0
    assert first.source == vol_gz and first.nonfinite == 0
    assert first.meta.shape == SHAPE
    np.testing.assert_array_equal(first.meta.affine, meta.affine)
    assert first.meta.header_bytes == meta.header_bytes
    assert store.get(vol_gz) is first  # still referenced: same mapping
    del first
    again = store.get(str(vol_gz))  # from disk this time
    assert store.read_count == 1
    assert isinstance(again.data.base, np.memmap) or isinstance(again.data.base.base, np.memmap)
    np.testing.assert_array_equal(again.data, ref)
    other = VolumeStore(tmp_path / "cache")  # another process would see the same
    np.testing.assert_array_equal(other.get(vol_gz).data, ref)
    assert other.read_count == 0


def test_store_rebuilds_when_source_changes(vol_gz, tmp_path):
    store = VolumeStore(tmp_path / "cache")
    store.get(vol_gz)
    _save(vol_gz, _vol(seed=1))  # new content, size and mtime may be the same or not
    st = vol_gz.stat()
    os.utime(vol_gz, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    np.testing.assert_array_equal(store.get(vol_gz).data, _vol(seed=1))
    assert store.read_count == 2
    os.utime(vol_gz, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # touch only
    store.get(vol_gz)
    assert store.read_count == 3


def _only(cache: Path, suffix: str) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.name.endswith(suffix)]
    return entry


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: _only(c, ".npy").write_bytes(_only(c, ".npy").read_bytes()[:-100]),
         r"\.npy is \d+ bytes, expected"),
        (lambda c: _only(c, ".npy").write_bytes(b""), r"\.npy header unreadable"),
        (lambda c: _only(c, ".json").write_text("{not json"), r"sidecar unparsable"),
        (lambda c: _only(c, ".json").write_text(
            json.dumps({**json.loads(_only(c, ".json").read_text()), "size": 1})),
         r"sidecar describes .* size=1"),
        (lambda c: _only(c, ".json").write_text(
            json.dumps({**json.loads(_only(c, ".json").read_text()), "shape": [5, 6, 7]})),
         r"\.npy holds .* expected <f4 \(5, 6, 7\)"),
    ],
    ids=["truncated-npy", "empty-npy", "json-garbage", "json-wrong-size", "json-wrong-shape"],
)
def test_store_detects_and_rebuilds_damaged_entry(vol_gz, tmp_path, caplog, damage, reason):
    cache = tmp_path / "cache"
    VolumeStore(cache).get(vol_gz)
    damage(cache)
    store = VolumeStore(cache)
    with caplog.at_level(logging.WARNING, logger="pacs_numba.store.volumes"):
        cv = store.get(vol_gz)
    assert store.read_count == 1
    np.testing.assert_array_equal(cv.data, _vol())
    (rec,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "is invalid" in rec.getMessage() and "rebuilding" in rec.getMessage()
    assert re.search(reason, rec.getMessage())
    assert VolumeStore(cache).get(vol_gz).nonfinite == 0  # the rebuilt entry is valid


def test_store_bad_input_raises_and_leaves_no_entry(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"")
    store = VolumeStore(tmp_path / "cache")
    with pytest.raises(InputError, match="is empty"):
        store.get(bad)
    with pytest.raises(InputError, match="does not exist"):
        store.get(tmp_path / "missing.nii.gz")
    assert store.info()["entries"] == 0
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_store_counts_nonfinite(tmp_path):
    data = _vol()
    data[0, 0, 0] = data[1, 2, 3] = data[6, 5, 4] = np.nan
    data[2, 2, 2], data[3, 3, 3] = np.inf, -np.inf
    src = _save(tmp_path / "nan.nii", data)
    assert VolumeStore(tmp_path / "c").get(src).nonfinite == 5
    assert VolumeStore(tmp_path / "c").get(src).nonfinite == 5  # from the sidecar


def test_store_info_and_clear(vol_gz, tmp_path):
    cache = tmp_path / "cache"
    store = VolumeStore(cache)
    other = _save(tmp_path / "other.nii", _vol(seed=3))
    store.get(vol_gz), store.get(other)
    (cache / "notes.txt").write_text("not ours")
    stale = cache / (".0123456789abcdef0123456789abcdef.npy.tmp-1-2-abcd")
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * pio.STALE_TEMP_S,) * 2)
    info = store.info()
    assert info["directory"] == str(cache) and info["entries"] == 2 and info["writable"]
    assert info["temp_files"] == 1 and info["total_bytes"] > 2 * 4 * np.prod(SHAPE)
    assert store.clear() == 2
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]
    assert store.info()["entries"] == 0
    store.get(vol_gz)
    assert store.read_count == 3


def test_store_location_from_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("PACS_NUMBA_CACHE_DIR", str(tmp_path / "from_env"))
    assert VolumeStore().directory == tmp_path / "from_env"
    assert VolumeStore(tmp_path / "explicit").directory == tmp_path / "explicit"  # wins over env
    monkeypatch.delenv("PACS_NUMBA_CACHE_DIR")
    monkeypatch.setattr(pio.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    store = VolumeStore()
    assert store.directory.parent.parent == tmp_path / "tmp"
    assert store.directory.parent.name.startswith("pacs_numba-")
    assert store.directory.is_dir() and (store.directory.stat().st_mode & 0o777) == 0o700


def test_store_unwritable_dir_is_an_input_error(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match=r"a_file/cache' is not writable .*--cache-dir or "
                                         r"PACS_NUMBA_CACHE_DIR"):
        VolumeStore(tmp_path / "a_file" / "cache")


def test_store_cache_write_failure_is_reported_and_cleaned(vol_gz, tmp_path, monkeypatch):
    def full(f, array, allow_pickle):  # the disk fills up after the first MiB
        f.write(b"\0" * (1 << 20))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pio.np.lib.format, "write_array", full)
    store = VolumeStore(tmp_path / "cache")
    with pytest.raises(PacsError, match=r"cannot write volume cache entry .*No space left"):
        store.get(vol_gz)
    assert [p.name[-5:] for p in (tmp_path / "cache").iterdir()] == [".lock"]


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_store_threads_decompress_once(vol_gz, tmp_path, mode):
    store = VolumeStore(tmp_path / "cache", mode=mode)
    barrier = threading.Barrier(8)
    out: list = [None] * 8

    def work(i):
        barrier.wait()
        out[i] = store.get(vol_gz)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.read_count == 1
    ref = _vol()
    for cv in out:
        np.testing.assert_array_equal(cv.data, ref)
    assert len({id(cv.data) for cv in out}) == 1


def test_store_without_flock_still_builds_whole_entries(vol_gz, tmp_path, monkeypatch):
    monkeypatch.setattr(pio, "fcntl", None)  # as on a file system without locks
    stores = [VolumeStore(tmp_path / "cache") for _ in range(2)]  # like two processes
    barrier = threading.Barrier(4)
    out: list = []

    def work(store):
        barrier.wait()
        out.append(store.get(vol_gz).data)

    threads = [threading.Thread(target=work, args=(stores[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s.read_count for s in stores] in ([1, 1], [0, 1], [1, 0])
    for data in out:
        np.testing.assert_array_equal(data, _vol())
    fresh = VolumeStore(tmp_path / "cache")
    np.testing.assert_array_equal(fresh.get(vol_gz).data, _vol())
    assert fresh.read_count == 0


_CHILD = """
import sys, time
from pathlib import Path
from pacs_numba.store.volumes import VolumeStore
cache, src, go = sys.argv[1:4]
store = VolumeStore(cache)
while not Path(go).exists():
    time.sleep(0.002)
cv = store.get(src)
print(store.read_count, float(cv.data.sum(dtype="float64")), cv.nonfinite)
"""


def test_store_two_processes_create_same_entry(tmp_path):
    src = _save(tmp_path / "big.nii.gz", _vol((60, 50, 40)))
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(cache), str(src), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    time.sleep(0.5)  # both are importing and waiting for the go file
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    counts = [int(out.split()[0]) for out, _ in results]
    sums = {out.split()[1] for out, _ in results}
    assert len(sums) == 1
    assert sorted(counts) == [0, 1]  # the flock made the second process wait and map
    names = sorted(p.name for p in cache.iterdir())
    assert [n.rsplit(".", 1)[1] for n in names] == ["lock", "json", "npy"]
    store = VolumeStore(cache)
    np.testing.assert_array_equal(store.get(src).data, _vol((60, 50, 40)))
    assert store.read_count == 0


# ---------------------------------------------------------------------------- writers


def _hr_header() -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(SHAPE + (1,))
    hdr.set_qform(AFFINE, code="scanner")
    hdr.set_sform(AFFINE, code="mni")
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"HR T1w"
    hdr.set_slope_inter(0.5, 10.0)
    return hdr


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii"])
def test_write_nifti_round_trip_keeps_header(tmp_path, name):
    src = tmp_path / "hr.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE + (1,), np.int16), AFFINE, _hr_header()), str(src))
    _, meta = read_nifti(src)
    data = _vol()
    path = tmp_path / "deep" / "er" / name
    write_nifti(path, data.astype(np.float64), meta.affine, meta.header)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    img = nib.load(str(path))
    hdr = img.header
    assert img.get_data_dtype() == np.float32 and img.shape == SHAPE
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), data)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    assert hdr.get_slope_inter() == (None, None)
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 4)
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert hdr["descrip"].item() == b"HR T1w"
    assert sorted(p.name for p in path.parent.iterdir()) == [name]
    np.testing.assert_array_equal(read_nifti(path)[0], data)


def test_write_nifti_from_nifti2_header_keeps_fields(tmp_path):
    hdr = nib.Nifti2Header()
    hdr.set_qform(AFFINE, code="scanner")
    hdr.set_sform(AFFINE, code="scanner")
    hdr["descrip"] = b"from nifti2"
    src = tmp_path / "n2.nii.gz"
    nib.save(nib.Nifti2Image(_vol(), AFFINE, hdr), str(src))
    data, meta = read_nifti(src)
    assert meta.nifti_version == 2
    write_nifti(tmp_path / "out.nii.gz", data, meta.affine, meta)  # a NiftiMeta works too
    img = nib.load(str(tmp_path / "out.nii.gz"))
    assert type(img) is nib.Nifti1Image and img.header["descrip"].item() == b"from nifti2"
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 1)
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), data)


def test_write_nifti_without_header_and_with_new_affine(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", _vol(), AFFINE)
    img = nib.load(str(tmp_path / "a.nii.gz"))
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    other = AFFINE.copy()
    other[:3, 3] += 5
    write_nifti(tmp_path / "b.nii.gz", _vol(), other, _hr_header())
    np.testing.assert_allclose(nib.load(str(tmp_path / "b.nii.gz")).affine, other, atol=1e-6)


@pytest.mark.parametrize("where", ["gzip-write", "replace"])
def test_write_nifti_failure_leaves_nothing(tmp_path, monkeypatch, where):
    path = tmp_path / "out" / "blend.nii.gz"
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "gzip-write":
        class Full(igzip.IGzipFile):
            def write(self, data):
                raise enospc

        monkeypatch.setattr(igzip, "IGzipFile", Full)
    else:
        def replace(src, dst):
            raise enospc

        monkeypatch.setattr(pio.os, "replace", replace)
    with pytest.raises(PacsError, match=r"cannot write '.*out/blend\.nii\.gz': No space left") as e:
        write_nifti(path, _vol(), AFFINE)
    assert e.value.__cause__ is enospc
    assert not list(path.parent.iterdir())


def test_atomic_savez_exact_name(tmp_path):
    stats = np.array({"m": {"mean": 1.0}}, dtype=object)
    for name, compressed in [("p_weights_test.npz", True), ("plain.bin", False)]:
        path = tmp_path / "model" / name
        atomic_savez(path, compressed=compressed, weight_maps=_vol(), statistics=stats)
        with np.load(path, allow_pickle=True) as z:
            np.testing.assert_array_equal(z["weight_maps"], _vol())
            assert z["statistics"].item() == {"m": {"mean": 1.0}}
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["p_weights_test.npz",
                                                                       "plain.bin"]


def test_atomic_text_json_bytes(tmp_path):
    obj = {"b": [1, 2], "a": {"x": 0.5}}
    atomic_write_json(tmp_path / "j" / "m.json", obj, indent=2, sort_keys=True)
    assert (tmp_path / "j" / "m.json").read_text() == json.dumps(obj, indent=2, sort_keys=True)
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode()
    atomic_write_bytes(tmp_path / "t.txt", b"over")  # replaces
    assert (tmp_path / "t.txt").read_bytes() == b"over"
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    (tmp_path / "adir").mkdir()
    with pytest.raises(PacsError, match=r"cannot write '.*adir': Is a directory"):
        atomic_write_bytes(tmp_path / "adir", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "j", "t.txt"]


def test_savez_from_template_appends_members_and_loads_like_any_npz(tmp_path):
    from pacs_numba.store.atomic import atomic_savez_from, npz_bytes

    big = np.arange(4000, dtype=np.float32).reshape(10, 20, 20)
    stats = np.empty((), dtype=object)
    stats[()] = {"a": {"mean": 1.0}}
    template = npz_bytes(weight_maps=big, statistics=stats, n=np.int64(3))
    for pid in ("sub-1", "sub-2"):
        atomic_savez_from(tmp_path / f"{pid}.npz", template, patient_id=np.asarray(pid))
    for pid in ("sub-1", "sub-2"):
        with np.load(tmp_path / f"{pid}.npz", allow_pickle=True) as z:
            assert sorted(z.files) == ["n", "patient_id", "statistics", "weight_maps"]
            assert str(z["patient_id"]) == pid
            np.testing.assert_array_equal(z["weight_maps"], big)
            assert z["statistics"].item() == {"a": {"mean": 1.0}} and int(z["n"]) == 3
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_store_info_counts_every_cache_folder(vol_gz, tmp_path):
    """The statistics and registration folders are on the same disk: counted (issue 18)."""
    cache = tmp_path / "cache"
    store = VolumeStore(cache)
    store.get(vol_gz)
    before = store.info()["total_bytes"]
    (cache / "cellstats").mkdir()
    (cache / "cellstats" / "a.npz").write_bytes(b"x" * 100)
    (cache / "registered" / "deep").mkdir(parents=True)
    (cache / "registered" / "deep" / "t.mat").write_bytes(b"y" * 30)
    info = store.info()
    assert (info["cellstats_files"], info["cellstats_bytes"]) == (1, 100)
    assert (info["registered_files"], info["registered_bytes"]) == (1, 30)
    assert info["total_bytes"] == before + 130


def _entries(cache: Path) -> set[str]:
    return {p.stem for p in cache.glob("*.json")}


def test_prune_removes_entries_whose_source_is_gone(tmp_path):
    cache = tmp_path / "cache"
    a = _save(tmp_path / "a.nii", _vol(seed=1))
    b = _save(tmp_path / "b.nii", _vol(seed=2))
    VolumeStore(cache).get(a), VolumeStore(cache).get(b)
    both = _entries(cache)
    b.unlink()
    res = VolumeStore(cache).prune()
    assert (res["gone"], res["evicted"], res["in_use"]) == (1, 0, 0)
    assert len(_entries(cache)) == 1 and _entries(cache) < both
    assert len(list(cache.glob("*.npy"))) == 1


def test_prune_evicts_least_recently_used_but_never_one_in_use(tmp_path):
    cache = tmp_path / "cache"
    srcs = [_save(tmp_path / f"{i}.nii", _vol(seed=i)) for i in range(3)]
    for i, src in enumerate(srcs):
        VolumeStore(cache).get(src)
        for side in cache.glob("*.json"):  # make the use times strictly ordered
            if side.stat().st_mtime_ns > time.time_ns() - int(1e9):
                os.utime(side, (time.time() - 100 + i,) * 2)
    one = sum(p.stat().st_size for p in cache.iterdir() if p.suffix in {".npy", ".json"}) // 3
    holder = VolumeStore(cache)
    oldest = holder.get(srcs[0])  # in use here: mapped by this process
    side0 = next(p for p in cache.glob("*.json") if json.loads(p.read_text())["source"]
                 == str(srcs[0]))
    os.utime(side0, (time.time() - 1000,) * 2)  # still the least recently used
    res = VolumeStore(cache).prune(2 * one + 10)  # another store: only the maps tell
    assert (res["in_use"], res["evicted"], res["gone"]) == (1, 1, 0)
    assert oldest.data.sum() == pytest.approx(_vol(seed=0).astype(np.float32).sum(), rel=1e-6)
    left = VolumeStore(cache)
    assert left.get(srcs[0]) is not None and left.read_count == 0  # kept: it was in use
    assert left.get(srcs[2]) is not None and left.read_count == 0  # most recently used


def test_cache_max_size_must_be_a_size(monkeypatch, tmp_path):
    from pacs_numba import cli

    monkeypatch.setenv("PACS_NUMBA_CACHE_MAX", "lots")
    with pytest.raises(InputError, match=r"PACS_NUMBA_CACHE_MAX='lots' is not a size"):
        pio.cache_max_bytes()
    assert cli.main(["cache", "prune", "--cache-dir", str(tmp_path / "c"),
                     "--cache-max-size", "lots"]) == 2


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (33, 17, 9)])
def test_payload_crc32_is_zlibs_crc_of_the_c_order_bytes(shape):
    """The cache's checksum (ISA-L's) is the standard CRC-32 of the payload in C order."""
    vol = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    fortran = np.asfortranarray(vol)
    want = zlib.crc32(vol.tobytes(order="C"))
    assert pio.payload_crc32(vol) == want
    assert pio.payload_crc32(fortran) == want  # the bytes it hashes are the C-order ones

"""CellIndex.save / load: exact round trips, rejected corrupt or mismatched folders, atomicity."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from scatlas._validate import ScatlasInputError
from scatlas.search import CellIndex
from scatlas.search import persist as persist_mod
from scatlas.search.synthetic import clustered_embeddings

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def data():
    X, lab = clustered_embeddings(1200, 16, n_clusters=10, labels=True, seed=4)
    meta = pd.DataFrame({"cell_type": pd.Categorical([f"t{v}" for v in lab]),
                         "study": np.where(np.arange(1200) % 2 == 0, "a", "b"),
                         "score": np.linspace(0, 1, 1200)})
    return X, meta


def _build(X, meta, engine):
    kw = {} if engine == "exact" else {"nlist": 12}
    idx = CellIndex.build(X[:1000], meta.iloc[:1000], engine=engine, **kw)
    idx.add(X[1000:], meta.iloc[1000:])
    idx.remove(np.arange(0, 1200, 9))
    return idx


@pytest.mark.parametrize("engine", ["exact", "faiss-ivf", "native-ivf", "faiss-ivfpq"])
def test_round_trip(tmp_path, data, engine):
    X, meta = data
    idx = _build(X, meta, engine)
    idx.nprobe = 5 if idx.nlist else None
    path = idx.save(tmp_path / "ix")
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("format_version", "scatlas_version", "faiss_version", "engine", "metric", "dim",
                "ntotal", "nlist", "nprobe", "files"):
        assert key in manifest
    assert manifest["engine"] == engine and manifest["ntotal"] == idx.ntotal
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    back = CellIndex.load(path, device="cpu")
    assert (back.engine, back.metric, back.dim, back.ntotal, back.nlist, back.nprobe) == (
        idx.engine, idx.metric, idx.dim, idx.ntotal, idx.nlist, idx.nprobe)
    Q = X[::37]
    for flt in (None, {"study": "a"}):
        D1, I1 = idx.search(Q, 10, filter=flt)
        D2, I2 = back.search(Q, 10, filter=flt)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_array_equal(D1, D2)
    pd.testing.assert_frame_equal(idx.metadata, back.metadata, check_categorical=False)
    assert back.stats == idx.stats
    assert back.add(X[:2]).tolist() == [1200, 1201]
    assert not any(p.name.startswith(".ix") for p in tmp_path.iterdir())


def _saved(tmp_path, data, engine="native-ivf"):
    X, meta = data
    return _build(X, meta, engine).save(tmp_path / "ix")


def test_corrupted_file_rejected(tmp_path, data):
    path = _saved(tmp_path, data)
    target = path / "vectors.npy"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(ScatlasInputError, match="sha256"):
        CellIndex.load(path)


@pytest.mark.parametrize("engine", ["faiss-ivf", "exact"])
def test_truncated_or_missing_file_rejected(tmp_path, data, engine):
    path = _saved(tmp_path, data, engine)
    name = "index.faiss" if engine == "faiss-ivf" else "vectors.npy"
    raw = (path / name).read_bytes()
    (path / name).write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ScatlasInputError, match="truncated"):
        CellIndex.load(path)
    (path / name).unlink()
    with pytest.raises(ScatlasInputError, match="missing"):
        CellIndex.load(path)


def _edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("change, match", [
    ({"dim": 32}, "dim"),
    ({"ntotal": 5}, "live cells"),
    ({"next_id": 1300}, "ids"),
    ({"format_version": 99}, "format version"),
    ({"format": "other"}, "manifest"),
    ({"engine": "annoy"}, "unknown engine"),
    ({"nlist": 13}, "nlist"),
])
def test_mismatched_manifest_rejected(tmp_path, data, change, match):
    path = _saved(tmp_path, data)
    _edit_manifest(path, **change)
    with pytest.raises(ScatlasInputError, match=match):
        CellIndex.load(path)


def test_not_an_index(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ScatlasInputError, match="manifest"):
        CellIndex.load(tmp_path / "x")
    (tmp_path / "x" / "manifest.json").write_text("{not json")
    with pytest.raises(ScatlasInputError, match="JSON"):
        CellIndex.load(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        CellIndex.load(tmp_path / "nothing")


def test_interrupted_save_keeps_old_index(tmp_path, data, monkeypatch):
    X, meta = data
    old = CellIndex.build(X[:600], meta.iloc[:600])
    path = old.save(tmp_path / "ix")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    new = CellIndex.build(X, meta)

    def boom(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(persist_mod, "_write_metadata", boom)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]  # no temp folder left
    assert CellIndex.load(path).ntotal == 600
    # a successful save replaces it
    new.save(path)
    assert CellIndex.load(path).ntotal == 1200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]


def test_crash_between_renames_recovers_backup(tmp_path, data, monkeypatch):
    X, meta = data
    path = CellIndex.build(X[:600], meta.iloc[:600]).save(tmp_path / "ix")
    new = CellIndex.build(X, meta)
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old index was moved aside; the new one fails to move in
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(persist_mod.os, "replace", flaky)
    with pytest.raises(OSError):
        new.save(path)
    monkeypatch.undo()
    assert CellIndex.load(path).ntotal == 600  # the old index was put back
    # had the process died between the renames, load falls back to the backup folder
    os.replace(path, tmp_path / ".ix.old-abc")
    assert CellIndex.load(path).ntotal == 600


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["exact", "native-ivf"])
def test_round_trip_onto_gpu(tmp_path, data, engine):
    import cupy as cp

    X, meta = data
    idx = _build(X, meta, engine)
    path = idx.save(tmp_path / "ix")
    back = CellIndex.load(path, device="gpu")
    assert back.device == "gpu"
    from tests.helpers.neighbour_sets import assert_same_neighbours, float32_sum_tolerance

    arr = back._engine.X if engine == "exact" else back._engine.vectors
    assert isinstance(arr, cp.ndarray)
    # the same vectors, keys summed in float32 on another device: equal up to ties
    assert_same_neighbours(*idx.search(X[::37], 10, nprobe=12),
                           *back.search(X[::37], 10, nprobe=12),
                           atol=float32_sum_tolerance(16, scale=1.0))
    again = back.save(tmp_path / "ix2")
    assert CellIndex.load(again, device="cpu").ntotal == idx.ntotal


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_folder_mode_follows_umask(tmp_path, data, umask):
    """The index folder gets the mode a plain mkdir gives under the umask (as model folders,
    written through scatlas.io.atomic_write, do), not mkdtemp's 0o700."""
    from scatlas.io import atomic_write

    X, meta = data
    idx = CellIndex.build(X[:200], meta.iloc[:200], engine="exact")
    old = os.umask(umask)
    try:
        path = idx.save(tmp_path / "ix")
        (tmp_path / "plain").mkdir()
        with atomic_write(tmp_path / "model") as tmp:  # how scatlas.models.io writes a model
            tmp.mkdir()
        idx.save(tmp_path / "ix")  # replacing an existing index keeps the rule
    finally:
        os.umask(old)
    want = 0o777 & ~umask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == want
    assert (tmp_path / "model").stat().st_mode & 0o777 == want
    assert path.stat().st_mode & 0o777 == want
    for f in path.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name

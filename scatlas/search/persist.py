"""Saving and loading a :class:`~scatlas.search.CellIndex` as a folder.

Layout of ``<directory>/``:

- ``manifest.json``: ``format`` (``"scatlas-cell-index"``), ``format_version``, the scatlas,
  faiss and numpy versions that wrote it, ``engine``, ``metric``, ``dim``, ``ntotal``,
  ``next_id``, ``nlist``, ``nprobe``, the engine's own facts, the build statistics (1-NN distance
  quantiles for the OOD threshold), and ``files``: ``{name: {"sha256", "bytes"}}`` for every
  other file;
- ``alive.npy``: bool per id (removed cells are False);
- ``metadata.parquet``: the metadata of every id ever given (pyarrow), index column ``id``;
- the engine's files: ``index.faiss`` (faiss engines; ``faiss.write_index`` of the CPU form),
  ``vectors.npy`` + ``ids.npy`` (exact), ``centroids.npy``, ``vectors.npy``, ``ids.npy``,
  ``offsets.npy``, ``dead.npy`` (native IVF).

Atomic replacement: the folder is first written as a hidden sibling
(``.<name>.<random>.tmp``, created by ``mkdir`` so the index folder's mode follows the umask
like a model folder's), checksummed, then moved into place with ``os.replace``. When
``directory`` already exists it is first renamed to a hidden sibling backup (``.<name>.old-*``),
the new folder renamed in, and the backup deleted. An interruption before the swap leaves the
old index untouched (plus a temporary folder); between the two renames (two system calls) the old
index survives as the backup, and :func:`load_index` falls back to it when ``directory`` is
missing. :func:`load_index` checks the manifest (format, version, every file's size and sha256,
dimension and counts against the arrays) and raises :class:`ScatlasInputError` on any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__ as scatlas_version
from .. import backend
from .._validate import ScatlasInputError
from ..io import folder_backups, swap_folder
from . import engines as _engines

FORMAT = "scatlas-cell-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, bufsize: int = 8 * 2**20) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(bufsize)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _faiss_version() -> str | None:
    try:
        import faiss
    except ImportError:
        return None
    return getattr(faiss, "__version__", "unknown")


def _write_metadata(meta: pd.DataFrame, path: Path) -> None:
    frame = meta.copy()
    frame.columns = [str(c) for c in frame.columns]
    for col in frame.columns:  # parquet needs one type per column: mixed objects as strings
        if frame[col].dtype == object:
            kinds = {type(v) for v in frame[col].dropna()}
            if len(kinds) > 1:
                frame[col] = frame[col].astype("string")
    frame.index = pd.Index(frame.index.to_numpy(np.int64), name="id")
    frame.to_parquet(path, engine="pyarrow", index=True)


def _new_folder(parent: Path, name: str) -> Path:
    """A new empty hidden folder ``.<name>.<random>.tmp`` in ``parent``, created by a plain
    ``mkdir`` so its mode follows the umask as any folder's does (``0o755`` under the usual
    umask 022; model folders, written through :func:`scatlas.io.atomic_write`, get the same).
    ``tempfile.mkdtemp`` would make it ``0o700`` whatever the umask."""
    for _ in range(100):
        path = parent / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a temporary folder beside {str(parent / name)!r}")


def save_index(idx: Any, directory: str | Path) -> Path:
    """Write ``idx`` to ``directory`` atomically; returns the path."""
    target = Path(directory)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"folder {str(parent)!r} does not exist (saving {str(target)!r})")
    if target.exists() and not target.is_dir():
        raise ScatlasInputError(f"{str(target)!r} exists and is not a folder")
    tmp = _new_folder(parent, target.name)
    try:
        eng = idx.engine_object
        files = list(eng.save(tmp))
        np.save(tmp / "alive.npy", idx.alive)
        files.append("alive.npy")
        _write_metadata(idx.all_metadata, tmp / "metadata.parquet")
        files.append("metadata.parquet")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "scatlas_version": scatlas_version,
            "faiss_version": _faiss_version(),
            "numpy_version": np.__version__,
            "engine": eng.name,
            "metric": idx.metric,
            "kind": eng.kind,
            "dim": idx.dim,
            "ntotal": idx.ntotal,
            "engine_ntotal": int(eng.ntotal),
            "next_id": idx.next_id,
            "nlist": idx.nlist,
            "nprobe": idx.nprobe,
            "engine_meta": eng.meta(),
            "stats": idx.stats,
            "files": {name: {"sha256": sha256_file(tmp / name),
                             "bytes": (tmp / name).stat().st_size} for name in files},
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        from .atlas_map import carry_map  # the stored 2-D map, when still valid

        carry_map(target, tmp, manifest["files"])
        swap_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _backup_of(target: Path) -> Path | None:
    """The newest complete backup left by an interrupted replacement, if any."""
    return next((c for c in folder_backups(target) if (c / MANIFEST).is_file()), None)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a saved index (format checked)."""
    folder = Path(directory)
    path = folder / MANIFEST
    if not path.is_file():
        raise ScatlasInputError(f"{str(folder)!r} is not a saved cell index (no {MANIFEST})")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ScatlasInputError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ScatlasInputError(f"{str(path)!r} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ScatlasInputError(f"{str(folder)!r} has index format version {version}; this "
                                f"scatlas reads version {FORMAT_VERSION}")
    for key in ("engine", "metric", "dim", "ntotal", "next_id", "files"):
        if key not in manifest:
            raise ScatlasInputError(f"{str(path)!r} lacks the field {key!r}")
    if manifest["engine"] not in _engines.REGISTRY:
        raise ScatlasInputError(f"{str(path)!r} names an unknown engine {manifest['engine']!r}")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any], checksums: bool = True) -> None:
    """Every file in the manifest exists with its size (and sha256); raises otherwise."""
    for name, facts in manifest["files"].items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise ScatlasInputError(f"saved index {str(folder)!r} is missing the file {name!r}")
        size = path.stat().st_size
        if size != facts.get("bytes"):
            raise ScatlasInputError(f"{str(path)!r} has {size} bytes, the manifest says "
                                    f"{facts.get('bytes')} (truncated or replaced)")
        if checksums and sha256_file(path) != facts.get("sha256"):
            raise ScatlasInputError(f"{str(path)!r} does not match its sha256 in the manifest "
                                    "(corrupted)")


def load_index(directory: str | Path, device: str | None = None, verify: bool = True) -> Any:
    """Load a saved index; see the module docstring for the checks."""
    from .index import CellIndex

    folder = Path(directory)
    if not folder.exists():
        backup = _backup_of(folder)
        if backup is None:
            raise FileNotFoundError(f"no saved index at {str(folder)!r}")
        folder = backup
    manifest = read_manifest(folder)
    verify_files(folder, manifest, checksums=verify)
    dev = backend.resolve_device(device)
    meta = dict(manifest)
    meta.setdefault("kind", "l2" if manifest["metric"] == "euclidean" else "ip")
    try:
        eng = _engines.get_engine_class(manifest["engine"]).load(folder, meta, dev)
        alive = np.load(folder / "alive.npy")
        metadata = pd.read_parquet(folder / "metadata.parquet", engine="pyarrow")
    except ScatlasInputError:
        raise
    except Exception as err:  # unreadable despite matching checksums (verify=False, bugs)
        raise ScatlasInputError(f"could not read the saved index {str(folder)!r}: {err}") from err
    metadata.index = pd.Index(metadata.index.to_numpy(np.int64), name="id")
    checks = {
        "dim": (int(eng.d), int(manifest["dim"])),
        "ids": (alive.shape, (int(manifest["next_id"]),)),
        "live cells": (int(alive.sum()), int(manifest["ntotal"])),
        "metadata rows": (len(metadata), int(manifest["next_id"])),
        "engine cells": (int(eng.ntotal), int(manifest.get("engine_ntotal", eng.ntotal))),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise ScatlasInputError(f"saved index {str(folder)!r} is inconsistent: {what} "
                                    f"{got} != manifest {want}")
    return CellIndex(eng, metric=manifest["metric"], device=dev, next_id=manifest["next_id"],
                     alive=alive.astype(bool), metadata=metadata, nprobe=manifest.get("nprobe"),
                     stats=manifest.get("stats"))

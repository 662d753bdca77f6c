"""Saved models: weights, config and gene list in one folder, written atomically.

Layout of a model folder::

    manifest.json       {"format": "scatlas-model", "format_version": 1, "kind": "metric",
                         "scatlas_version", "jax_version", "flax_version", "config": {...},
                         "extra": {...}, "files": {name: sha256}}
    genes.txt           the model's input genes, one per line, in input order
    variables.msgpack   flax-serialised variables (params, batch statistics), float32 numpy

The folder is built beside the target and renamed into place (:func:`scatlas.io.atomic_write`),
so an interrupted save never leaves a half-written model. :func:`load` checks the manifest and
the checksums and dispatches on ``kind`` to the model class (``MetricEncoder``, ...).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from .._validate import ScatlasInputError
from ..io import atomic_write

FORMAT = "scatlas-model"
FORMAT_VERSION = 1

#: kind -> "module:Class" of the model class with a ``from_saved(saved: SavedModel)`` classmethod.
KINDS: dict[str, str] = {
    "metric": "scatlas.models.metric:MetricEncoder",
    "mvae": "scatlas.models.mvae:MultimodalVAE",
    "covel": "scatlas.models.covel:CoVEL",
    "michigan": "scatlas.models.michigan:MichiGAN",
}


class SavedModel(dict):
    """What :func:`read_model` returns: ``kind``, ``config``, ``extra``, ``genes``
    (pandas Index) and ``variables`` (nested dict of numpy arrays)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_model(
    directory: str | Path,
    *,
    kind: str,
    config: dict[str, Any],
    variables: Any,
    genes: Any,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a model folder atomically (replacing an existing one); return its path."""
    import flax
    import jax
    from flax import serialization

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    host = jax.tree_util.tree_map(lambda a: np.asarray(a), jax.device_get(variables))
    with atomic_write(directory) as tmp:
        tmp.mkdir()
        (tmp / "genes.txt").write_text("".join(f"{g}\n" for g in map(str, genes)))
        (tmp / "variables.msgpack").write_bytes(serialization.msgpack_serialize(host))
        files = {name: _sha256(tmp / name) for name in ("genes.txt", "variables.msgpack")}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
            "scatlas_version": __version__, "jax_version": jax.__version__,
            "flax_version": flax.__version__, "config": config, "extra": extra or {},
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_json_default))
    return directory


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def read_model(directory: str | Path) -> SavedModel:
    """Read and verify a model folder (manifest, checksums); raises ScatlasInputError if bad."""
    from flax import serialization

    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ScatlasInputError(
            f"{str(directory)!r} is not a scatlas model folder (no manifest.json)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ScatlasInputError(f"corrupt manifest.json in {str(directory)!r}: {err}") from None
    if manifest.get("format") != FORMAT:
        raise ScatlasInputError(f"{str(directory)!r} holds {manifest.get('format')!r}, not a model")
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise ScatlasInputError(
            f"model format {manifest['format_version']} is newer than this scatlas supports "
            f"({FORMAT_VERSION}); upgrade scatlas"
        )
    for name, digest in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ScatlasInputError(f"model folder {str(directory)!r} lacks {name}")
        if _sha256(path) != digest:
            raise ScatlasInputError(
                f"{name} in {str(directory)!r} does not match its checksum (corrupt or modified)"
            )
    genes = pd.Index((directory / "genes.txt").read_text().splitlines())
    variables = serialization.msgpack_restore((directory / "variables.msgpack").read_bytes())
    return SavedModel(
        kind=manifest["kind"], config=manifest["config"], extra=manifest.get("extra", {}),
        genes=genes, variables=variables, manifest=manifest,
    )


def load(directory: str | Path) -> Any:
    """Load a saved model of any kind (``MetricEncoder``, ``MultimodalVAE``, ...)."""
    saved = read_model(directory)
    kind = saved["kind"]
    if kind not in KINDS:
        raise ScatlasInputError(f"unknown model kind {kind!r} in {str(directory)!r}")
    module, cls = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), cls).from_saved(saved)

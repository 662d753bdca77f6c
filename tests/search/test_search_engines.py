"""The engine contract: the Protocol, the registry, a registered engine slotting in, layering."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from scatlas.exceptions import ScatlasInputError
from scatlas.search import CellIndex, engines
from scatlas.search.engines.exact import ExactEngine
from scatlas.search.synthetic import clustered_embeddings

ENGINE_DIR = Path(engines.__file__).parent


def _available(name: str) -> bool:
    spec = engines.REGISTRY[name]
    if spec.gpu_only:
        return False
    if spec.needs_faiss:
        try:
            import faiss  # noqa: F401
        except ImportError:
            return False
    return True


@pytest.mark.parametrize("name", [n for n in engines.ENGINES if _available(n)])
def test_registered_engines_follow_the_protocol(name):
    nlist = None if not engines.REGISTRY[name].ivf else 8
    eng = engines.create_engine(name, 16, "ip", nlist)
    assert isinstance(eng, engines.Engine)
    assert eng.name == name
    assert eng.bytes_per_cell() > 0
    # the optional steps exist with their defaults
    eng.reserve(10)
    eng.finish()
    assert isinstance(eng.meta(), dict)
    assert isinstance(eng.scan_counts(), dict)


def test_sharded_form_and_missing_one():
    eng = engines.create_engine("native-ivf", 8, "l2", 4, n_shards=2)
    assert type(eng).__name__ == "ShardedNativeIVF" and isinstance(eng, engines.Engine)
    with pytest.raises(ScatlasInputError, match="no sharded form"):
        engines.create_engine("exact", 8, "l2", None, n_shards=2)
    with pytest.raises(ScatlasInputError, match="engine must be"):
        engines.get_engine_class("no-such-engine")


class _Doubled(ExactEngine):
    """A toy engine registered under a new name: the exact engine, counting its searches."""

    name = "test-doubled"
    calls = 0

    def search(self, Q, k, nprobe=None, allowed=None):
        type(self).calls += 1
        return super().search(Q, k, nprobe, allowed)


def test_a_registered_engine_slots_in(tmp_path):
    spec = engines.EngineSpec("test-doubled", __name__, "_Doubled", ivf=False)
    engines.register_engine(spec)
    try:
        X = clustered_embeddings(500, 12, n_clusters=5, seed=1)
        idx = CellIndex.build(X, engine="test-doubled")
        ref = CellIndex.build(X, engine="exact")
        D, ids = idx.search(X[:20], 5)
        D0, ids0 = ref.search(X[:20], 5)
        np.testing.assert_array_equal(ids, ids0)
        np.testing.assert_array_equal(D, D0)
        assert _Doubled.calls >= 1 and idx.engine == "test-doubled"
        idx.save(tmp_path / "i")
        back = CellIndex.load(tmp_path / "i")
        assert back.engine == "test-doubled"
        np.testing.assert_array_equal(back.search(X[:20], 5)[1], ids0)
    finally:
        engines.REGISTRY.pop("test-doubled", None)


def test_public_accessors():
    X = clustered_embeddings(300, 8, n_clusters=3, seed=2)
    idx = CellIndex.build(X, engine="exact")
    idx.remove([0, 5])
    assert idx.alive.shape == (300,) and not idx.alive[[0, 5]].any()
    with pytest.raises(ValueError):
        idx.alive[1] = False  # a read-only view
    assert len(idx.all_metadata) == 300 and len(idx.metadata) == 298
    assert isinstance(idx.engine_object, engines.Engine)
    assert idx.bytes_per_cell() == 4 * 8 + 12


def test_engines_import_nothing_above_them():
    """No module in search/engines imports from scatlas.search (its parent package)."""
    for path in ENGINE_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                pytest.fail(f"{path.name}:{node.lineno} imports from scatlas.search "
                            f"(..{node.module or ''})")
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("scatlas.search") and \
                    not node.module.startswith("scatlas.search.engines"):
                pytest.fail(f"{path.name}:{node.lineno} imports {node.module}")

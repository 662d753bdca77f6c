"""Native IVF-Flat: one code path for CuPy (GPU) and NumPy (its CPU twin).

Structure (as faiss ``IndexIVFFlat``, Jegou, Douze & Schmid 2011; Johnson et al. 2019):

- coarse quantiser: ``nlist`` k-means centroids (:mod:`._kmeans`, trained on a sample; spherical
  when the training vectors are unit rows);
- inverted lists as ONE contiguous array: ``vectors`` (N, d) float32 sorted by list, ``ids`` (N,)
  int64 and ``offsets`` (nlist + 1,) so that list ``l`` is rows ``offsets[l]:offsets[l+1]``; all
  on the device. Removal marks rows in ``dead`` (tombstones); they are compacted away once they
  exceed a quarter of the rows.

Build (:meth:`bulk_add`): pass 1 assigns every chunk to its list (int32 labels kept, 4 bytes per
vector) and counts; the arrays are allocated once; pass 2 re-reads each chunk and scatters its
rows to their slots. Peak memory is the index plus one chunk; a one-shot stream of chunks is
buffered instead (then the data are held twice while building). :meth:`add` merges new rows into
a fresh contiguous array (a transient second copy).

Search, per batch of queries: coarse scores ``Q C^T`` -> the ``nprobe`` best lists per query;
the probed rows of all queries are enumerated as one flat candidate vector (segment offsets by a
cumulative sum and ``searchsorted``, no Python loop over queries or lists), their keys computed
pair by pair (``-q.x`` or ``||q - x||^2``, exact, no GEMM tiling effects), tombstones and filters
set to +inf, scattered into a padded (queries, max candidates) matrix, and the top k taken by
partition + a (key, id) sort. Batches are sized so the gathered candidates stay within a memory
budget. Given the same centroids this returns what faiss ``IndexIVFFlat`` returns for the same
``nprobe`` (same probed lists, same candidates), up to float rounding of the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ... import backend
from . import hits_per_query, mismatch, pair_keys, smallest_k
from ._kmeans import assign, kmeans

_CAND_ROWS_CPU = 2**18  # candidate rows gathered per query batch
_CAND_ROWS_GPU = 2**22
_COMPACT_FRACTION = 0.25
_NITER = 10



def replayable(make_chunks, reiterable: bool):
    """``make_chunks(record)`` callable twice (the two-pass build): as given when its source
    re-reads, else one that replays the chunks read once and held in memory."""
    if reiterable:
        return make_chunks
    held = list(make_chunks(True))
    return lambda record: iter(held)  # noqa: ARG005


class NativeIVF:
    """IVF-Flat on one contiguous list-sorted array; see the module docstring."""

    name = "native-ivf"

    def __init__(self, d: int, kind: str, nlist: int, device: str = "cpu", seed: int = 0):
        self.d, self.kind, self.nlist, self.device, self.seed = d, kind, nlist, device, seed
        xp = backend.device_module(device)
        self.centroids: Any = None
        self.spherical = False
        self.vectors = xp.empty((0, d), dtype=np.float32)
        self.ids = xp.empty(0, dtype=np.int64)
        self.offsets = xp.zeros(nlist + 1, dtype=np.int64)
        self.dead = xp.zeros(0, dtype=bool)
        self.n_dead = 0

    @classmethod
    def create(cls, d: int, kind: str, nlist: int, *, device: str = "cpu",
               variant: str = "native-ivf", seed: int = 0) -> NativeIVF:
        return cls(d, kind, nlist, device, seed)

    # -- training and adding --------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self.centroids is not None

    @property
    def ntotal(self) -> int:
        return int(self.ids.shape[0]) - self.n_dead

    def set_centroids(self, C: Any) -> None:
        """Use given coarse centroids (nlist, d) instead of training."""
        xp = backend.device_module(self.device)
        C = xp.asarray(C, dtype=np.float32)
        if C.shape != (self.nlist, self.d):
            raise ValueError(f"centroids must have shape {(self.nlist, self.d)}, got {C.shape}")
        self.centroids = xp.ascontiguousarray(C)
        self._cnorm = (self.centroids * self.centroids).sum(axis=1)

    def train(self, sample: Any) -> None:
        xp = backend.device_module(self.device)
        X = xp.asarray(sample, dtype=np.float32)
        norms = xp.sqrt((X * X).sum(axis=1))
        self.spherical = bool(self.kind == "ip" and float(xp.abs(norms - 1).max()) < 1e-3)
        self.set_centroids(kmeans(X, self.nlist, kind=self.kind, niter=_NITER, seed=self.seed,
                                  spherical=self.spherical))

    def _assign(self, X: Any) -> Any:
        labels, _ = assign(X, self.centroids, self.kind, Cnorm=self._cnorm)
        return labels

    def bulk_add(self, make_chunks, reiterable: bool = True) -> None:
        """Two-pass build from ``make_chunks(record) -> iterator of (X, ids)``."""
        if self.ids.shape[0]:  # not empty: merge chunk by chunk
            for X, ids in make_chunks(True):
                self.add(X, ids)
            return
        make_chunks = replayable(make_chunks, reiterable)
        xp = backend.device_module(self.device)
        labels_all, counts = [], np.zeros(self.nlist, dtype=np.int64)
        for X, _ in make_chunks(True):
            lab = self._assign(X)
            labels_all.append(lab.astype(np.int32))
            counts += backend.to_host(xp.bincount(lab, minlength=self.nlist))
        n = int(counts.sum())
        offsets = np.zeros(self.nlist + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        self.vectors = xp.empty((n, self.d), dtype=np.float32)
        self.ids = xp.empty(n, dtype=np.int64)
        self.dead = xp.zeros(n, dtype=bool)
        self.offsets = xp.asarray(offsets)
        fill = xp.asarray(offsets[:-1].copy())
        for (X, ids), lab in zip(make_chunks(False), labels_all, strict=True):
            lab = lab.astype(np.int64)
            pos = self._slots(lab, fill)
            self.vectors[pos] = xp.asarray(X, dtype=np.float32)
            self.ids[pos] = xp.asarray(ids)
            fill += xp.bincount(lab, minlength=self.nlist)

    @staticmethod
    def _slots(lab: Any, fill: Any) -> Any:
        """Target rows of a chunk's vectors: ``fill[list]`` + rank within the list (stable)."""
        xp = backend.array_module(lab)
        order = xp.argsort(lab, kind="stable")
        sl = lab[order]
        rank = xp.arange(sl.shape[0]) - xp.searchsorted(sl, sl, side="left")
        pos = xp.empty_like(lab)
        pos[order] = fill[sl] + rank
        return pos

    def add(self, X: Any, ids: Any) -> None:
        xp = backend.device_module(self.device)
        X = xp.asarray(X, dtype=np.float32)
        ids = xp.asarray(ids, dtype=np.int64)
        lab = self._assign(X)
        old_counts = xp.diff(self.offsets)
        counts = old_counts + xp.bincount(lab, minlength=self.nlist)
        offsets = xp.zeros(self.nlist + 1, dtype=np.int64)
        offsets[1:] = xp.cumsum(counts)
        n_old, n = self.ids.shape[0], int(offsets[-1])
        vectors = xp.empty((n, self.d), dtype=np.float32)
        new_ids = xp.empty(n, dtype=np.int64)
        dead = xp.zeros(n, dtype=bool)
        if n_old:
            lst = self._list_of_rows()
            pos = offsets[lst] + (xp.arange(n_old) - self.offsets[lst])
            vectors[pos], new_ids[pos], dead[pos] = self.vectors, self.ids, self.dead
        pos = self._slots(lab, offsets[:-1] + old_counts)
        vectors[pos], new_ids[pos] = X, ids
        self.vectors, self.ids, self.dead, self.offsets = vectors, new_ids, dead, offsets

    def _list_of_rows(self) -> Any:
        xp = backend.device_module(self.device)
        n = self.ids.shape[0]
        return xp.searchsorted(self.offsets[1:], xp.arange(n), side="right")

    # -- search ---------------------------------------------------------------------------------
    def _probe(self, Q: Any, nprobe: int) -> Any:
        xp = backend.device_module(self.device)
        S = Q @ self.centroids.T
        keys = (self._cnorm[None, :] - 2.0 * S) if self.kind == "l2" else -S
        lists = xp.broadcast_to(xp.arange(self.nlist, dtype=np.int64), keys.shape)
        _, probe = smallest_k(keys, lists, min(nprobe, self.nlist))
        return probe

    def _candidates(self, probe: Any) -> tuple[Any, Any, Any]:
        """Flat candidate rows of a batch: (rows (T,), query of each (T,), count per query)."""
        xp = backend.device_module(self.device)
        mb, p = probe.shape
        starts = self.offsets[probe].ravel()
        lens = (self.offsets[probe + 1] - self.offsets[probe]).ravel()
        ends = xp.cumsum(lens)
        T = int(ends[-1]) if ends.shape[0] else 0
        t = xp.arange(T, dtype=np.int64)
        seg = xp.searchsorted(ends, t, side="right")
        rows = starts[seg] + (t - (ends - lens)[seg])
        qidx = seg // p
        per_query = lens.reshape(mb, p).sum(axis=1)
        return rows, qidx, per_query

    def _batches(self, Q: Any, nprobe: int):
        """Query batches whose candidates fit the budget (estimated from the mean list size)."""
        budget = _CAND_ROWS_GPU if self.device == "gpu" else _CAND_ROWS_CPU
        mean_list = max(1.0, self.ids.shape[0] / max(self.nlist, 1))
        step = max(1, int(budget // (mean_list * max(nprobe, 1) * 2)))
        for s in range(0, Q.shape[0], step):
            yield s, Q[s : s + step]

    def _keys(self, Qb: Any, rows: Any, qidx: Any, allowed: Any) -> Any:
        xp = backend.device_module(self.device)
        keys = pair_keys(Qb, self.vectors, qidx, rows, self.kind)
        bad = None
        if self.n_dead:
            bad = self.dead[rows]
        if allowed is not None:
            nb = ~allowed[self.ids[rows]]
            bad = nb if bad is None else bad | nb
        if bad is not None:
            keys = xp.where(bad, xp.inf, keys)
        return keys

    def search(self, Q: Any, k: int, nprobe: int, allowed: Any = None) -> tuple[Any, Any]:
        xp = backend.device_module(self.device)
        Q = xp.asarray(Q, dtype=np.float32)
        allowed = None if allowed is None else xp.asarray(allowed)
        out_k, out_i = [], []
        for _, Qb in self._batches(Q, nprobe):
            probe = self._probe(Qb, nprobe)
            rows, qidx, per_query = self._candidates(probe)
            mb = Qb.shape[0]
            width = max(int(per_query.max()) if mb else 0, 1)
            K = xp.full((mb, width), xp.inf, dtype=np.float32)
            ID = xp.full((mb, width), -1, dtype=np.int64)
            if rows.shape[0]:
                keys = self._keys(Qb, rows, qidx, allowed)
                first = xp.cumsum(per_query) - per_query
                pos = xp.arange(rows.shape[0]) - first[qidx]
                K[qidx, pos] = keys
                ID[qidx, pos] = self.ids[rows]
            kb, ib = smallest_k(K, ID, k)
            out_k.append(kb)
            out_i.append(ib)
        return xp.concatenate(out_k), xp.concatenate(out_i)

    def range_search(self, Q: Any, max_key: float, nprobe: int, allowed: Any = None):
        xp = backend.device_module(self.device)
        Q = xp.asarray(Q, dtype=np.float32)
        allowed = None if allowed is None else xp.asarray(allowed)
        out = []
        for _, Qb in self._batches(Q, nprobe):
            probe = self._probe(Qb, nprobe)
            rows, qidx, _ = self._candidates(probe)
            keys = self._keys(Qb, rows, qidx, allowed)
            keep = keys <= max_key
            out.extend(hits_per_query(qidx[keep], keys[keep], self.ids[rows[keep]],
                                      Qb.shape[0]))
        return out

    # -- removal --------------------------------------------------------------------------------
    def remove(self, ids: Any) -> int:
        xp = backend.device_module(self.device)
        hit = xp.isin(self.ids, xp.asarray(ids, dtype=np.int64)) & ~self.dead
        n = int(hit.sum())
        self.dead |= hit
        self.n_dead += n
        if self.n_dead > _COMPACT_FRACTION * max(self.ids.shape[0], 1):
            self.compact()
        return n

    def compact(self) -> None:
        """Drop tombstoned rows (a copy of the live rows)."""
        xp = backend.device_module(self.device)
        if not self.n_dead:
            return
        keep = ~self.dead
        lst = self._list_of_rows()[keep]
        self.vectors, self.ids = self.vectors[keep], self.ids[keep]
        counts = xp.bincount(lst, minlength=self.nlist)
        offsets = xp.zeros(self.nlist + 1, dtype=np.int64)
        offsets[1:] = xp.cumsum(counts)
        self.offsets = offsets
        self.dead = xp.zeros(self.ids.shape[0], dtype=bool)
        self.n_dead = 0

    # -- persistence ----------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"spherical": self.spherical, "n_dead": self.n_dead}

    _FILES = ("centroids", "vectors", "ids", "offsets", "dead")

    def save(self, folder: Path) -> list[str]:
        for name in self._FILES:
            np.save(folder / f"{name}.npy", backend.to_host(getattr(self, name)))
        return [f"{name}.npy" for name in self._FILES]

    @classmethod
    def load(cls, folder: Path, meta: dict[str, Any], device: str) -> NativeIVF:
        xp = backend.device_module(device)
        arrays = {name: np.load(folder / f"{name}.npy") for name in cls._FILES}
        nlist, d = arrays["centroids"].shape
        if d != int(meta["dim"]):
            raise mismatch(folder, "dimension", d, meta["dim"])
        if nlist != meta.get("nlist"):
            raise mismatch(folder, "nlist", nlist, meta.get("nlist"))
        n = arrays["ids"].shape[0]
        if (arrays["vectors"].shape != (n, d) or arrays["offsets"].shape != (nlist + 1,)
                or int(arrays["offsets"][-1]) != n or arrays["dead"].shape != (n,)):
            raise mismatch(folder, "array shapes", {k: v.shape for k, v in arrays.items()},
                           "consistent lists")
        eng = cls(d, meta["kind"], nlist, device)
        eng.set_centroids(arrays["centroids"])
        eng.vectors, eng.ids = xp.asarray(arrays["vectors"]), xp.asarray(arrays["ids"])
        eng.offsets, eng.dead = xp.asarray(arrays["offsets"]), xp.asarray(arrays["dead"])
        eng.n_dead = int(arrays["dead"].sum())
        eng.spherical = bool(meta.get("engine_meta", {}).get("spherical", False))
        return eng

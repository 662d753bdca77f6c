"""Native IVF-Flat: one code path for CuPy (GPU) and NumPy (its CPU twin).

Structure (as faiss ``IndexIVFFlat``, Jegou, Douze & Schmid 2011; Johnson et al. 2019):

- coarse quantiser: ``nlist`` k-means centroids (:mod:`._kmeans`, trained on a sample; spherical
  when the training vectors are unit rows);
- inverted lists in SEGMENTS, each one contiguous array: ``vectors`` (m, d) float32 sorted by
  list, ``ids`` (m,) int64, ``offsets`` (nlist + 1,) so that list ``l`` is rows
  ``offsets[l]:offsets[l+1]`` of the segment, and ``dead`` (m,) tombstones; all on the device.
  The build makes the first segment; every :meth:`add` appends one more, holding only the new
  rows, so adding never copies what is stored (device peak: the index plus the new rows; the
  rebuild it replaced held the index twice, 51 GB at 5e7 x 128). Past ``_MAX_TAIL`` appended
  segments these are merged into one (a copy of the appended rows only). Removal marks rows
  dead; past a quarter of the rows :meth:`compact` merges every segment into one without them.
- ``vectors``, ``ids``, ``offsets`` and ``dead`` read (or set) the index as ONE list-sorted
  array, the saved layout: reading them merges the segments first (a copy), so the engine's
  own paths never do; rows within a list keep their insertion order, so the layout is the one a
  single build of the same rows in the same order makes.

Build (:meth:`bulk_add`): pass 1 assigns every chunk to its list (int32 labels kept, 4 bytes per
vector) and counts; the arrays are allocated once; pass 2 re-reads each chunk and scatters its
rows to their slots. Peak memory is the index plus one chunk; a one-shot stream of chunks is
buffered instead (then the data are held twice while building).

Search, per batch of queries: coarse scores ``Q C^T`` -> the ``nprobe`` best lists per query;
the probed rows of all queries, in every segment, are enumerated as flat candidate vectors (list
offsets by a cumulative sum and ``searchsorted``, no Python loop over queries or lists), their
keys computed
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
_MAX_TAIL = 8  # appended segments kept apart before they are merged into one
_MERGE_ROWS = 2**20  # rows scattered per step when segments are merged


class _Segment:
    """One list-sorted block of the inverted lists (see the module docstring)."""

    __slots__ = ("vectors", "ids", "offsets", "dead")

    def __init__(self, vectors: Any, ids: Any, offsets: Any, dead: Any):
        self.vectors, self.ids, self.offsets, self.dead = vectors, ids, offsets, dead

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def list_of_rows(self) -> Any:
        """The list of every row, (m,) int64."""
        xp = backend.array_module(self.offsets)
        return xp.searchsorted(self.offsets[1:], xp.arange(self.rows), side="right")


def _merge_segments(segs: list[_Segment], nlist: int, d: int, drop_dead: bool) -> _Segment:
    """One segment holding the rows of ``segs`` (without the dead ones with ``drop_dead``),
    list by list in segment order, so each list keeps its insertion order. Scattered in steps of
    ``_MERGE_ROWS`` rows: the peak is the inputs, the output and one step."""
    xp = backend.array_module(segs[0].offsets)
    keeps = [~s.dead if drop_dead else None for s in segs]
    counts = [xp.bincount(s.list_of_rows()[k] if k is not None else s.list_of_rows(),
                          minlength=nlist) for s, k in zip(segs, keeps, strict=True)]
    total = sum(counts) if counts else xp.zeros(nlist, dtype=np.int64)
    offsets = xp.zeros(nlist + 1, dtype=np.int64)
    offsets[1:] = xp.cumsum(total)
    n = int(offsets[-1])
    out = _Segment(xp.empty((n, d), dtype=np.float32), xp.empty(n, dtype=np.int64), offsets,
                   xp.zeros(n, dtype=bool))
    before = offsets[:-1].copy()  # where the next segment's rows of each list go
    for seg, keep, cnt in zip(segs, keeps, counts, strict=True):
        src = xp.arange(seg.rows) if keep is None else xp.flatnonzero(keep)
        lst = seg.list_of_rows()[src]  # sorted: the segment is list-sorted
        rank = xp.arange(src.shape[0]) - xp.searchsorted(lst, lst, side="left")
        dst = before[lst] + rank
        for a in range(0, int(src.shape[0]), _MERGE_ROWS):
            sl = slice(a, a + _MERGE_ROWS)
            out.vectors[dst[sl]] = seg.vectors[src[sl]]
            out.ids[dst[sl]] = seg.ids[src[sl]]
            out.dead[dst[sl]] = seg.dead[src[sl]]
        before = before + cnt
    return out



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
        self._segs = [_Segment(xp.empty((0, d), dtype=np.float32), xp.empty(0, dtype=np.int64),
                               xp.zeros(nlist + 1, dtype=np.int64), xp.zeros(0, dtype=bool))]
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
        return self.n_stored - self.n_dead

    @property
    def n_stored(self) -> int:
        """Rows stored, live and dead, over all segments."""
        return sum(seg.rows for seg in self._segs)

    @property
    def n_segments(self) -> int:
        return len(self._segs)

    def list_counts(self) -> Any:
        """Rows stored per list (live and dead) over all segments: (nlist,) int64, on the
        engine's device (no merging)."""
        return sum(seg.offsets[1:] - seg.offsets[:-1] for seg in self._segs)

    # the one-array layout (merges the segments first; the engine's own paths never read it)
    def _flat(self) -> _Segment:
        if len(self._segs) > 1:
            self._segs = [_merge_segments(self._segs, self.nlist, self.d, drop_dead=False)]
        return self._segs[0]

    vectors = property(lambda self: self._flat().vectors,
                       lambda self, v: setattr(self._flat(), "vectors", v),
                       doc="(N, d) float32, list-sorted: all segments as one (see above)")
    ids = property(lambda self: self._flat().ids,
                   lambda self, v: setattr(self._flat(), "ids", v), doc="(N,) int64")
    offsets = property(lambda self: self._flat().offsets,
                       lambda self, v: setattr(self._flat(), "offsets", v),
                       doc="(nlist + 1,) int64 list bounds")
    dead = property(lambda self: self._flat().dead,
                    lambda self, v: setattr(self._flat(), "dead", v), doc="(N,) bool tombstones")

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
        if self.n_stored:  # not empty: append chunk by chunk
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
        """Append rows ``X`` (n, d) with ``ids`` (n,) as a new segment (the stored rows are not
        copied; see the module docstring). Device peak: the index plus the new rows (twice, for
        the scatter into list order); merging the appended segments, every ``_MAX_TAIL`` adds,
        copies those only."""
        xp = backend.device_module(self.device)
        X = xp.asarray(X, dtype=np.float32)
        ids = xp.asarray(ids, dtype=np.int64)
        if X.shape[0] == 0:
            return
        lab = self._assign(X)
        offsets = xp.zeros(self.nlist + 1, dtype=np.int64)
        offsets[1:] = xp.cumsum(xp.bincount(lab, minlength=self.nlist))
        n = X.shape[0]
        seg = _Segment(xp.empty((n, self.d), dtype=np.float32), xp.empty(n, dtype=np.int64),
                       offsets, xp.zeros(n, dtype=bool))
        pos = self._slots(lab, offsets[:-1])
        seg.vectors[pos], seg.ids[pos] = X, ids
        if self._segs[0].rows == 0 and len(self._segs) == 1:
            self._segs = [seg]
            return
        self._segs.append(seg)
        if len(self._segs) - 1 > _MAX_TAIL:
            self._segs = [self._segs[0], _merge_segments(self._segs[1:], self.nlist, self.d,
                                                         drop_dead=False)]

    def _list_of_rows(self) -> Any:
        """The list of every row of the one-array layout (merges the segments)."""
        return self._flat().list_of_rows()

    # -- search ---------------------------------------------------------------------------------
    def _probe(self, Q: Any, nprobe: int) -> Any:
        xp = backend.device_module(self.device)
        S = Q @ self.centroids.T
        keys = (self._cnorm[None, :] - 2.0 * S) if self.kind == "l2" else -S
        lists = xp.broadcast_to(xp.arange(self.nlist, dtype=np.int64), keys.shape)
        _, probe = smallest_k(keys, lists, min(nprobe, self.nlist))
        return probe

    def _candidates(self, seg: _Segment, probe: Any) -> tuple[Any, Any, Any]:
        """Flat candidate rows of a batch in one segment: (rows (T,), query of each (T,), count
        per query (mb,))."""
        xp = backend.device_module(self.device)
        mb, p = probe.shape
        starts = seg.offsets[probe].ravel()
        lens = (seg.offsets[probe + 1] - seg.offsets[probe]).ravel()
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
        mean_list = max(1.0, self.n_stored / max(self.nlist, 1))
        step = max(1, int(budget // (mean_list * max(nprobe, 1) * 2)))
        for s in range(0, Q.shape[0], step):
            yield s, Q[s : s + step]

    def _keys(self, seg: _Segment, Qb: Any, rows: Any, qidx: Any, allowed: Any) -> Any:
        xp = backend.device_module(self.device)
        keys = pair_keys(Qb, seg.vectors, qidx, rows, self.kind)
        bad = None
        if self.n_dead:
            bad = seg.dead[rows]
        if allowed is not None:
            nb = ~allowed[seg.ids[rows]]
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
            parts = [(seg, *self._candidates(seg, probe)) for seg in self._segs]
            mb = Qb.shape[0]
            total = sum(per_query for *_, per_query in parts)
            width = max(int(total.max()) if mb else 0, 1)
            K = xp.full((mb, width), xp.inf, dtype=np.float32)
            ID = xp.full((mb, width), -1, dtype=np.int64)
            before = xp.zeros(mb, dtype=np.int64)  # each query's slots taken by earlier segments
            for seg, rows, qidx, per_query in parts:
                if rows.shape[0]:
                    keys = self._keys(seg, Qb, rows, qidx, allowed)
                    first = xp.cumsum(per_query) - per_query
                    pos = before[qidx] + xp.arange(rows.shape[0]) - first[qidx]
                    K[qidx, pos] = keys
                    ID[qidx, pos] = seg.ids[rows]
                before = before + per_query
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
            hq, hk, hi = [], [], []
            for seg in self._segs:
                rows, qidx, _ = self._candidates(seg, probe)
                keys = self._keys(seg, Qb, rows, qidx, allowed)
                keep = keys <= max_key
                hq.append(qidx[keep])
                hk.append(keys[keep])
                hi.append(seg.ids[rows[keep]])
            out.extend(hits_per_query(xp.concatenate(hq), xp.concatenate(hk),
                                      xp.concatenate(hi), Qb.shape[0]))
        return out

    # -- removal --------------------------------------------------------------------------------
    def remove(self, ids: Any) -> int:
        xp = backend.device_module(self.device)
        ids = xp.asarray(ids, dtype=np.int64)
        n = 0
        for seg in self._segs:
            hit = xp.isin(seg.ids, ids) & ~seg.dead
            n += int(hit.sum())
            seg.dead |= hit
        self.n_dead += n
        if self.n_dead > _COMPACT_FRACTION * max(self.n_stored, 1):
            self.compact()
        return n

    def compact(self) -> None:
        """Drop tombstoned rows: every segment merged into one of the live rows (a copy of
        them)."""
        if not self.n_dead:
            return
        self._segs = [_merge_segments(self._segs, self.nlist, self.d, drop_dead=True)]
        self.n_dead = 0

    # -- persistence ----------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"spherical": self.spherical, "n_dead": self.n_dead}

    _FILES = ("centroids", "vectors", "ids", "offsets", "dead")

    def save(self, folder: Path) -> list[str]:
        """The one-array layout; segments are merged on the host (no device copy)."""
        if len(self._segs) > 1:
            host = [_Segment(*(backend.to_host(getattr(seg, a)) for a in _Segment.__slots__))
                    for seg in self._segs]
            flat = _merge_segments(host, self.nlist, self.d, drop_dead=False)
        else:
            flat = self._segs[0]
        arrays = {"centroids": self.centroids, "vectors": flat.vectors, "ids": flat.ids,
                  "offsets": flat.offsets, "dead": flat.dead}
        for name in self._FILES:
            np.save(folder / f"{name}.npy", backend.to_host(arrays[name]))
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

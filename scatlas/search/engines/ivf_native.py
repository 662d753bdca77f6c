"""Native IVF-Flat: one code path for CuPy (GPU) and NumPy (its CPU twin).

Structure (as faiss ``IndexIVFFlat``, Jegou, Douze & Schmid 2011; Johnson et al. 2019):

- coarse quantiser: ``nlist`` k-means centroids (:mod:`._kmeans`, trained on a sample; spherical
  when the training vectors are unit rows);
- inverted lists in SEGMENTS, each one contiguous array: ``vectors`` (m, d) float32 (or
  float16) sorted by list, ``ids`` (m,) int64, ``offsets`` (nlist + 1,) so that list ``l`` is rows
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

Lists may be stored in float16 (``list_dtype="float16"``: half the memory; every score is
accumulated in float32 from the float16 values, which are the stored vectors from then on).

Or in int8 (``list_dtype="int8"``: a quarter of the float32 bytes), as faiss
``IndexIVFScalarQuantizer`` with ``QT_8bit`` (uniform per-dimension quantiser): per dimension
``offset = (min + max) / 2`` and ``scale = (max - min) / 254`` of the training sample, codes
``clip(round((x - offset) / scale), -127, 127)``, decoded ``x^ = offset + scale * code``. The
scan scores the codes with the queries pre-scaled (``(-q * scale) . code + (-q . offset)``:
float32 accumulation, one GEMM as above), so its scores are those of the decoded vectors. With
``rerank = r > 0`` (default 4) every query keeps a shortlist of its ``r k`` best decoded scores
and re-ranks it with the exact vectors, stored beside the codes in ``refine_dtype`` (float16 by
default, or float32) in HOST memory (NumPy, also on the GPU: the candidates' rows are gathered
on the host, one more device->host read per batch); with ``rerank=0`` nothing else is stored
and the results are the exact search over the decoded vectors (faiss IVFSQ's behaviour).

Search: a LIST-MAJOR scan (as cuVS/RAFT IVF-Flat: each probed list is read once per batch, not
once per query that probes it). Per batch of queries:

1. coarse scores ``Q C^T`` -> the ``nprobe`` best lists per query (block-pruned selection, see
   :meth:`NativeIVF._probe`); the batch's (query, list) pairs are grouped by list with one
   argsort, and the number of queries of every list is read to the host;
2. a plan on the host (NumPy over lists, not over candidates): each probed list, with up to
   ``_QBLOCK`` of its queries, is one unit; units of similar shape (list length rounded up on an
   eighth-octave grid, query count on a half-octave one; a class joins the next longer one when
   the padding costs less than a step, ``_MERGE``) form a class, and each class is scored in
   steps of a few units as ONE batched GEMM ``(G, Nq, d) x (G, d, M)`` of the pre-scaled
   queries (``-q``, or ``-2q`` for l2) and the units' rows (gathered as float32, G x M rows; a
   padded list reads past its end: those columns, tombstones and filtered rows get +inf). The
   scores of the batch stay in one flat buffer; each (query, list) pair keeps its k best by
   ``partition`` (a running top-k over the pair's lists);
3. ``tau`` = each query's k-th best GEMM score over its pairs; every score within ``eps`` of
   ``tau`` (``eps`` = twice the float32 error bound of a GEMM score against the exact one:
   ``4 (d + 2) u |q| max|x|``, for l2 ``4 (d + 3) u (|q| + max|x|)^2``) is a candidate (one
   ``nonzero``);
4. the candidates (k and a few more per query) are re-scored exactly pair by pair (``-q.x`` or
   ``||q - x||^2`` summed on its own: identical vectors get bit-identical keys, whatever list,
   segment or GEMM shape they were scored in) and the k best taken by a (key, id) sort.

The device waits three times a batch, on small reads (the probe's candidate width, the queries
per list, the number of candidates); never per list or per query.

Every exact top-k member has a GEMM score within ``eps`` of ``tau``, so the result is exactly
the exact search over the probed lists (ties broken by the smaller id), as the pair-by-pair scan
that this replaced, and what faiss ``IndexIVFFlat`` returns for the same centroids and
``nprobe`` up to float rounding of the keys. Range search uses the same scan with ``tau`` =
the radius. Batches are sized so the batch's scores stay within ``_SCORES_CPU`` entries (on
the GPU: a share of the free memory, at most ``_SCORES_GPU``). CuPy's BLAS must run in float32
(not ``CUPY_TF32=1``): the error bound assumes it. On the CPU the steps run on a thread pool
(:func:`backend.cpu_threads`) with one BLAS thread each, from ``_POOL_MIN`` scores on.

Size (about 950 lines): one engine, whose segments, list-major scan, int8 codes and re-ranking
share the segment layout above; its k-means lives in :mod:`._kmeans`.
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ... import backend
from ...exceptions import ScatlasInputError
from . import hits_per_query, mismatch, pair_keys, smallest_k
from ._contract import EngineBase
from ._kmeans import assign, kmeans

_SCORES_CPU = 2**25  # (query, row) scores held per query batch (the flat score buffer)
_SCORES_GPU = 2**30  # at most; less when the device has less free memory (_score_budget)
_GPU_FREE_SHARE = 0.4  # of the free device memory for a batch's scores
_GPU_SCORE_BYTES = 12  # the score, its hit flag, the partition's copy of a step, slack
_STEP_CPU = 2**20  # floats of list rows and queries gathered per GEMM step (cache-sized)
_STEP_GPU = 2**27  # (unmeasured: few steps, few kernel launches; 512 MB gathered)
_QBLOCK_CPU = 64  # most queries of one list in one GEMM unit
_QBLOCK_GPU = 256
_PAD = 1.25  # score entries per real (query, row) pair, for sizing batches (padding)
_M_STEPS, _M_LEAST = 8, 8  # list lengths padded on an eighth-octave grid (steps >= 8)
_Q_STEPS = 2  # query counts padded on a half-octave grid (1, 2, 3, 4, 6, 8, 12, ...)
_PROBE_BLOCK = 64  # most lists per block in the probe's pruning
_POOL_MIN = 2**18  # scores (or coarse keys) from which a CPU search uses its thread pool
_MERGE_CPU = 2**12  # padded scores worth one step's fixed cost (NumPy calls, kernel launches)
_MERGE_GPU = 2**20
_U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32
# bytes each score moves, unfused: GEMM write 4 (queries pre-scaled: -q or -2q), + penalty
# 4 + 4, partition read + copy 8, band compare 4 + 1, nonzero 1 (l2: one more pass, 8)
_SCORE_BYTES = 26
_LIST_DTYPES = ("float32", "float16", "int8")
_REFINE_DTYPES = ("float16", "float32")
_Q8 = 127  # int8 codes in [-127, 127] (symmetric)
_COMPACT_FRACTION = 0.25
_NITER = 10
_MAX_TAIL = 8  # appended segments kept apart before they are merged into one
_MERGE_ROWS = 2**20  # rows scattered per step when segments are merged


class _Segment:
    """One list-sorted block of the inverted lists (see the module docstring)."""

    FIELDS = ("vectors", "ids", "offsets", "dead")
    __slots__ = ("_vectors", "ids", "_offsets", "dead", "_sqnorm", "_xmax", "_hoff", "sq",
                 "refine")

    def __init__(self, vectors: Any, ids: Any, offsets: Any, dead: Any, sq: Any = None,
                 refine: np.ndarray | None = None):
        self._vectors, self.ids, self._offsets, self.dead = vectors, ids, offsets, dead
        self._sqnorm = self._xmax = self._hoff = None
        self.sq = sq  # int8 lists: (2, d) float32 [scale; offset] on the device, else None
        self.refine = refine  # int8 with re-ranking: (m, d) exact rows on the HOST, else None

    def decoded(self, rows: Any) -> Any:
        """The stored vectors at ``rows`` (an index array or a slice) as float32: decoded
        (``offset + scale * code``) for int8 lists."""
        v = self._vectors[rows].astype(np.float32)
        if self.sq is not None:
            v *= self.sq[0]
            v += self.sq[1]
        return v

    def exact(self, rows: Any) -> Any:
        """The rows' vectors for the exact re-scoring, float32 on the device: the refine copy
        when there is one (read on the host), else :meth:`decoded`."""
        if self.refine is None:
            return self.decoded(rows)
        xp = backend.array_module(self._offsets)
        host = self.refine[backend.to_host(rows)].astype(np.float32)
        return host if xp is np else xp.asarray(host)

    # setting the vectors or the offsets drops what the scan derived from them
    def _set_vectors(self, v: Any) -> None:
        self._vectors, self._sqnorm, self._xmax = v, None, None

    def _set_offsets(self, v: Any) -> None:
        self._offsets, self._hoff = v, None

    vectors = property(lambda self: self._vectors, _set_vectors)
    offsets = property(lambda self: self._offsets, _set_offsets)

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def host_offsets(self) -> np.ndarray:
        """``offsets`` on the host (read from the device once per change)."""
        if self._hoff is None:
            self._hoff = backend.to_host(self._offsets).astype(np.int64)
        return self._hoff

    def sqnorm(self) -> Any:
        """Squared norms of the stored rows (float32, from the stored dtype), on the device."""
        if self._sqnorm is None or self._sqnorm.shape[0] != self.rows:
            xp = backend.array_module(self._offsets)
            out = xp.empty(self.rows, dtype=np.float32)
            for s in range(0, self.rows, _MERGE_ROWS):
                v = self.decoded(slice(s, s + _MERGE_ROWS))
                out[s : s + _MERGE_ROWS] = (v * v).sum(axis=1)
            self._sqnorm, self._xmax = out, None
        return self._sqnorm

    def xmax(self) -> float:
        """The largest row norm (host float; 0 when empty)."""
        if self._xmax is None or self._sqnorm is None or self._sqnorm.shape[0] != self.rows:
            sq = self.sqnorm()
            self._xmax = float(np.sqrt(float(sq.max()))) if self.rows else 0.0
        return self._xmax

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
    ref = segs[0].refine
    out = _Segment(xp.empty((n, d), dtype=segs[0].vectors.dtype), xp.empty(n, dtype=np.int64),
                   offsets, xp.zeros(n, dtype=bool), segs[0].sq,
                   None if ref is None else np.empty((n, d), dtype=ref.dtype))
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
            if out.refine is not None:
                out.refine[backend.to_host(dst[sl])] = seg.refine[backend.to_host(src[sl])]
        before = before + cnt
    return out



def _grid(n: np.ndarray, steps: int, least: int) -> np.ndarray:
    """``n`` rounded up on a grid of ``steps`` values per octave, in steps of at least
    ``least`` (``steps`` 1, ``least`` 1: the next power of two; the pad is < 1/steps)."""
    n = np.maximum(np.asarray(n, dtype=np.int64), 1)
    e = np.floor(np.log2(n)).astype(np.int64) - int(np.log2(steps))
    q = np.maximum(least, 2 ** np.maximum(e, 0))
    return -(-n // q) * q


def _row_class(m: np.ndarray) -> np.ndarray:
    """Padded list length of a GEMM unit."""
    return _grid(m, _M_STEPS, _M_LEAST)


def _query_class(n: np.ndarray) -> np.ndarray:
    """Padded query count of a GEMM unit."""
    return _grid(n, _Q_STEPS, 1)


def _groups(chunks: list, n: int) -> list[list]:
    """``chunks`` (plan steps, ``[5]`` = first score) cut into about ``n`` runs of equal scores."""
    if not chunks:
        return []
    f0 = np.array([c[5] for c in chunks], dtype=np.float64)
    cut = np.searchsorted(f0, np.linspace(0, f0[-1], n + 1)[1:-1], side="right")
    bounds = np.unique(np.concatenate([[0], cut, [len(chunks)]]))
    return [chunks[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


@functools.lru_cache(maxsize=4)
def _pool(n: int) -> ThreadPoolExecutor:
    """The scan's CPU thread pool (one per size, kept for the process)."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="scatlas-ivf")


def replayable(make_chunks, reiterable: bool):
    """``make_chunks(record)`` callable twice (the two-pass build): as given when its source
    re-reads, else one that replays the chunks read once and held in memory."""
    if reiterable:
        return make_chunks
    held = list(make_chunks(True))
    return lambda record: iter(held)  # noqa: ARG005


class NativeIVF(EngineBase):
    """IVF-Flat on one contiguous list-sorted array; see the module docstring.

    Peak device memory: the index, n (4 d + 13) bytes with float32 lists (float16: n (2 d +
    13)): vectors, int64 ids, dead flags and the scan's cached float32 squared norms, plus the
    (nlist, d) centroids. Training: the sample, its labels and the k-means assignment blocks
    (2^26 float32 scores on the CPU, 2^29 = 2 GiB on the GPU, with their negated copy). Build
    (:meth:`bulk_add`): the index, one chunk, its assignment blocks and the int32 labels of every
    row (4 n); a one-shot stream is held whole once more. :meth:`add`: the new rows and their
    labels. Merging the appended segments (past 8) or :meth:`compact`: a copy of the merged
    rows and about 40 bytes per merged row of int64 positions. Search of a batch of m queries:
    the coarse (m, nlist) scores, the flat score buffer and its hit flags (5 bytes a score,
    padding included: 2^25 scores = 160 MiB on the CPU; on the GPU up to 40% of the free memory
    at 12 bytes a score, at most 2^30 scores = 5 GiB) and one step's gathered operands and their
    partition copy (2^20 / 2^27 floats: 512 MiB on the GPU), plus the candidates. 5e7 x 128:
    26 GB for the index.
    """

    name = "native-ivf"

    def __init__(self, d: int, kind: str, nlist: int, device: str = "cpu", seed: int = 0,
                 list_dtype: Any = "float32", rerank: int = 4, refine_dtype: Any = "float16"):
        self.d, self.kind, self.nlist, self.device, self.seed = d, kind, nlist, device, seed
        try:
            dt = np.dtype(list_dtype).name
        except TypeError:
            dt = repr(list_dtype)
        if dt not in _LIST_DTYPES:
            raise ScatlasInputError(f"list_dtype must be one of {_LIST_DTYPES}, got {list_dtype!r}",
                                    param="list_dtype")
        if isinstance(rerank, bool) or not isinstance(rerank, int | np.integer) or rerank < 0:
            raise ScatlasInputError(f"rerank must be an integer >= 0 (the shortlist is rerank x k "
                                    f"per query; 0: no re-ranking), got {rerank!r}",
                                    param="rerank")
        if np.dtype(refine_dtype).name not in _REFINE_DTYPES:
            raise ScatlasInputError(f"refine_dtype must be one of {_REFINE_DTYPES}, got "
                                    f"{refine_dtype!r}", param="refine_dtype")
        self.int8 = dt == "int8"
        self.rerank = int(rerank) if self.int8 else 0
        self.refine_dtype = np.dtype(refine_dtype)
        xp = backend.device_module(device)
        self.centroids: Any = None
        self.sq: Any = None  # int8: (2, d) float32 [scale; offset], fitted with the centroids
        self.spherical = False
        self._segs = [self._segment(xp.empty((0, d), dtype=np.dtype(dt)),
                                    xp.empty(0, dtype=np.int64),
                                    xp.zeros(nlist + 1, dtype=np.int64), xp.zeros(0, dtype=bool))]
        self.n_dead = 0
        self.last_scan: dict[str, float] = {}  # work of the last search (scan_counts)

    @classmethod
    def create(cls, d: int, kind: str, nlist: int, *, device: str = "cpu",
               variant: str = "native-ivf", seed: int = 0, list_dtype: Any = "float32",
               rerank: int = 4, refine_dtype: Any = "float16") -> NativeIVF:
        return cls(d, kind, nlist, device, seed, list_dtype, rerank, refine_dtype)

    def _segment(self, vectors: Any, ids: Any, offsets: Any, dead: Any) -> _Segment:
        """A segment of this engine's layout (the int8 quantiser and refine rows attached)."""
        ref = (np.empty((int(ids.shape[0]), self.d), dtype=self.refine_dtype)
               if self.rerank else None)
        return _Segment(vectors, ids, offsets, dead, self.sq, ref)

    def set_quantizer(self, sq: Any) -> None:
        """Use a given int8 quantiser, (2, d) float32 ``[scale; offset]``."""
        xp = backend.device_module(self.device)
        sq = xp.asarray(sq, dtype=np.float32)
        if sq.shape != (2, self.d):
            raise ScatlasInputError(f"the quantiser must have shape (2, {self.d}), got "
                                    f"{sq.shape}")
        self.sq = sq
        for seg in self._segs:
            seg.sq = sq
            seg._sqnorm = None

    def fit_quantizer(self, X: Any) -> None:
        """Fit the per-dimension int8 quantiser on rows ``X`` (n, d): ``offset`` the middle of
        each dimension's range, ``scale`` its half-width / 127 (1 where the range is empty)."""
        xp = backend.array_module(X)
        lo, hi = X.min(axis=0), X.max(axis=0)
        scale = (hi - lo) / np.float32(2 * _Q8)
        scale = xp.where(scale > 0, scale, np.float32(1.0))
        self.set_quantizer(xp.stack([scale, (hi + lo) / np.float32(2.0)]).astype(np.float32))

    def _encode(self, X: Any) -> Any:
        """Rows as stored: int8 codes (fitting the quantiser on ``X`` first when there is none)
        or the float list dtype."""
        xp = backend.array_module(X)
        if not self.int8:
            return X.astype(self.list_dtype, copy=False)
        if self.sq is None:
            self.fit_quantizer(X)
        c = xp.rint((X - self.sq[1]) / self.sq[0])
        return xp.clip(c, -_Q8, _Q8).astype(np.int8)

    def _store(self, seg: _Segment, pos: Any, X: Any, ids: Any) -> None:
        """Write rows ``X`` (float32, device) with ``ids`` at rows ``pos`` of ``seg``."""
        seg.vectors[pos] = self._encode(X)
        seg.ids[pos] = ids
        if seg.refine is not None:
            seg.refine[backend.to_host(pos)] = backend.to_host(X)

    @property
    def list_dtype(self) -> np.dtype:
        """dtype of the stored list vectors (float32; float16 halves memory; int8 codes)."""
        return np.dtype(self._segs[0].vectors.dtype)

    def bytes_per_cell(self) -> float:
        """The stored vector (``d`` x its itemsize), int64 id, dead flag, float32 squared norm
        (cached by the scan): 4 d + 13 in float32, 2 d + 13 in float16, d + 13 in int8 (device
        memory) plus, with re-ranking, the host copy: 2 d (float16) or 4 d (float32)."""
        host = self.d * self.refine_dtype.itemsize if self.rerank else 0
        return float(self.d * self.list_dtype.itemsize + 13 + host)

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
                       doc="(N, d) list_dtype, list-sorted: all segments as one (see above)")
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
            raise ScatlasInputError(
                f"centroids must have shape {(self.nlist, self.d)}, got {C.shape}")
        self.centroids = xp.ascontiguousarray(C)
        self._cnorm = (self.centroids * self.centroids).sum(axis=1)
        # the probe's copy, padded to whole blocks of _PROBE_BLOCK lists (pads: key +inf)
        nb = -(-self.nlist // _PROBE_BLOCK) * _PROBE_BLOCK
        self._cpad = xp.zeros((nb, self.d), dtype=np.float32)
        self._cpad[: self.nlist] = self.centroids
        self._kpad = xp.full(nb, np.inf, dtype=np.float32)
        self._kpad[: self.nlist] = self._cnorm if self.kind == "l2" else 0.0

    def train(self, sample: Any) -> None:
        xp = backend.device_module(self.device)
        X = xp.asarray(sample, dtype=np.float32)
        norms = xp.sqrt((X * X).sum(axis=1))
        self.spherical = bool(self.kind == "ip" and float(xp.abs(norms - 1).max()) < 1e-3)
        self.set_centroids(kmeans(X, self.nlist, kind=self.kind, niter=_NITER, seed=self.seed,
                                  spherical=self.spherical))
        if self.int8:
            self.fit_quantizer(X)

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
        if self.int8 and self.sq is None:  # centroids given, not trained: fit on the data
            self.fit_quantizer(xp.asarray(next(iter(make_chunks(False)))[0], dtype=np.float32))
        seg = self._segment(xp.empty((n, self.d), dtype=self.list_dtype),
                            xp.empty(n, dtype=np.int64), xp.asarray(offsets),
                            xp.zeros(n, dtype=bool))
        self._segs = [seg]
        fill = xp.asarray(offsets[:-1].copy())
        for (X, ids), lab in zip(make_chunks(False), labels_all, strict=True):
            lab = lab.astype(np.int64)
            pos = self._slots(lab, fill)
            self._store(seg, pos, xp.asarray(X, dtype=np.float32), xp.asarray(ids))
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
        seg = self._segment(xp.empty((n, self.d), dtype=self.list_dtype),
                            xp.empty(n, dtype=np.int64), offsets, xp.zeros(n, dtype=bool))
        self._store(seg, self._slots(lab, offsets[:-1]), X, ids)
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
    def _threads(self, work: float) -> int:
        """Pool threads for ``work`` scores: :func:`backend.cpu_threads` on the CPU from
        ``_POOL_MIN`` on; 1 below (a few queries: handing steps to threads costs more than it
        saves, milliseconds when the cores are busy) and on the GPU."""
        if self.device == "gpu" or work < _POOL_MIN:
            return 1
        return backend.cpu_threads()

    @staticmethod
    def _map(fn, items: list, nt: int) -> list:
        """``[fn(x) for x in items]``, over ``nt`` pool threads when ``nt > 1`` (each on one
        BLAS thread; NumPy's GEMM, gathers and partitions release the GIL)."""
        if nt <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        return list(_pool(nt).map(backend.serial_blas_task(fn), items))

    def _probe(self, Q: Any, nprobe: int) -> Any:
        """The ``nprobe`` best lists of every query (B, nprobe), sorted by (key, list).

        Block pruning: the lists are cut in blocks (8 to ``_PROBE_BLOCK`` lists, at least
        ``4 nprobe`` blocks); the ``nprobe``-th best block minimum bounds the ``nprobe``-th best
        key (``nprobe`` distinct lists reach it), so only the keys within it (a few more than
        ``nprobe`` per query) are sorted. The same lists as a full selection, ties included; a
        partition of every key cost 3x more."""
        xp = backend.device_module(self.device)
        nt = self._threads(Q.shape[0] * self.nlist)
        step = max(64, -(-Q.shape[0] // nt))
        P = min(nprobe, self.nlist)
        bs = _PROBE_BLOCK  # a power of two dividing the padding, leaving >= 4 P blocks
        while bs > 8 and self._cpad.shape[0] // bs < 4 * P:
            bs //= 2
        nb = self._cpad.shape[0] // bs

        def block(a: int) -> Any:
            Qa = Q[a : a + step]
            if nb < 2 * P:  # few lists: select over all of them
                S = Qa @ self.centroids.T
                keys = (self._cnorm[None, :] - 2.0 * S) if self.kind == "l2" else -S
                lists = xp.broadcast_to(xp.arange(self.nlist, dtype=np.int64), keys.shape)
                return smallest_k(keys, lists, P)[1]
            S = Qa @ self._cpad.T
            keys = (self._kpad[None, :] - 2.0 * S) if self.kind == "l2" else self._kpad - S
            b = Qa.shape[0]
            bmin = keys.reshape(b, nb, bs).min(axis=2)
            tau = xp.partition(bmin, P - 1, axis=-1)[:, P - 1]
            r, c = xp.nonzero(keys <= tau[:, None])  # row-major: grouped by query
            pos = xp.arange(r.shape[0]) - xp.searchsorted(r, xp.arange(b))[r]
            width = int(pos.max()) + 1
            K = xp.full((b, width), xp.inf, dtype=np.float32)
            L = xp.full((b, width), -1, dtype=np.int64)
            K[r, pos] = keys[r, c]
            L[r, pos] = c
            return smallest_k(K, L, P)[1]

        parts = self._map(block, list(range(0, Q.shape[0], step)), nt)
        return parts[0] if len(parts) == 1 else xp.concatenate(parts)

    def _batches(self, Q: Any, nprobe: int):
        """Query batches whose scores fit the budget (estimated from the mean list size)."""
        budget = self._score_budget()
        mean_list = max(1.0, self.n_stored / max(self.nlist, 1))
        step = max(1, int(budget // (mean_list * max(nprobe, 1) * _PAD)))
        for s in range(0, Q.shape[0], step):
            yield s, Q[s : s + step]

    def _score_budget(self) -> int:
        """Scores one batch may hold: ``_SCORES_CPU``; on the GPU a share of the free device
        memory (``_GPU_FREE_SHARE``, ``_GPU_SCORE_BYTES`` a score), in [2^24, ``_SCORES_GPU``]."""
        if self.device != "gpu":
            return _SCORES_CPU
        cp = backend.gpu_module()
        free = cp.cuda.runtime.memGetInfo()[0] + cp.get_default_memory_pool().free_bytes()
        return int(min(max(free * _GPU_FREE_SHARE // _GPU_SCORE_BYTES, 2**24), _SCORES_GPU))

    def _plan(self, segs: list[_Segment], counts: np.ndarray) -> dict[str, Any]:
        """Host plan of a batch's scan (NumPy over lists, never over candidates).

        ``counts[l]``: the batch's queries probing list ``l``. A unit is one list of one segment
        with up to ``_QBLOCK`` of its queries (pairs ``qa : qa + qn`` of the list-sorted pairs)
        and rows ``r0 : r0 + m``; units are grouped in classes of equal padded shape ``(Nq, M)``
        and each class is cut into steps of at most ``_STEP`` gathered floats.
        """
        gpu = self.device == "gpu"
        qblock, step = (_QBLOCK_GPU, _STEP_GPU) if gpu else (_QBLOCK_CPU, _STEP_CPU)
        merge = _MERGE_GPU if gpu else _MERGE_CPU
        pstart = np.cumsum(counts) - counts
        parts = [np.zeros((7, 0), dtype=np.int64)]
        for s, seg in enumerate(segs):
            hoff = seg.host_offsets()
            m = np.diff(hoff)
            lists = np.flatnonzero((counts > 0) & (m > 0))
            nb = -(-counts[lists] // qblock)
            ul = np.repeat(lists, nb)
            ub = np.arange(ul.shape[0]) - np.repeat(np.cumsum(nb) - nb, nb)
            qa = pstart[ul] + ub * qblock
            qn = np.minimum(qblock, counts[ul] - ub * qblock)
            parts.append(np.stack([np.full(ul.shape[0], s), _row_class(m[ul]), _query_class(qn), qa,
                                   qn, hoff[ul], m[ul]]).astype(np.int64))
        units = np.concatenate(parts, axis=1)
        units = units[:, np.lexsort((units[1], units[2], units[0]))]  # by (segment, Nq, M)
        cls = units[:3]
        new = np.ones(units.shape[1], dtype=bool)
        new[1:] = (cls[:, 1:] != cls[:, :-1]).any(axis=0)
        starts = np.flatnonzero(new).tolist()
        ends = [*starts[1:], units.shape[1]]
        # a class joins the next longer one of its (segment, Nq) when padding its units to that
        # length costs fewer scores than a step's fixed cost (a few queries: a few steps)
        merged: list[list[int]] = []  # [first unit, end unit, segment, M, Nq]
        for a, b in zip(starts, ends, strict=True):
            s, mm, nn = (int(v) for v in cls[:, a])
            last = merged[-1] if merged else None
            if (last is not None and last[2] == s and last[4] == nn
                    and (last[1] - last[0]) * nn * (mm - last[3]) < merge):
                last[1], last[3] = b, mm
            else:
                merged.append([a, b, s, mm, nn])
        chunks, f0 = [], 0  # (segment, M, Nq, first unit, end unit, first score)
        for a, b, s, mm, nn in merged:
            units[1, a:b] = mm
            per = max(1, step // ((mm + nn) * self.d))
            for u in range(a, b, per):
                v = min(b, u + per)
                chunks.append((s, mm, nn, u, v, f0))
                f0 += (v - u) * nn * mm
        return {"units": units[3:], "chunks": chunks, "n_scores": f0,
                "rows": int(units[1].sum()), "rows_real": int(units[6].sum()),
                "real": int((units[4] * units[6]).sum())}

    def _scan(self, Qb: Any, probe: Any, k: int, allowed: Any, radius: float | None = None):
        """The list-major scan of one batch (module docstring, steps 1-4): the exact candidates
        -- the k best per query (``radius`` None; possibly more, within eps of the k-th) or
        every one with key <= ``radius`` + eps -- as flat arrays (query index, exact key, id)."""
        xp = backend.device_module(self.device)
        B, P = probe.shape
        T = B * P
        segs = [seg for seg in self._segs if seg.rows]
        pl = probe.ravel()
        order = xp.argsort(pl, kind="stable")
        # step 1: the one device->host read before the scan (queries per list)
        counts = backend.to_host(xp.bincount(pl, minlength=self.nlist)).astype(np.int64)
        plan = self._plan(segs, counts)
        chunks = plan["chunks"]
        units = xp.asarray(plan["units"])  # (4, U): qa, qn, r0, m
        u_qa, u_qn, u_r0, u_m = units[0], units[1], units[2], units[3]
        pq = xp.concatenate([order // P, xp.zeros(1, dtype=order.dtype)])  # query of each pair
        dest = xp.concatenate([order, xp.full(1, T, dtype=order.dtype)])  # its row in tops
        qsq = (Qb * Qb).sum(axis=1)
        Qs = Qb * np.float32(-2.0 if self.kind == "l2" else -1.0)  # GEMM gives the key term
        qadd = qsq if self.kind == "l2" else None  # per-query term added to every score
        if self.int8:  # scores of the decoded rows: (Qs * scale) . code + Qs . offset
            qoff = Qs @ self.sq[1]
            qadd = qoff if qadd is None else qadd + qoff
            Qs = Qs * self.sq[0]
        kk = k * self.rerank if self.rerank else k  # the shortlist re-ranked per query
        scores = xp.empty(plan["n_scores"], dtype=np.float32)
        tops = None if radius is not None else xp.full((len(segs), T + 1, kk), xp.inf,
                                                         dtype=np.float32)
        span = max([1] + [max(c[1], c[2]) for c in chunks])
        ar = xp.arange(span, dtype=np.int64)
        inf, zero = np.float32(np.inf), np.float32(0)

        def pairs_of(u0: int, u1: int, nn: int) -> Any:  # (G, Nq) pair slots; padding -> T
            return xp.where(ar[None, :nn] < u_qn[u0:u1, None], u_qa[u0:u1, None] + ar[:nn], T)

        def score(ch: tuple) -> None:  # step 2: one batched GEMM
            s, mm, nn, u0, u1, f0 = ch
            seg, g = segs[s], u1 - u0
            qp = pairs_of(u0, u1, nn)
            ridx = xp.minimum(u_r0[u0:u1, None] + ar[:mm], seg.rows - 1)
            X = seg.vectors[ridx]
            if X.dtype != np.float32:
                X = X.astype(np.float32)
            S = scores[f0 : f0 + g * nn * mm].reshape(g, nn, mm)
            xp.matmul(Qs[pq[qp]], X.transpose(0, 2, 1), out=S)
            pen = xp.where(ar[None, :mm] < u_m[u0:u1, None], zero, inf)
            if self.n_dead:
                pen = pen + xp.where(seg.dead[ridx], inf, zero)
            if allowed is not None:
                pen = pen + xp.where(allowed[seg.ids[ridx]], zero, inf)
            if self.kind == "l2":
                S += (seg.sqnorm()[ridx] + pen)[:, None, :]
            else:
                S += pen[:, None, :]
            if qadd is not None:
                S += qadd[pq[qp]][:, :, None]
            if tops is not None:  # the pair's kk best (a running top-kk over its lists)
                top = xp.partition(S, kk - 1, axis=-1)[..., :kk] if mm > kk else S
                tops[s, dest[qp], : top.shape[-1]] = top

        nt = self._threads(plan["n_scores"])
        groups = _groups(chunks, 4 * nt)
        self._map(lambda grp: [score(ch) for ch in grp], groups, nt)
        # step 3: each query's threshold, then every score within eps of it
        xmax = max([seg.xmax() for seg in segs] + [0.0])
        qerr = 0.0  # int8 with re-ranking, range search: |key(x) - key(x^)| of in-range rows
        if self.int8:  # the GEMM sums scale * code and the offset: bound with both norms
            onorm = float(xp.sqrt((self.sq[1] * self.sq[1]).sum()))
            if self.rerank and radius is not None:
                qerr = 0.5 * float(xp.sqrt((self.sq[0] * self.sq[0]).sum()))
            xmax = xmax + 2.0 * onorm
        qn = xp.sqrt(qsq)
        if self.kind == "l2":
            eps = 4.0 * (self.d + 3) * _U32 * (qn + xmax) ** 2 + (2 * (qn + xmax) + qerr) * qerr
        else:
            eps = 4.0 * (self.d + 2) * _U32 * qn * xmax + qn * qerr
        if tops is not None:
            W = tops[:, :T].reshape(len(segs), B, P * kk).transpose(1, 0, 2).reshape(B, -1)
            tau = xp.partition(W, kk - 1, axis=-1)[:, kk - 1]
        else:
            tau = xp.full(B, radius, dtype=np.float32)
        big = np.float32(np.finfo(np.float32).max)
        thr = xp.where(xp.isfinite(tau), (tau + eps).astype(np.float32), big)
        thr = xp.concatenate([thr[pq[:T]], xp.full(1, -np.inf, dtype=np.float32)])  # per pair
        hit = xp.empty(plan["n_scores"], dtype=bool)

        def band(grp: list) -> None:
            for _, mm, nn, u0, u1, f0 in grp:
                sl = slice(f0, f0 + (u1 - u0) * nn * mm)
                xp.less_equal(scores[sl].reshape(-1, nn, mm),
                              thr[pairs_of(u0, u1, nn)][:, :, None],
                              out=hit[sl].reshape(-1, nn, mm))

        self._map(band, groups, nt)
        f = xp.flatnonzero(hit)  # the second device->host read (the number of candidates)
        # step 4: the candidates' exact keys
        meta = np.array([[c[5], c[1], c[2], c[3], c[0]] for c in chunks] or
                        np.zeros((0, 5)), dtype=np.int64).T
        c_f0, c_m, c_n, c_u0, c_s = xp.asarray(meta)
        c = xp.searchsorted(c_f0, f, side="right") - 1
        loc = f - c_f0[c]
        per = c_n[c] * c_m[c]
        u = c_u0[c] + loc // per
        i, j = (loc % per) // c_m[c], (loc % per) % c_m[c]
        query = pq[u_qa[u] + i]
        row = u_r0[u] + j
        if len(segs) == 1:
            X, ids = segs[0].exact(row), segs[0].ids[row]
        else:
            cs = c_s[c]
            X = xp.zeros((f.shape[0], self.d), dtype=np.float32)
            ids = xp.zeros(f.shape[0], dtype=np.int64)
            for s, seg in enumerate(segs):
                mine = cs == s
                r = xp.where(mine, row, 0)
                X = xp.where(mine[:, None], seg.exact(r), X)
                ids = xp.where(mine, seg.ids[r], ids)
        keys = pair_keys(Qb, X, query, xp.arange(f.shape[0]), self.kind)
        self._count(B, T, plan, int(f.shape[0]), segs)
        return query, keys, ids

    def _count(self, B: int, T: int, plan: dict[str, Any], n_cand: int,
               segs: list[_Segment]) -> None:
        """Add one batch's work to :attr:`last_scan` (see :meth:`scan_counts`)."""
        d, item = self.d, (segs[0].vectors.dtype.itemsize if segs else 4)
        c = self.last_scan
        add = {"queries": B, "pairs": T, "lists_read": plan["units"].shape[1],
               "rows_read": plan["rows"], "rows_real": plan["rows_real"],
               "scores": plan["n_scores"],
               "real_scores": plan["real"], "candidates": n_cand,
               "coarse_flops": 2.0 * B * self.nlist * d,
               "scan_flops": 2.0 * plan["n_scores"] * d,
               "exact_flops": 2.0 * n_cand * d,
               "list_bytes": float(plan["rows"]) * d * item,
               "gather_bytes": float(plan["rows"]) * d * 4 * 2,
               "score_bytes": float(plan["n_scores"]) * (_SCORE_BYTES + 8 * (self.kind == "l2")),
               "other_bytes": float(self.nlist * d * 4 + 2 * B * d * 4
                                    + n_cand * (d * (4 + self._exact_item()) + 32))}
        for key, v in add.items():
            c[key] = c.get(key, 0.0) + float(v)

    def _exact_item(self) -> int:
        """Bytes per dimension of the rows the exact re-scoring reads."""
        return self.refine_dtype.itemsize if self.rerank else self.list_dtype.itemsize

    def scan_counts(self) -> dict[str, float]:
        """Work of the last :meth:`search` / :meth:`range_search` call, summed over its batches:
        ``queries``, ``pairs`` (query, list), ``lists_read`` (GEMM units), ``rows_read`` (list
        rows read, padding included), ``scores`` (GEMM entries, padding included),
        ``rows_real`` (without padding), ``real_scores``, ``candidates`` (re-scored exactly),
        flops (``coarse_flops``, ``scan_flops``, ``exact_flops``) and bytes: ``list_bytes``
        (every probed list read once per batch: the compulsory traffic), ``gather_bytes`` (the
        float32 copy of the gathered rows, written and read by the GEMM), ``score_bytes`` (each
        score's passes, unfused: ``_SCORE_BYTES``) and ``other_bytes`` (centroids, queries,
        candidates). Bytes touched, not DRAM traffic: on the CPU the steps are cache-sized. A
        roofline reads these against the call's time."""
        return dict(self.last_scan)

    def search(self, Q: Any, k: int, nprobe: int, allowed: Any = None) -> tuple[Any, Any]:
        xp = backend.device_module(self.device)
        Q = xp.asarray(Q, dtype=np.float32)
        allowed = None if allowed is None else xp.asarray(allowed)
        self.last_scan = {}
        out_k, out_i = [], []
        with self._serial():
            for _, Qb in self._batches(Q, nprobe):
                B = Qb.shape[0]
                K = xp.full((B, k + 1), xp.inf, dtype=np.float32)  # column k takes ranks >= k
                ID = xp.full((B, k + 1), -1, dtype=np.int64)
                if self.n_stored and B:
                    query, keys, ids = self._scan(Qb, self._probe(Qb, nprobe), k, allowed)
                    o = xp.lexsort(xp.stack([ids.astype(np.float64), keys.astype(np.float64),
                                             query.astype(np.float64)]))
                    qs = query[o]
                    rank = xp.minimum(xp.arange(qs.shape[0]) - xp.searchsorted(qs, qs), k)
                    K[qs, rank] = keys[o]
                    ID[qs, rank] = ids[o]
                out_k.append(K[:, :k])
                out_i.append(xp.where(xp.isfinite(K[:, :k]), ID[:, :k], -1))
        if not out_k:
            return xp.full((0, k), xp.inf, dtype=np.float32), xp.full((0, k), -1, dtype=np.int64)
        return xp.concatenate(out_k), xp.concatenate(out_i)

    def range_search(self, Q: Any, max_key: float, nprobe: int, allowed: Any = None):
        xp = backend.device_module(self.device)
        Q = xp.asarray(Q, dtype=np.float32)
        allowed = None if allowed is None else xp.asarray(allowed)
        self.last_scan = {}
        out = []
        with self._serial():
            for _, Qb in self._batches(Q, nprobe):
                if not self.n_stored:
                    none = (xp.zeros(0, dtype=np.float32), xp.zeros(0, dtype=np.int64))
                    out.extend([none] * Qb.shape[0])
                    continue
                query, keys, ids = self._scan(Qb, self._probe(Qb, nprobe), 1, allowed,
                                              radius=float(max_key))
                keep = keys <= max_key
                out.extend(hits_per_query(query[keep], keys[keep], ids[keep], Qb.shape[0]))
        return out

    def _serial(self):
        """One BLAS thread during a CPU search (the scan's own pool runs the threads)."""
        return contextlib.nullcontext() if self.device == "gpu" else backend.serial_blas()

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
        out = {"spherical": self.spherical, "n_dead": self.n_dead,
               "list_dtype": self.list_dtype.name}
        if self.int8:
            out.update(rerank=self.rerank, refine_dtype=self.refine_dtype.name)
        return out

    _FILES = ("centroids", "vectors", "ids", "offsets", "dead")

    def _files(self) -> tuple[str, ...]:
        """The saved arrays: int8 lists add ``quantizer`` ((2, d) [scale; offset]) and, with
        re-ranking, ``refine`` ((N, d) exact rows in list order)."""
        extra = ("quantizer",) * self.int8 + ("refine",) * bool(self.rerank)
        return self._FILES + extra

    def save(self, folder: Path) -> list[str]:
        """The one-array layout; segments are merged on the host (no device copy)."""
        if len(self._segs) > 1:
            host = [_Segment(*(backend.to_host(getattr(seg, a)) for a in _Segment.FIELDS),
                             None, seg.refine) for seg in self._segs]
            flat = _merge_segments(host, self.nlist, self.d, drop_dead=False)
        else:
            flat = self._segs[0]
        arrays = {"centroids": self.centroids, "vectors": flat.vectors, "ids": flat.ids,
                  "offsets": flat.offsets, "dead": flat.dead, "quantizer": self.sq,
                  "refine": flat.refine}
        for name in self._files():
            np.save(folder / f"{name}.npy", backend.to_host(arrays[name]))
        return [f"{name}.npy" for name in self._files()]

    @classmethod
    def load(cls, folder: Path, meta: dict[str, Any], device: str) -> NativeIVF:
        xp = backend.device_module(device)
        em = meta.get("engine_meta", {})
        probe = cls(1, meta["kind"], 1, "cpu", list_dtype=em.get("list_dtype", "float32"),
                    rerank=int(em.get("rerank", 0)),
                    refine_dtype=em.get("refine_dtype", "float16"))
        arrays = {name: np.load(folder / f"{name}.npy") for name in probe._files()}
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
        if arrays["vectors"].dtype.name not in _LIST_DTYPES:
            raise mismatch(folder, "vectors dtype", arrays["vectors"].dtype, _LIST_DTYPES)
        if arrays["vectors"].dtype != probe.list_dtype:
            raise mismatch(folder, "vectors dtype", arrays["vectors"].dtype, probe.list_dtype)
        ref = arrays.get("refine")
        if ref is not None and (ref.shape != (n, d) or ref.dtype != probe.refine_dtype):
            raise mismatch(folder, "refine rows", (ref.shape, ref.dtype),
                           ((n, d), probe.refine_dtype))
        eng = cls(d, meta["kind"], nlist, device, list_dtype=arrays["vectors"].dtype,
                  rerank=probe.rerank, refine_dtype=probe.refine_dtype)
        eng.set_centroids(arrays["centroids"])
        if eng.int8:
            eng.set_quantizer(arrays["quantizer"])
        eng._segs = [_Segment(xp.asarray(arrays["vectors"]), xp.asarray(arrays["ids"]),
                              xp.asarray(arrays["offsets"]), xp.asarray(arrays["dead"]), eng.sq,
                              ref)]
        eng.n_dead = int(arrays["dead"].sum())
        eng.spherical = bool(meta.get("engine_meta", {}).get("spherical", False))
        return eng

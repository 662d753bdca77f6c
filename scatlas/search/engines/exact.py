"""Exact blocked search: the ground truth and the small-data default engine.

Algorithm (as faiss ``IndexFlat``, Johnson, Douze & Jegou 2019, with an exact re-ranking as in
:mod:`scatlas.kernels.neighbors`): query rows in blocks; for each block the stored vectors are
visited in row blocks, each block's ranking keys come from one GEMM (``-Q X^T``, or ``||x||^2 -
2 Q X^T`` for euclidean), filtered rows get +inf, and the block's best ``k + 8`` (all ties at the
cut included) merge into a running candidate list. The candidates are then re-scored pair by pair
(exact keys, independent of the GEMM's tiling) and sorted on (key, id), so equal distances are
ordered by the smaller id and results do not depend on the query batch.

Vectors live in one (n, d) float32 array (NumPy or CuPy); :meth:`ExactEngine.remove` deletes rows
(a copy), :meth:`add` appends (a copy): this engine is meant for up to a few million cells.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import numpy as np

from ... import backend
from . import hits_per_query, pair_keys, smallest_k
from ._contract import EngineBase

SLACK = 8
_BLOCK_SCORES = 32 * 2**20  # scores per block in range search on the CPU
_REF_ROWS = 8192  # reference rows per block (x8 on the GPU)
_QUERY_ROWS = 1024


_FEW_QUERIES = 32  # up to this many query rows the CPU GEMM runs on one BLAS thread


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return None
    return ThreadpoolController()


def _one_blas_thread(Q: Any):
    """Single-threaded BLAS for a few query rows on the CPU: a matrix-vector product is
    memory-bound and waking BLAS threads costs more than it saves (milliseconds when the cores
    are busy)."""
    ctl = _blas_controller()
    if ctl is None or backend.is_gpu_array(Q) or Q.shape[0] > _FEW_QUERIES:
        return contextlib.nullcontext()
    return ctl.limit(limits=1, user_api="blas")



def blocked_topk(Q: Any, X: Any, k: int, kind: str, *, ids: Any = None, allowed_rows: Any = None,
                 sqnorms: Any = None, progress_bar: Any = None) -> tuple[Any, Any]:
    """Exact k best rows of ``X`` for every row of ``Q``: (keys (m, k) float32, ids (m, k) int64).

    ``X`` may be a NumPy memmap (read block by block) or a CuPy array (``Q`` then too);
    ``ids`` maps rows to ids (default: the row numbers); ``allowed_rows`` is a boolean mask over
    rows; ``sqnorms`` the precomputed ``||x||^2`` for euclidean. Keys are exact pair keys
    (``-q.x`` or ``||q - x||^2``), padded with (+inf, -1) when fewer than k rows qualify.
    """
    xp = backend.array_module(Q)
    m, n = Q.shape[0], X.shape[0]
    kk = min(k + SLACK, max(n, 1))
    gpu = xp is not np
    br = _REF_ROWS * (8 if gpu else 1)
    bq = _QUERY_ROWS * (8 if gpu else 1)
    best_k = xp.full((m, kk), xp.inf, dtype=np.float32)
    best_r = xp.full((m, kk), -1, dtype=np.int64)
    for rs in range(0, n, br):
        re_ = min(n, rs + br)
        Xb = xp.asarray(X[rs:re_], dtype=np.float32)
        if kind == "l2":
            nb = sqnorms[rs:re_] if sqnorms is not None else (Xb * Xb).sum(axis=1)
            nb = xp.asarray(nb, dtype=np.float32)
        mask = None if allowed_rows is None else xp.asarray(allowed_rows[rs:re_])
        for qs in range(0, m, bq):
            qe = min(m, qs + bq)
            S = Q[qs:qe] @ Xb.T
            S = (nb[None, :] - 2.0 * S) if kind == "l2" else -S
            if mask is not None:
                S[:, ~mask] = xp.inf
            _merge_block(S, rs, best_k, best_r, qs, qe, kk)
        if progress_bar is not None:
            progress_bar.update(re_ - rs)
    # exact re-ranking of the candidates
    valid = best_r >= 0
    qrows = xp.broadcast_to(xp.arange(m)[:, None], best_r.shape)[valid]
    rr = best_r[valid]
    exact = xp.full(best_r.shape, xp.inf, dtype=np.float32)
    if rr.size:
        Xg = xp.asarray(X[rr], dtype=np.float32)
        exact[valid] = pair_keys(Q, Xg, qrows, xp.arange(rr.shape[0]), kind)
    out_ids = best_r if ids is None else xp.where(valid, ids[xp.maximum(best_r, 0)], -1)
    return smallest_k(exact, out_ids, k)


def _merge_block(S: Any, rs: int, best_k: Any, best_r: Any, qs: int, qe: int, kk: int) -> None:
    """Merge one block of keys (rows qs:qe, reference rows rs:) into the running best lists.

    Only keys <= the row's current kk-th best can enter; when every row has few such keys they
    are gathered by a compare and a nonzero (no partition of the whole block)."""
    xp = backend.array_module(S)
    thr = best_k[qs:qe, kk - 1]
    inside = S <= thr[:, None]
    cnt = inside.sum(axis=1)
    width = int(cnt.max()) if cnt.shape[0] else 0
    if width == 0:
        return
    if width > max(4 * kk, 64) or width * 4 > S.shape[1]:  # dense: partition the block
        cand_k = S
        cand_r = xp.broadcast_to(xp.arange(rs, rs + S.shape[1], dtype=np.int64), S.shape)
    else:
        r, c = xp.nonzero(inside)  # row-major: rows ascend
        first = xp.cumsum(cnt) - cnt
        pos = xp.arange(r.shape[0]) - first[r]
        cand_k = xp.full((S.shape[0], width), xp.inf, dtype=np.float32)
        cand_r = xp.full((S.shape[0], width), -1, dtype=np.int64)
        cand_k[r, pos] = S[r, c]
        cand_r[r, pos] = c + rs
    keys = xp.concatenate([best_k[qs:qe], cand_k], axis=1)
    rows = xp.concatenate([best_r[qs:qe], cand_r], axis=1)
    best_k[qs:qe], best_r[qs:qe] = smallest_k(keys, rows, kk)


class ExactEngine(EngineBase):
    """Brute-force engine over one contiguous (n, d) float32 array.

    Peak device memory: the index, n (4 d + 12) bytes (vectors, int64 ids, float32 squared
    norms); a build of known size fills one preallocated copy, every later :meth:`add` or
    :meth:`remove` copies the index (twice the index for a moment). A search of m queries
    (:func:`blocked_topk`) holds the (m, k + 8) running lists and one block of float32 scores
    of at most 1,024 x 8,192 (GPU: 8,192 x 65,536 = 2 GiB); the block where a row's threshold
    is still open (the first one) is merged whole, with its keys and int64 ids concatenated and
    partitioned: about 27 bytes per score (measured on the CPU,
    tests/kernels/test_kernel_memory.py), 230 MB on the CPU, up to ~14.5 GB on the GPU for
    8,192 or more queries at once (~0.18 GB per 100 queries).
    """

    name = "exact"
    nlist = None
    is_trained = True

    def __init__(self, d: int, kind: str, device: str = "cpu"):
        self.d, self.kind, self.device = d, kind, device
        xp = backend.device_module(device)
        self.X = xp.empty((0, d), dtype=np.float32)
        self.ids = xp.empty(0, dtype=np.int64)
        self.sqnorms = xp.empty(0, dtype=np.float32)

    @classmethod
    def create(cls, d: int, kind: str, nlist: int | None = None, *, device: str = "cpu",
               variant: str = "exact", seed: int = 0) -> ExactEngine:
        return cls(d, kind, device)

    @property
    def ntotal(self) -> int:
        return int(self.X.shape[0])

    def bytes_per_cell(self) -> float:
        """4 d (float32 vector) + 8 (int64 id) + 4 (float32 squared norm)."""
        return 4.0 * self.d + 12.0

    def reserve(self, n: int) -> None:
        """Pre-allocate for a build of known size (one copy of the data, filled in place)."""
        xp = backend.device_module(self.device)
        self._buf = xp.empty((n, self.d), dtype=np.float32)
        self._buf_ids = xp.empty(n, dtype=np.int64)
        self._fill = 0

    def add(self, X: Any, ids: Any) -> None:
        xp = backend.device_module(self.device)
        X = xp.asarray(X, dtype=np.float32)
        ids = xp.asarray(ids, dtype=np.int64)
        buf = getattr(self, "_buf", None)
        if buf is not None and self._fill + X.shape[0] <= buf.shape[0] and self.ntotal == 0:
            buf[self._fill : self._fill + X.shape[0]] = X
            self._buf_ids[self._fill : self._fill + X.shape[0]] = ids
            self._fill += X.shape[0]
            if self._fill == buf.shape[0]:
                self.X, self.ids = buf, self._buf_ids
                del self._buf, self._buf_ids
                self.sqnorms = (self.X * self.X).sum(axis=1)
            return
        self.finish()
        self.X = xp.concatenate([self.X, X])
        self.ids = xp.concatenate([self.ids, ids])
        self.sqnorms = xp.concatenate([self.sqnorms, (X * X).sum(axis=1)])

    def finish(self) -> None:
        """Close a reserved build that received fewer rows than reserved."""
        buf = getattr(self, "_buf", None)
        if buf is not None:
            self.X, self.ids = buf[: self._fill], self._buf_ids[: self._fill]
            del self._buf, self._buf_ids
            self.sqnorms = (self.X * self.X).sum(axis=1)

    def _allowed_rows(self, allowed: Any) -> Any:
        if allowed is None:
            return None
        xp = backend.device_module(self.device)
        return xp.asarray(allowed)[self.ids]

    def search(self, Q: Any, k: int, nprobe: int | None = None, allowed: Any = None):
        with _one_blas_thread(Q):
            return blocked_topk(Q, self.X, k, self.kind, ids=self.ids,
                                allowed_rows=self._allowed_rows(allowed), sqnorms=self.sqnorms)

    def range_search(self, Q: Any, max_key: float, nprobe: int | None = None,
                     allowed: Any = None) -> list[tuple[Any, Any]]:
        xp = backend.device_module(self.device)
        rows_ok = self._allowed_rows(allowed)
        out = []
        step = max(1, _BLOCK_SCORES // max(self.ntotal, 1))
        for qs in range(0, Q.shape[0], step):
            Qb = Q[qs : qs + step]
            S = Qb @ self.X.T
            S = (self.sqnorms[None, :] - 2.0 * S + (Qb * Qb).sum(axis=1)[:, None]
                 if self.kind == "l2" else -S)
            # candidates by the GEMM with a small margin, then exact pair keys decide
            margin = 1e-4 * (1.0 + abs(float(max_key)))
            hit = S <= max_key + margin
            if rows_ok is not None:
                hit &= rows_ok[None, :]
            qi, ri = xp.nonzero(hit)
            keys = pair_keys(Qb, self.X, qi, ri, self.kind)
            keep = keys <= max_key
            out.extend(hits_per_query(qi[keep], keys[keep], self.ids[ri[keep]], Qb.shape[0]))
        return out

    def remove(self, ids: Any) -> int:
        self.finish()
        xp = backend.device_module(self.device)
        drop = xp.isin(self.ids, xp.asarray(ids, dtype=np.int64))
        n = int(drop.sum())
        if n:
            keep = ~drop
            self.X, self.ids, self.sqnorms = self.X[keep], self.ids[keep], self.sqnorms[keep]
        return n

    def save(self, folder: Path) -> list[str]:
        self.finish()
        np.save(folder / "vectors.npy", backend.to_host(self.X))
        np.save(folder / "ids.npy", backend.to_host(self.ids))
        return ["vectors.npy", "ids.npy"]

    @classmethod
    def load(cls, folder: Path, meta: dict[str, Any], device: str) -> ExactEngine:
        eng = cls(int(meta["dim"]), meta["kind"], device)
        xp = backend.device_module(device)
        eng.X = xp.asarray(np.load(folder / "vectors.npy"))
        eng.ids = xp.asarray(np.load(folder / "ids.npy"))
        eng.sqnorms = (eng.X * eng.X).sum(axis=1)
        return eng

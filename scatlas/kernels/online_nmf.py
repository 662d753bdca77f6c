"""Online iNMF (Gao et al., Nat Biotechnol 2021): LIGER's integrative NMF on mini-batches.

Three scenarios, as rliger's ``runOnlineINMF`` / RcppPlanc's ``onlineINMF``:

1. :func:`online_inmf` on all datasets: the cells are visited in mini-batches for
   ``max_epochs`` epochs, keeping only the running sufficient statistics ``A_i`` (k x k) and
   ``B_i`` (genes x k) per dataset, so memory does not grow with the number of cells.
2. :func:`online_inmf` with ``reference=`` a previous result: new datasets refine ``W`` without
   revisiting old cells; old datasets contribute their frozen ``A_i``, ``B_i``, ``V_i`` to every
   ``W`` update.
3. :func:`project_inmf`: new data projected onto a fixed ``W``:
   ``H = argmin_{H >= 0} ||X - H W^T||`` (``V_new = 0``), chunk by chunk.

Algorithm (libplanc ``nmf/onlineinmf.hpp``, ``ONLINEINMF``), per iteration ``t`` (1-based) and
new dataset ``i`` with its mini-batch ``X`` (``b_i`` cells x genes)::

    H    = BPP-NNLS, Gram (W + V_i)^T (W + V_i) + lam V_i^T V_i, rhs X (W + V_i)
    s    = 0 (t = 1), 1 / b_i (t = 2), (t - 2) / (t - 1) (t > 2)
    at the first iteration of a new epoch (epoch > 0): A_i -= A_old_i; A_old_i = s A_i (same B)
    otherwise: A_old_i *= s; B_old_i *= s
    A_i  = s A_i + H^T H / b_i    (a zero diagonal entry becomes 1e-15)
    B_i  = s B_i + X^T H / b_i
    then ``hals_iter`` HALS sweeps over j = 1..k, W first (all datasets), then each new V_i:
    W[:, j]   += sum_i (B_i[:, j] - (W + V_i) A_i[:, j]) / sum_i A_i[j, j]
    V_i[:, j] += (B_i[:, j] - (W + (1 + lam) V_i) A_i[:, j]) / ((1 + lam) A_i[j, j])
    negative entries are set to 1e-16

Mini-batch sizes ``b_i = round(n_i / sum(n_new) * minibatch_size)``; cells are visited in a random
order of contiguous chunks of ``chunk_size`` cells (reshuffled every epoch); the run stops when the
first new dataset completes ``max_epochs`` epochs, and a short last mini-batch is dropped. At the
end every ``H_i`` is recomputed exactly (BPP) with the final ``W``, ``V_i``, chunk by chunk, and
the objective (LIGER's, as :func:`scatlas.kernels.nmf.inmf`) is evaluated once.

Init (libplanc ``initW2``, ``sampleV``): ``W ~ U(0, 2)`` and ``V_i`` = the expression of ``k``
random cells of dataset ``i``, both with L2-normalised columns; ``A_i = B_i = 0``.

Inputs (cells x genes, non-negative, same genes): a NumPy / SciPy sparse / CuPy matrix; any
row-sliceable object with ``.shape`` whose ``X[a:b]`` returns a matrix (an ``h5py`` dataset, a
backed AnnData ``X``, a ``numpy.memmap``), read in contiguous row ranges only, so it need not fit in
memory; or a list of chunk matrices (cells split across chunks). For streamed inputs the chunks of
the sampling order are ``chunk_size`` rows (list input: the given chunks).

Deviations from libplanc: the random streams are NumPy's (same distributions, not the same
draws); BPP warm starts are not used for mini-batches (each is new data), as libplanc.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import backend
from .._params import NONNEGATIVE, POSITIVE_INT, SEED, validate_params
from .._progress import bar
from .._validate import ScatlasInputError, check_matrix, check_positive_int, check_rank
from .nnls import bpp_rows

__all__ = ["OnlineINMFResult", "online_inmf", "project_inmf"]

#: Floors used by libplanc: clamped HALS entries and empty diagonal entries of A_i.
_HALS_FLOOR = 1e-16
_A_DIAG_FLOOR = 1e-15
#: Cells per block when H is solved for whole datasets at the end (bounds memory).
_SOLVE_BLOCK = 16384


@dataclass
class OnlineINMFResult:
    """Online iNMF factors and sufficient statistics (old datasets first, then new ones).

    Attributes
    ----------
    W
        (genes, k) shared metagenes.
    V
        List of (genes, k) dataset-specific metagenes.
    H
        List of (cells_i, k) loadings, recomputed with the final W, V_i; ``None`` for an old
        dataset whose data were not given again (scenario 2 without ``reference_Xs``).
    A
        List of (k, k) running statistics ``sum h h^T`` (scaled), one per dataset.
    B
        List of (genes, k) running statistics ``sum x h^T`` (scaled), one per dataset.
    objective
        LIGER's objective over the datasets whose H is known (float), computed once at the end.
    n_iter
        Mini-batch iterations run.
    epochs
        Epochs completed by the first new dataset.
    minibatch_sizes
        Cells per mini-batch of each new dataset.
    seed
        The seed used.
    lam
        The penalty.
    """

    W: Any
    V: list[Any]
    H: list[Any | None]
    A: list[Any]
    B: list[Any]
    objective: float
    n_iter: int
    epochs: int
    minibatch_sizes: list[int]
    seed: int
    lam: float
    n_new: int = field(default=0)


# --------------------------------------------------------------------------------------------
# data sources
# --------------------------------------------------------------------------------------------


def _is_matrix(X: Any) -> bool:
    return backend.issparse(X) or isinstance(X, np.ndarray) or backend.is_gpu_array(X)


class _Source:
    """Row access to one dataset: an in-memory matrix, a row-sliceable store or a chunk list."""

    def __init__(self, X: Any, name: str, xp: Any, dtype: np.dtype, chunk_size: int) -> None:
        self.name, self.xp, self.dtype = name, xp, dtype
        if _is_matrix(X):
            check_matrix(X, name, nonnegative=True)
            self.kind = "memory"
            self.X = X.tocsr() if backend.issparse(X) and X.format != "csr" else X
            self.n, self.m = X.shape
            self.bounds = _ranges(self.n, chunk_size)
        elif isinstance(X, list | tuple):
            if not X:
                raise ScatlasInputError(f"{name} is an empty list of chunks")
            widths = {int(c.shape[1]) for c in X}
            if len(widths) != 1:
                raise ScatlasInputError(f"the chunks of {name} have different widths {widths}")
            self.kind = "chunks"
            self.X = list(X)
            sizes = np.array([c.shape[0] for c in X], dtype=np.int64)
            self.offsets = np.concatenate([[0], np.cumsum(sizes)])
            self.n, self.m = int(self.offsets[-1]), widths.pop()
            self.bounds = [(int(a), int(b)) for a, b in zip(self.offsets[:-1], self.offsets[1:],
                                                           strict=True) if b > a]
        elif hasattr(X, "shape") and hasattr(X, "__getitem__") and len(X.shape) == 2:
            self.kind = "sliceable"
            self.X = X
            self.n, self.m = (int(s) for s in X.shape)
            self.bounds = _ranges(self.n, chunk_size)
        else:
            raise ScatlasInputError(
                f"{name} must be a matrix, a row-sliceable store (h5py dataset, backed AnnData X) "
                f"or a list of chunk matrices; got {type(X).__name__}"
            )
        if self.n < 1 or self.m < 1:
            raise ScatlasInputError(f"{name} is empty (shape {(self.n, self.m)})")

    def _slice(self, a: int, b: int) -> Any:
        """Rows [a, b) from the underlying store (not converted)."""
        if self.kind == "chunks":
            c = int(np.searchsorted(self.offsets, a, side="right") - 1)
            off = int(self.offsets[c])
            return self.X[c][a - off : b - off]
        return self.X[a:b]

    def _prepare(self, M: Any, check: bool) -> Any:
        """Convert a block to the working array kind and dtype (validated when streamed)."""
        if check:
            check_matrix(M, f"a block of {self.name}", nonnegative=True)
        if self.xp is not np and not backend.is_gpu_array(M):
            M = backend.to_device(M, "gpu", dtype=self.dtype)  # cast on the host
        if backend.issparse(M):
            M = M.tocsr() if M.format != "csr" else M
            return M.astype(self.dtype) if M.dtype != self.dtype else M
        return self.xp.asarray(M, dtype=self.dtype)

    def rows(self, idx: np.ndarray) -> Any:
        """Rows ``idx`` (host integer array) as a matrix of the working kind."""
        if self.kind == "memory":
            sel = self.xp.asarray(idx) if self.xp is not np else idx
            return self._prepare(self.X[sel], check=False)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [idx.size]])
        pieces = []
        for s, e in zip(starts, ends, strict=True):
            a, b = int(idx[s]), int(idx[e - 1]) + 1
            for ca, cb in self._split_by_chunks(a, b):
                pieces.append(self._prepare(self._slice(ca, cb), check=True))
        return _vstack(pieces)

    def _split_by_chunks(self, a: int, b: int) -> list[tuple[int, int]]:
        if self.kind != "chunks":
            return [(a, b)]
        out = []
        while a < b:
            c = int(np.searchsorted(self.offsets, a, side="right") - 1)
            e = min(b, int(self.offsets[c + 1]))
            out.append((a, e))
            a = e
        return out

    def blocks(self, size: int) -> Iterable[tuple[int, int, Any]]:
        """Contiguous row blocks ``(a, b, X[a:b])`` covering the dataset in order."""
        for a in range(0, self.n, size):
            b = min(self.n, a + size)
            if self.kind == "memory":
                yield a, b, self._prepare(self.X[a:b], check=False)
            else:
                pieces = [self._prepare(self._slice(ca, cb), check=True)
                          for ca, cb in self._split_by_chunks(a, b)]
                yield a, b, _vstack(pieces)


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _vstack(pieces: list[Any]) -> Any:
    if len(pieces) == 1:
        return pieces[0]
    if backend.issparse(pieces[0]):
        return backend.sparse_module(pieces[0]).vstack(pieces).tocsr()
    return backend.array_module(pieces[0]).concatenate(pieces, axis=0)


def _sources(
    Xs: Any, name: str, dtype: np.dtype, chunk_size: int, device: str | None
) -> tuple[list[_Source], Any]:
    """Wrap datasets as sources; pick the array module (device) and the result mover."""
    if Xs is None or isinstance(Xs, str) or not isinstance(Xs, Sequence) or hasattr(Xs, "shape"):
        raise ScatlasInputError(f"{name} must be a list with one entry per dataset")
    if len(Xs) == 0:
        raise ScatlasInputError(f"{name} is an empty list; give at least one dataset")
    caller = "gpu" if any(_is_matrix(X) and backend.is_gpu_array(X) for X in Xs) else "cpu"
    target = backend.resolve_device(device) if device is not None else caller
    xp = np if target == "cpu" else backend.array_module(_gpu_probe())
    moved = [
        backend.to_device(X, target, dtype=dtype if target == "gpu" else None)
        if _is_matrix(X) and backend.device_of(X) != target else X
        for X in Xs
    ]
    srcs = [_Source(X, f"{name}[{i}]", xp, dtype, chunk_size) for i, X in enumerate(moved)]
    widths = {s.m for s in srcs}
    if len(widths) != 1:
        raise ScatlasInputError(
            f"datasets of {name} must share the same genes (columns); got widths "
            f"{[s.m for s in srcs]}"
        )
    return srcs, _restorer(caller, target)


def _gpu_probe() -> Any:
    """A tiny CuPy array (raises DeviceUnavailableError without a GPU)."""
    return backend.to_device(np.zeros(1), "gpu")


def _restorer(caller: str, target: str) -> Any:
    """Function moving results from ``target`` back to the caller's device."""
    if caller == target:
        return lambda a: a
    if caller == "cpu":
        return backend.to_host
    return lambda a: backend.to_device(a, "gpu")


# --------------------------------------------------------------------------------------------
# the online algorithm
# --------------------------------------------------------------------------------------------


class _Sampler:
    """libplanc's ``next()``: which cells of each new dataset form the next mini-batch."""

    def __init__(self, srcs: list[_Source], sizes: list[int], max_epochs: int,
                 rng: np.random.Generator) -> None:
        self.srcs, self.b, self.max_epochs, self.rng = srcs, sizes, max_epochs, rng
        self.n = [s.n for s in srcs]
        self.order = [self._permute(s) for s in srcs]
        self.epoch = [0] * len(srcs)
        self.epoch_prev = [0] * len(srcs)
        self.iter = 0
        self.epoch_next = False

    def _permute(self, src: _Source) -> np.ndarray:
        perm = self.rng.permutation(len(src.bounds))
        return np.concatenate([np.arange(*src.bounds[j]) for j in perm])

    def next(self) -> list[np.ndarray] | None:
        """Indices of the next mini-batch per dataset, or None when the run is over."""
        self.iter += 1
        t, first = self.iter, 0
        idx = []
        if self.max_epochs * self.n[first] >= t * self.b[first]:
            for i, (n, b) in enumerate(zip(self.n, self.b, strict=True)):
                self.epoch[i] = t * b // n
                start = ((t - 1) * b) % n
                if self.epoch[i] == self.epoch_prev[i]:
                    idx.append(self.order[i][start : start + b])
                    continue
                if i == first:
                    self.epoch_next = True
                self.epoch_prev[i] = self.epoch[i]
                tail = self.order[i][start:]
                self.order[i] = self._permute(self.srcs[i])
                head = self.order[i][: max(0, b - tail.size)]
                idx.append(np.concatenate([tail, head]) if tail.size < b else tail)
        else:
            for i, (n, b) in enumerate(zip(self.n, self.b, strict=True)):
                idx.append(self.order[i][((t - 1) * b) % n :])
        if idx[first].size != self.b[first] or self.epoch[first] >= self.max_epochs:
            return None  # a short last mini-batch is dropped; max_epochs reached
        return idx


def _scale_param(t: int, b: int) -> float:
    if t == 1:
        return 0.0
    if t == 2:
        return 1.0 / b
    return (t - 2) / (t - 1)


def _hals_w(W: Any, Vs: list[Any], As: list[Any], Bs: list[Any]) -> None:
    """libplanc ``updateW``: one HALS sweep over the columns of W, in place."""
    xp = backend.array_module(W)
    for j in range(W.shape[1]):
        num = xp.zeros(W.shape[0], dtype=W.dtype)
        den = 0.0
        for V, A, B in zip(Vs, As, Bs, strict=True):
            num += B[:, j] - (W + V) @ A[:, j]
            den += float(A[j, j])
        col = W[:, j] + num / den
        W[:, j] = xp.where(col < 0, _HALS_FLOOR, col)


def _hals_v(W: Any, V: Any, A: Any, B: Any, lam: float) -> None:
    """libplanc ``updateV`` for one dataset: one HALS sweep over the columns of V, in place."""
    xp = backend.array_module(W)
    for j in range(W.shape[1]):
        col = V[:, j] + (B[:, j] - (W + (1.0 + lam) * V) @ A[:, j]) / ((1.0 + lam) * A[j, j])
        V[:, j] = xp.where(col < 0, _HALS_FLOOR, col)


def _normalise_columns(M: Any) -> Any:
    xp = backend.array_module(M)
    norms = xp.linalg.norm(M, axis=0)
    return M / xp.where(norms > 0, norms, 1.0)


def _solve_all(
    src: _Source, W: Any, V: Any, lam: float, need_objective: bool
) -> tuple[Any, float]:
    """Exact H of a whole dataset (BPP, in row blocks) and its objective term."""
    xp = src.xp
    L = W + V
    G = L.T @ L + lam * (V.T @ V)
    Hs, XtH = [], xp.zeros_like(W)
    sq = 0.0
    for _, _, Xb in src.blocks(_SOLVE_BLOCK):
        H = bpp_rows(G, xp.ascontiguousarray(Xb @ L))
        Hs.append(H)
        if need_objective:
            XtH += Xb.T @ H
            vals = Xb.data if backend.issparse(Xb) else Xb
            sq += float((vals.astype(np.float64) ** 2).sum())
    H = xp.concatenate(Hs, axis=0)
    if not need_objective:
        return H, float("nan")
    HtH = (H.T @ H).astype(np.float64)
    L64, V64 = L.astype(np.float64), V.astype(np.float64)
    obj = sq - 2.0 * float(xp.einsum("ij,ij->", L64, XtH.astype(np.float64)))
    obj += float(xp.einsum("ij,ij->", L64.T @ L64, HtH))
    obj += lam * float(xp.einsum("ij,ij->", V64.T @ V64, HtH))
    return H, obj


@validate_params(k=(None, POSITIVE_INT), lam=NONNEGATIVE, max_epochs=POSITIVE_INT,
                 minibatch_size=POSITIVE_INT, hals_iter=POSITIVE_INT, chunk_size=POSITIVE_INT,
                 seed=SEED)
def online_inmf(
    Xs: Sequence[Any],
    k: int | None = None,
    lam: float = 5.0,
    *,
    reference: OnlineINMFResult | None = None,
    reference_Xs: Sequence[Any] | None = None,
    max_epochs: int = 5,
    minibatch_size: int = 5000,
    hals_iter: int = 1,
    chunk_size: int = 1000,
    seed: int = 1,
    dtype: Any = None,
    progress: bool | None = None,
    device: str | None = None,
) -> OnlineINMFResult:
    """Online iNMF, scenario 1 (all datasets) or 2 (new datasets on a ``reference`` fit).

    Parameters
    ----------
    Xs
        The datasets to factorise (scenario 2: the new ones), each (cells_i, genes): matrix,
        row-sliceable store or list of chunks (see the module docstring), non-negative.
    k
        Number of factors; default 20 (rliger), or the reference's k in scenario 2 (a
        different value is an error).
    lam
        Penalty on the dataset-specific part (rliger default 5).
    reference
        A previous :class:`OnlineINMFResult`: its ``W`` is refined and its datasets' ``A_i``,
        ``B_i``, ``V_i`` stay frozen (scenario 2).
    reference_Xs
        Optional: the reference's datasets again, only to recompute their ``H`` with the final
        ``W`` (read once, chunk by chunk); without it their ``H`` is ``None``.
    max_epochs, minibatch_size, hals_iter, chunk_size
        rliger defaults 5, 5000, 1, 1000.
    seed
        NumPy ``default_rng`` seed (rliger default 1).
    dtype
        float32 (default) or float64.
    progress
        Progress bar over mini-batch iterations.
    device
        ``"cpu"`` / ``"gpu"``; streamed blocks are moved there as they are read.

    Returns
    -------
    OnlineINMFResult
        Old datasets first (scenario 2), then the new ones, in the caller's array kind.

    Peak device memory (m genes, b: the working dtype's bytes): a dataset given as a matrix on
    the device stays there whole (a store or chunk list is read block by block: only the
    current mini-batch is moved); W (m, k) b and per dataset (the reference's included) V_i,
    B_i, B_old_i (m, k) b and two (k, k);
    each mini-batch (b_i, m) as given (sparse stays sparse) with its (b_i, k) solve (about
    eight (b_i, k) float64 arrays); at the end the H_i (n_i, k) b outputs, solved in blocks of
    16,384 cells. Memory does not grow with the number of cells otherwise.
    """
    dt = backend.resolve_dtype(dtype)
    lam = float(lam)
    srcs, restore = _sources(Xs, "Xs", dt, chunk_size, device)
    xp, m = srcs[0].xp, srcs[0].m
    ref = _reference_state(reference, xp, dt, m) if reference is not None else None
    if ref is not None:
        if k is not None and k != ref["k"]:
            raise ScatlasInputError(f"k={k} differs from the reference's k={ref['k']}")
        k = ref["k"]
    k = check_rank(20 if k is None else k, [(s.name, s.n) for s in srcs], m)
    sizes = minibatch_sizes(minibatch_size, [(s.name, s.n) for s in srcs])

    rng = np.random.default_rng(seed)
    if ref is None:
        W = _normalise_columns(xp.asarray(rng.uniform(0.0, 2.0, (m, k)).astype(dt)))
    else:
        W = ref["W"].copy()
    Vs = []
    for s in srcs:
        cells = np.sort(rng.choice(s.n, size=k, replace=False))
        Vs.append(_normalise_columns(_dense(s.rows(cells), xp, dt).T.copy()))
    As = [xp.zeros((k, k), dtype=dt) for _ in srcs]
    Bs = [xp.zeros((m, k), dtype=dt) for _ in srcs]
    A_old = [xp.zeros((k, k), dtype=dt) for _ in srcs]
    B_old = [xp.zeros((m, k), dtype=dt) for _ in srcs]
    old_V = ref["V"] if ref else []
    old_A = ref["A"] if ref else []
    old_B = ref["B"] if ref else []

    sampler = _Sampler(srcs, sizes, max_epochs, rng)
    total = sum(s.n for s in srcs) * max_epochs // minibatch_size
    n_iter = 0
    with bar(desc="online iNMF", total=total, progress=progress) as pbar:
        while (idx := sampler.next()) is not None:
            t = sampler.iter
            for i, s in enumerate(srcs):
                X = s.rows(idx[i])
                L = W + Vs[i]
                H = bpp_rows(L.T @ L + lam * (Vs[i].T @ Vs[i]), xp.ascontiguousarray(X @ L))
                sc = _scale_param(t, sizes[i])
                if sampler.epoch[0] > 0 and sampler.epoch_next:
                    As[i] -= A_old[i]
                    A_old[i] = sc * As[i]
                    Bs[i] -= B_old[i]
                    B_old[i] = sc * Bs[i]
                else:
                    A_old[i] *= sc
                    B_old[i] *= sc
                As[i] = sc * As[i] + (H.T @ H) / sizes[i]
                d = xp.diagonal(As[i])
                As[i][xp.arange(k), xp.arange(k)] = xp.where(d == 0, _A_DIAG_FLOOR, d)
                Bs[i] = sc * Bs[i] + xp.asarray(X.T @ H) / sizes[i]
            for _ in range(hals_iter):
                _hals_w(W, old_V + Vs, old_A + As, old_B + Bs)
                for i in range(len(srcs)):
                    _hals_v(W, Vs[i], As[i], Bs[i], lam)
            sampler.epoch_next = False
            n_iter += 1
            pbar.update(1)

    old_src: list[_Source | None] = [None] * len(old_V)
    if reference_Xs is not None:
        if ref is None:
            raise ScatlasInputError("reference_Xs is only meaningful with reference=")
        if len(reference_Xs) != len(old_V):
            raise ScatlasInputError(
                f"reference_Xs has {len(reference_Xs)} datasets, the reference {len(old_V)}"
            )
        old_src = list(_sources(list(reference_Xs), "reference_Xs", dt, chunk_size, device)[0])
    Hs: list[Any | None] = []
    objective = 0.0
    for s, V in zip(old_src + srcs, old_V + Vs, strict=True):
        if s is None:
            Hs.append(None)
            continue
        if s.m != m:
            raise ScatlasInputError(f"{s.name} has {s.m} genes, expected {m}")
        H, obj = _solve_all(s, W, V, lam, need_objective=True)
        Hs.append(H)
        objective += obj

    return OnlineINMFResult(
        W=restore(W),
        V=[restore(V) for V in old_V + Vs],
        H=[None if H is None else restore(H) for H in Hs],
        A=[restore(A) for A in old_A + As],
        B=[restore(B) for B in old_B + Bs],
        objective=objective,
        n_iter=n_iter,
        epochs=int(sampler.epoch[0]),
        minibatch_sizes=sizes,
        seed=int(seed),
        lam=lam,
        n_new=len(srcs),
    )


def minibatch_sizes(minibatch_size: int, datasets: Sequence[tuple[str, int]]) -> list[int]:
    """Cells per mini-batch of each new dataset, ``b_i = round(n_i / sum(n) * minibatch_size)``
    (libplanc's split; ``datasets``: ``(name, n_cells)`` pairs); every ``b_i`` must be between
    1 and ``n_i``, else a :class:`ScatlasInputError` names ``minibatch_size``."""
    total = sum(n for _, n in datasets)
    sizes = [int(round(n / total * minibatch_size)) for _, n in datasets]
    for (name, n), b in zip(datasets, sizes, strict=True):
        if b < 1 or b > n:
            raise ScatlasInputError(
                f"minibatch_size={minibatch_size} gives {b} cells per mini-batch of dataset "
                f"{name!r}, which has {n} cells; minibatch_size must be at most the total "
                f"number of cells ({total}) and large enough for every dataset: set a "
                f"{'smaller' if b > n else 'larger'} minibatch_size", param="minibatch_size")
    return sizes


def _dense(M: Any, xp: Any, dt: np.dtype) -> Any:
    M = M.toarray() if backend.issparse(M) else M
    return xp.asarray(M, dtype=dt)


def _reference_state(ref: Any, xp: Any, dt: np.dtype, m: int) -> dict[str, Any]:
    if not isinstance(ref, OnlineINMFResult):
        raise ScatlasInputError("reference must be an OnlineINMFResult from online_inmf")
    W = xp.asarray(backend.to_host(ref.W) if xp is np else ref.W, dtype=dt)
    if W.shape[0] != m:
        raise ScatlasInputError(
            f"the reference has {W.shape[0]} genes, the new datasets {m}; align the genes first"
        )

    def conv(a: Any) -> Any:
        return xp.asarray(backend.to_host(a) if xp is np else a, dtype=dt)

    return {
        "W": W, "k": int(W.shape[1]),
        "V": [conv(v) for v in ref.V], "A": [conv(a) for a in ref.A], "B": [conv(b) for b in ref.B],
    }


def project_inmf(
    Xs: Sequence[Any] | Any,
    W: Any,
    *,
    chunk_size: int = _SOLVE_BLOCK,
    dtype: Any = None,
    device: str | None = None,
) -> list[Any]:
    """Online iNMF scenario 3: project new data onto fixed shared metagenes.

    Parameters
    ----------
    Xs
        List of (cells_i, genes) datasets (matrix, row-sliceable store or list of chunks), or an
        iterable (e.g. a generator) of (cells, genes) chunks of one dataset, read once.
    W
        (genes, k) shared metagenes of a fit.
    chunk_size
        Cells solved at a time (memory bound).
    dtype, device
        As :func:`online_inmf`.

    Returns
    -------
    list of (cells_i, k) arrays ``H_i = argmin_{H >= 0} ||X_i - H W^T||_F`` (exact BPP), one per
    dataset (one per chunk for a generator input). As RcppPlanc ``projectNewData``: ``V = 0``.

    Peak device memory: W, one block of ``chunk_size`` cells (as given; sparse stays sparse)
    with its solve (about eight (chunk_size, k) float64 arrays), and the (cells_i, k) outputs.
    """
    dt = backend.resolve_dtype(dtype)
    check_positive_int(chunk_size, "chunk_size")
    check_matrix(W, "W", nonnegative=True, allow_sparse=False)
    if _is_matrix(Xs) or hasattr(Xs, "shape"):
        raise ScatlasInputError("Xs must be a list of datasets or an iterable of chunks")
    if not isinstance(Xs, Sequence):  # a generator of chunks of one dataset: read once, lazily
        out = []
        for i, chunk in enumerate(Xs):
            out.extend(project_inmf([chunk], W, chunk_size=chunk_size, dtype=dtype,
                                    device=device))
            if out[-1].shape[0] != chunk.shape[0]:  # pragma: no cover - defensive
                raise RuntimeError(f"chunk {i} projected to the wrong number of cells")
        return out
    srcs, restore = _sources(Xs, "Xs", dt, chunk_size, device)
    xp = srcs[0].xp
    Wd = xp.asarray(backend.to_host(W) if xp is np else backend.to_device(W, "gpu"), dtype=dt)
    if Wd.shape[0] != srcs[0].m:
        raise ScatlasInputError(f"W has {Wd.shape[0]} genes, the data {srcs[0].m}")
    G = Wd.T @ Wd
    out = []
    for s in srcs:
        Hs = [bpp_rows(G, xp.ascontiguousarray(Xb @ Wd)) for _, _, Xb in s.blocks(chunk_size)]
        out.append(restore(xp.concatenate(Hs, axis=0)))
    return out

"""Benchmark ``rsvd``: truncated SVD and PCA (k = 50) of log-normalised sparse counts.

Workload: ``scatlas.datasets.synthetic(n, 2000, seed)`` counts, log-normalised (1e4, log1p),
CSR float32, n cells x 2,000 genes.

Methods, group ``svd`` (uncentred):
    ``scatlas.rsvd`` (defaults), ``scatlas.rsvd[randomized]`` (``method='randomized'``),
    ``sklearn.randomized_svd`` (defaults: n_iter='auto' = 7 here, 10 oversamples),
    ``sklearn.randomized_svd[n_iter=H]`` (``sklearn_n_iter_high``), ``exact.gram64``.
Methods, group ``pca`` (centred):
    ``scatlas.pca`` (defaults), ``scatlas.pca[randomized]``, ``sklearn.PCA[covariance_eigh]``,
    ``sklearn.PCA[arpack]`` (the two sparse-capable solvers of scikit-learn's PCA),
    ``scanpy.pp.pca`` (defaults, array input), ``exact.cov64``.

Accuracy against an exact reference computed once per size and cached: eigh of the 2000 x 2000
Gram matrix ``X^T X`` (and of the centred covariance for PCA), accumulated in float64 over dense
row chunks. Recorded: max relative error of the top-k singular values, the energy deficit
(variance the computed k directions miss relative to the exact top k; insensitive to the flat
noise bulk of single-cell spectra) and the smallest cosine of the principal angles between the
computed and exact top-10, top-30 and top-k right singular subspaces (1 = identical; near-zero
values in the noise bulk, where sigma_k / sigma_k+1 ~ 1, mean the directions are undetermined,
not that the method failed: compare with the energy deficit and with the gap in the summary).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import workloads
from .accuracy import host64, max_rel_err, subspace_min_cos
from .environment import get_backend
from .spec import Benchmark, Method, Metric, Workload

DEFAULT_PARAMS: dict[str, Any] = {
    "k": 50,
    "n_genes": 2000,
    "seed": 0,
    "subspace_tops": "10,30",  # principal-angle checks on these leading subspaces, and top-k
    "sklearn_n_iter_high": 15,
    "baseline_max_size": 1_000_000,  # sklearn randomized_svd and PCA[covariance_eigh]
    "slow_max_size": 100_000,  # sklearn PCA[arpack], scanpy.pp.pca
    "exact_max_size": 100_000,  # timing the float64 exact methods (the reference is always built)
}

REFERENCE_KEEP = 256  # exact singular vectors stored per size
REFERENCE_VERSION = 2  # bump when the cached reference's content changes

METRICS = {
    "sv_max_rel_err": Metric("max rel. err σ", ".1e"),
    "energy_deficit": Metric("energy deficit", ".1e"),
    "min_cos_top10": Metric("min cos top-10", ".4f", higher_is_better=True),
    "min_cos_top30": Metric("min cos top-30", ".4f", higher_is_better=True),
    "min_cos_top50": Metric("min cos top-50", ".4f", higher_is_better=True),
    "solver": Metric("solver", "s"),
}


def exact_reference(X: Any, key: str) -> tuple[dict[str, np.ndarray], bool]:
    """Exact spectra (float64) of ``X^T X`` and of the centred Gram, cached with the workload.

    Keys: ``S``/``V`` (singular values, top right singular vectors), ``Sc``/``Vc`` (the same for
    the column-centred matrix), ``G`` (the Gram matrix) and ``mean`` (column means).
    """
    name = f"{key}_ref{REFERENCE_VERSION}"
    cached = (workloads.cache_dir() / f"{name}.npz").is_file()

    def build() -> dict[str, np.ndarray]:
        n, p = X.shape
        G, sums = workloads.gram64(X)
        keep = min(p, REFERENCE_KEEP)
        s2, V = workloads.top_eigh(G, keep)
        mean = sums / n
        c2, Vc = workloads.top_eigh(G - n * np.outer(mean, mean), keep)
        return {"S": np.sqrt(s2), "V": V, "Sc": np.sqrt(c2), "Vc": Vc, "G": G, "mean": mean}

    return workloads.cached_arrays(name, build), cached


def build(size: int, device: str, params: Mapping[str, Any]) -> Workload:
    """Log-normalised synthetic counts at ``size`` cells, with the exact reference."""
    X, info = workloads.synthetic_lognorm(size, params["n_genes"], params["seed"])
    start = time.perf_counter()
    ref, ref_cached = exact_reference(X, info["cache_key"])
    info["reference_s"] = None if ref_cached else round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    data = get_backend().to_device(X, device)
    get_backend().synchronize()
    info["to_device_s"] = round(time.perf_counter() - start, 3)
    info.update(_describe(X, ref, params["k"]))
    return Workload(host=X, data=data, info=info, extra={**ref, "tops": _tops(params)})


def _describe(X: Any, ref: Mapping[str, np.ndarray], k: int) -> dict[str, Any]:
    n, p = X.shape
    gap = float(ref["S"][k - 1] / ref["S"][k]) if k < len(ref["S"]) else None
    gap_c = float(ref["Sc"][k - 1] / ref["Sc"][k]) if k < len(ref["Sc"]) else None
    density = X.nnz / (n * p)
    summary = (f"{n:,}×{p} CSR float32, density {density:.3f}; σ{k}/σ{k + 1} = {gap:.3f} "
               f"(centred {gap_c:.3f})")
    return {"shape": [n, p], "nnz": int(X.nnz), "density": density, "gap_k": gap,
            "gap_k_centred": gap_c, "summary": summary}


# --- calls: each returns (singular values, Vt) plus optional solver name -------------------------

def _kernels():
    from scatlas import kernels

    return kernels


def _ours_rsvd(k: int, **kw: Any):
    def call(w: Workload):
        _, S, Vt = _kernels().rsvd(w.data, k, seed=0, **kw)
        return S, Vt, None
    return call


def _ours_pca(k: int, **kw: Any):
    def call(w: Workload):
        res = _kernels().pca(w.data, k, seed=0, **kw)
        return res.singular_values, res.components, res.method
    return call


def _sklearn_rsvd(k: int, **kw: Any):
    def call(w: Workload):
        from sklearn.utils.extmath import randomized_svd

        _, S, Vt = randomized_svd(w.host, k, random_state=0, **kw)
        return S, Vt, None
    return call


def _sklearn_pca(k: int, solver: str):
    def call(w: Workload):
        from sklearn.decomposition import PCA

        est = PCA(k, svd_solver=solver, random_state=0)
        est.fit_transform(w.host)
        return est.singular_values_, est.components_, solver
    return call


def _scanpy_pca(k: int):
    def call(w: Workload):
        import scanpy as sc

        _, components, _, variance = sc.pp.pca(w.host, n_comps=k, random_state=0,
                                               return_info=True)
        S = np.sqrt(np.asarray(variance, dtype=np.float64) * (w.host.shape[0] - 1))
        return S, components, None
    return call


def _exact(k: int, centred: bool):
    def call(w: Workload):
        X = w.host
        G, sums = workloads.gram64(X)
        if centred:
            mean = sums / X.shape[0]
            G -= X.shape[0] * np.outer(mean, mean)
        s2, V = workloads.top_eigh(G, k)
        return np.sqrt(s2[:k]), V.T, "gram-eigh float64"
    return call


def methods(params: Mapping[str, Any]) -> list[Method]:
    """Our calls and the baselines, at ``params['k']`` components."""
    k, hi = params["k"], params["sklearn_n_iter_high"]
    base, slow, exact = (params["baseline_max_size"], params["slow_max_size"],
                         params["exact_max_size"])
    why_base = "baseline too slow on this machine (raise --param baseline_max_size)"
    why_slow = "baseline too slow on this machine (raise --param slow_max_size)"
    why_exact = ("exact float64 method not timed above this size; the reference is still "
                 "computed once (raise --param exact_max_size)")
    return [
        Method("scatlas.rsvd", _ours_rsvd(k), "ours", "svd", "kernels.rsvd(X, k, seed=0)",
               on_device=True),
        Method("scatlas.rsvd[randomized]", _ours_rsvd(k, method="randomized"), "ours", "svd",
               "kernels.rsvd(..., method='randomized')", on_device=True),
        Method("sklearn.randomized_svd", _sklearn_rsvd(k), "baseline", "svd",
               "randomized_svd(X, k, random_state=0), n_iter='auto'", max_size=base,
               skip_reason=why_base),
        Method(f"sklearn.randomized_svd[n_iter={hi}]", _sklearn_rsvd(k, n_iter=hi), "baseline",
               "svd", f"randomized_svd(X, k, n_iter={hi}, random_state=0)", max_size=base,
               skip_reason=why_base),
        Method("exact.gram64", _exact(k, centred=False), "baseline", "svd",
               "eigh of X^T X accumulated in float64", max_size=exact, skip_reason=why_exact),
        Method("scatlas.pca", _ours_pca(k), "ours", "pca", "kernels.pca(X, k, seed=0)",
               on_device=True),
        Method("scatlas.pca[randomized]", _ours_pca(k, method="randomized"), "ours", "pca",
               "kernels.pca(..., method='randomized')", on_device=True),
        Method("sklearn.PCA[covariance_eigh]", _sklearn_pca(k, "covariance_eigh"), "baseline",
               "pca", "PCA(k, svd_solver='covariance_eigh').fit_transform(X)", max_size=base,
               skip_reason=why_base),
        Method("sklearn.PCA[arpack]", _sklearn_pca(k, "arpack"), "baseline", "pca",
               "PCA(k, svd_solver='arpack').fit_transform(X)", max_size=slow,
               skip_reason=why_slow),
        Method("scanpy.pp.pca", _scanpy_pca(k), "baseline", "pca",
               "scanpy.pp.pca(X, n_comps=k) at its defaults", max_size=slow,
               skip_reason=why_slow),
        Method("exact.cov64", _exact(k, centred=True), "baseline", "pca",
               "eigh of the centred Gram accumulated in float64", max_size=exact,
               skip_reason=why_exact),
    ]


def _tops(params: Mapping[str, Any]) -> list[int]:
    """The leading-subspace sizes checked besides k (``subspace_tops``: "10,30" or a list)."""
    tops = params["subspace_tops"]
    items = str(tops).split(",") if isinstance(tops, str | int) else list(tops)
    return sorted({int(t) for t in items if str(t).strip()} | {int(params["k"])})


def accuracy(w: Workload, method: Method, output: Any) -> dict[str, Any]:
    """Singular-value error, captured energy and subspace cosines against the exact reference.

    ``energy_deficit`` = 1 - ||X_c V||_F^2 / sum of the top-k exact sigma^2 (X_c centred for
    PCA): how much less variance the computed k directions capture than the optimal ones. Unlike
    the subspace cosines it does not depend on gaps in the spectrum (single-cell spectra have a
    flat noise bulk, where individual directions are not determined).
    """
    S, Vt, solver = output
    centred = method.group == "pca"
    S_ref = w.extra["Sc" if centred else "S"]
    V_ref = w.extra["Vc" if centred else "V"]
    V = host64(Vt).T
    k = V.shape[1]
    Q = np.linalg.qr(V)[0]  # energy of the span (rounding can leave V slightly non-orthonormal)
    G = w.extra["G"]
    if centred:
        n = w.host.shape[0]
        G = G - n * np.outer(w.extra["mean"], w.extra["mean"])
    captured = float(np.einsum("ij,ij->", Q, G @ Q))
    result: dict[str, Any] = {
        "sv_max_rel_err": max_rel_err(S, S_ref[:k]),
        "energy_deficit": 1.0 - captured / float(np.sum(S_ref[:k] ** 2)),
    }
    for top in (t for t in w.extra["tops"] if t <= k):
        result[f"min_cos_top{top}"] = subspace_min_cos(V[:, :top], V_ref[:, :top])
    if solver is not None:
        result["solver"] = str(solver)
    return result


BENCHMARK = Benchmark(
    name="rsvd",
    description=("Truncated SVD and PCA, k=50, of log-normalised synthetic counts (CSR float32, "
                 "2,000 genes). Accuracy vs the exact float64 Gram eigh."),
    build=build,
    methods=methods,
    accuracy=accuracy,
    metrics=METRICS,
    default_sizes=(10_000, 100_000, 1_000_000),
    default_params=DEFAULT_PARAMS,
    size_label="cells",
)

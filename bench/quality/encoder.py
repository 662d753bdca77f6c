"""Held-out quality of the metric encoder: leave one batch out, against PCA baselines.

Protocol (issue 15, item 2), on every labelled multi-batch set (``data.ENCODER``: CellBench with
its 5 batches, Baron with its 6 donors):

- for each held-out batch ``b``: the training cells are all cells of the other batches, with
  every gene of the file (raw counts);
- **ours** (``scatlas.metric``): ``scatlas.tl.train_metric(train, "label", "batch", seed=s)`` at
  its defaults (no setting passed), then ``model.embed`` of the training and the held-out cells;
  each held-out cell gets the majority label of its k = 15 nearest training cells in the
  embedding (sklearn ``KNeighborsClassifier(15)``, Euclidean on unit vectors = cosine ranking);
- **baselines**, fitted on the same training cells: log-normalised counts (1e4 per cell,
  ``log1p``), the 2,000 most variable genes of the training cells (scanpy
  ``highly_variable_genes``, flavor ``"seurat"``), PCA with 50 components (sklearn, fitted on the
  training cells; the held-out cells projected); ``pca_knn``: the same 15-NN vote on the PCs;
  ``pca_logreg``: sklearn ``LogisticRegression(max_iter=2000)`` on the PCs;
- score: balanced accuracy (mean per-label recall) over the held-out cells whose label occurs
  in the training cells (the others cannot be predicted by any method and are left out);
- seeds 0, 1, 2 (the model's and PCA's seed); ``quick=True``: seed 0 and the first and last
  held-out batch of each dataset only.

Checks, per dataset: the mean over held-out batches and seeds of ours against
``max(pca_knn, pca_logreg) + 0.03`` (or ``>= 0.99`` where that baseline mean is above 0.96).

``python -m bench.quality.encoder [--quick]`` prints the table; ``--cv`` runs the inner
cross-validation that chose the encoder's size-aware defaults (docs/models.md).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import numpy as np

from . import data

SECTION = "encoder"
K = 15
N_HVG = 2000
N_PCS = 50
SEEDS = (0, 1, 2)


def _lognorm(X: Any) -> Any:
    from scatlas.models.data import lognorm

    return lognorm(X, dense=False)


def _knn(Z_train: np.ndarray, y_train: np.ndarray, Z_test: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(min(K, len(y_train))).fit(Z_train, y_train).predict(Z_test)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, train_labels: Any) -> float:
    """Mean recall over the labels of ``y_true`` that occur in ``train_labels``, on the cells
    of those labels only."""
    from sklearn.metrics import balanced_accuracy_score

    keep = np.isin(y_true, np.asarray(list(set(train_labels))))
    return float(balanced_accuracy_score(y_true[keep], y_pred[keep]))


def baselines(train: Any, test: Any, seed: int) -> dict[str, tuple[float, float]]:
    """``{"pca_knn": (balanced accuracy, seconds), "pca_logreg": ...}`` on one split."""
    import anndata as ad
    import scanpy as sc
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    Xtr, Xte = _lognorm(train.X), _lognorm(test.X)
    tmp = ad.AnnData(Xtr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(tmp, n_top_genes=min(N_HVG, train.n_vars), flavor="seurat")
    genes = np.flatnonzero(tmp.var["highly_variable"].to_numpy())
    Dtr, Dte = Xtr[:, genes].toarray(), Xte[:, genes].toarray()
    pca = PCA(min(N_PCS, Dtr.shape[0] - 1, genes.size), random_state=seed).fit(Dtr)
    Ptr, Pte = pca.transform(Dtr), pca.transform(Dte)
    t_pca = time.perf_counter() - t0
    ytr, yte = train.obs["label"].to_numpy(str), test.obs["label"].to_numpy(str)
    out = {}
    t1 = time.perf_counter()
    out["pca_knn"] = (balanced_accuracy(yte, _knn(Ptr, ytr, Pte), ytr),
                      t_pca + time.perf_counter() - t1)
    t1 = time.perf_counter()
    lr = LogisticRegression(max_iter=2000).fit(Ptr, ytr)
    out["pca_logreg"] = (balanced_accuracy(yte, lr.predict(Pte), ytr),
                         t_pca + time.perf_counter() - t1)
    return out


def ours(train: Any, test: Any, seed: int, **settings: Any) -> tuple[float, float]:
    """``(balanced accuracy, seconds)`` of the encoder trained on ``train`` (defaults unless
    ``settings`` are given: the inner cross-validation's candidates)."""
    import scatlas

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scatlas.tl.train_metric(train, "label", "batch", seed=seed, progress=False,
                                        **settings)
    Ztr, Zte = model.embed(train, progress=False), model.embed(test, progress=False)
    ytr, yte = train.obs["label"].to_numpy(str), test.obs["label"].to_numpy(str)
    ba = balanced_accuracy(yte, _knn(Ztr, ytr, Zte), ytr)
    return ba, time.perf_counter() - t0


def _split(adata: Any, held: str) -> tuple[Any, Any]:
    is_held = (adata.obs["batch"] == held).to_numpy()
    return adata[~is_held].copy(), adata[is_held].copy()


def run(*, quick: bool = False, settings: dict[str, Any] | None = None,
        seeds: tuple[int, ...] | None = None,
        datasets: tuple[str, ...] = data.ENCODER) -> dict[str, list[dict[str, Any]]]:
    """Rows per dataset x held-out batch x seed x method, and one check per dataset.

    ``settings``: ``train_metric`` settings instead of its defaults (for comparing candidates
    by hand; the benchmark itself runs the defaults)."""
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    if seeds is None:
        seeds = SEEDS[:1] if quick else SEEDS
    for name in datasets:
        if not data.available(name):
            continue
        adata = data.load(name)
        held_out = sorted(adata.obs["batch"].unique())
        if quick:  # the first and the last batch (Baron: a human and a mouse donor)
            held_out = [held_out[0], held_out[-1]]
        for held in held_out:
            train, test = _split(adata, held)
            for seed in seeds:
                split = f"held_out={held},seed={seed}"
                base = {"section": SECTION, "dataset": name, "split": split, "held_out": held,
                        "seed": seed}
                try:
                    ba, sec = ours(train, test, seed, **(settings or {}))
                    rows.append({**base, "method": "scatlas.metric", "role": "ours",
                                 "seconds": sec, "error": None, "balanced_accuracy": ba})
                except Exception as err:  # recorded, the driver exits non-zero
                    rows.append({**base, "method": "scatlas.metric", "role": "ours",
                                 "seconds": None, "error": f"{type(err).__name__}: {err}"})
                try:
                    for method, (ba, sec) in baselines(train, test, seed).items():
                        rows.append({**base, "method": method, "role": "baseline",
                                     "seconds": sec, "error": None, "balanced_accuracy": ba})
                except Exception as err:
                    for method in ("pca_knn", "pca_logreg"):
                        rows.append({**base, "method": method, "role": "baseline",
                                     "seconds": None, "error": f"{type(err).__name__}: {err}"})
        checks.append(_check(name, rows))
    return {"rows": rows, "checks": checks}


def _mean(rows: list[dict[str, Any]], name: str, method: str) -> float:
    vals = [r.get("balanced_accuracy") for r in rows
            if r["dataset"] == name and r["method"] == method]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def _check(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    value = _mean(rows, name, "scatlas.metric")
    base = max(_mean(rows, name, "pca_knn"), _mean(rows, name, "pca_logreg"))
    if base > 0.96:
        target, what = 0.99, "mean balanced accuracy of scatlas.metric >= 0.99 (baseline > 0.96)"
    else:
        target = base + 0.03
        what = "mean balanced accuracy of scatlas.metric >= max(pca_knn, pca_logreg) + 0.03"
    return {"section": SECTION, "dataset": name, "check": what, "value": value,
            "target": float(target), "passed": bool(value >= target)}


# ------------------------------------------------------------------ inner cross-validation

#: the candidates of the inner cross-validation (docs/models.md, "Defaults on real data"):
#: ``train_metric`` settings on top of the SCimilarity preset
GRID: dict[str, dict[str, Any]] = {
    "triplet_w0.5": {"n_top_genes": 2000, "hidden": (256,), "latent_dim": 64,
                     "objective": "triplet", "metric_weight": 0.5, "negatives": "all"},
    "triplet_w0.1": {"n_top_genes": 2000, "hidden": (256,), "latent_dim": 64,
                     "objective": "triplet", "metric_weight": 0.1, "negatives": "all"},
    "infonce_w0.5": {"n_top_genes": 2000, "hidden": (256,), "latent_dim": 64,
                     "objective": "infonce", "metric_weight": 0.5, "negatives": "all"},
    "infonce_w0.5_same_study": {"n_top_genes": 2000, "hidden": (256,), "latent_dim": 64,
                                "objective": "infonce", "metric_weight": 0.5,
                                "negatives": "same_study"},
    # the network's input: the 50 leading PCs of the training cells' log-normalised genes
    "infonce_w0.5_pcs50": {"n_top_genes": 2000, "hidden": (256,), "latent_dim": 64,
                           "objective": "infonce", "metric_weight": 0.5, "negatives": "all",
                           "input_pcs": 50},
}

#: the outer held-out batch of each dataset whose training batches the reduced inner
#: cross-validation uses (``inner_cv(outers=...)``)
FIRST_OUTER = {"cellbench": "sc_celseq2", "baron_donor": "human1"}


def inner_cv(grid: dict[str, dict[str, Any]], seeds: tuple[int, ...] = (0,),
             datasets: tuple[str, ...] = data.ENCODER, outers: dict[str, str] | None = None,
             log: str | None = None) -> list[dict[str, Any]]:
    """Inner leave-one-batch-out scores of each candidate, never on an outer held-out batch.

    For outer held-out batch ``b`` and inner held-out batch ``c`` (both of one dataset) the
    candidate trains on the batches other than ``b`` and ``c`` and is scored on ``c``; the
    baselines are scored alike. ``outers``: one outer batch per dataset (the reduced protocol,
    :data:`FIRST_OUTER`); None: every batch in turn (the training set then depends only on the
    pair ``{b, c}``, so one model per pair is scored on both of its batches). Returns one row
    per (dataset, outer, inner, seed, method) with ``balanced_accuracy`` (also appended to
    ``log`` as JSON lines).
    """
    out: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        out.append(row)
        if log:
            with open(log, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    for name in datasets:
        adata = data.load(name)
        batches = sorted(adata.obs["batch"].unique())
        if outers is None:
            pairs = [(b, c) for i, b in enumerate(batches) for c in batches[i + 1:]]
        else:
            pairs = [(outers[name], c) for c in batches if c != outers[name]]
        for b, c in pairs:
            keep = ~adata.obs["batch"].isin([b, c]).to_numpy()
            train = adata[keep].copy()
            tests = {x: adata[(adata.obs["batch"] == x).to_numpy()].copy() for x in (b, c)}
            folds = [(c, b)] if outers is not None else [(c, b), (b, c)]
            for seed in seeds:
                for cand, settings in grid.items():
                    scores = _ours_on(train, {i: tests[i] for i, _ in folds}, seed, settings)
                    for inner, outer in folds:
                        emit({"dataset": name, "outer": outer, "inner": inner, "seed": seed,
                              "method": cand, "balanced_accuracy": scores[inner]})
                for inner, outer in folds:
                    for m, (ba, _) in baselines(train, tests[inner], seed).items():
                        emit({"dataset": name, "outer": outer, "inner": inner, "seed": seed,
                              "method": m, "balanced_accuracy": ba})
    return out


def _ours_on(train: Any, tests: dict[str, Any], seed: int,
             settings: dict[str, Any]) -> dict[str, float]:
    """Balanced accuracy on each test set of one model trained on ``train``."""
    import scatlas

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scatlas.tl.train_metric(train, "label", "batch", seed=seed, progress=False,
                                        **settings)
    ytr = train.obs["label"].to_numpy(str)
    Ztr = model.embed(train, progress=False)
    return {k: balanced_accuracy(t.obs["label"].to_numpy(str),
                                 _knn(Ztr, ytr, model.embed(t, progress=False)), ytr)
            for k, t in tests.items()}


def _print_table(result: dict[str, list[dict[str, Any]]]) -> None:
    import pandas as pd

    df = pd.DataFrame(result["rows"])
    print(df.pivot_table(index=["dataset", "held_out"], columns="method",
                         values="balanced_accuracy", aggfunc="mean").round(3).to_string())
    print(df.groupby(["dataset", "method"])["seconds"].mean().round(1).to_string())
    for c in result["checks"]:
        print(f"{c['dataset']}: {c['check']}: {c['value']:.3f} vs {c['target']:.3f} "
              f"{'PASS' if c['passed'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cv", action="store_true", help="run the inner cross-validation of GRID")
    p.add_argument("--full-cv", action="store_true",
                   help="with --cv: every outer batch in turn (default: FIRST_OUTER only)")
    p.add_argument("--candidates", default=None, help="with --cv: comma-separated GRID names")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--datasets", default=None, help="comma-separated datasets (default all)")
    p.add_argument("--settings", default=None,
                   help="JSON train_metric settings for the encoder instead of its defaults")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.cv:
        grid = GRID if args.candidates is None else {
            k: GRID[k] for k in args.candidates.split(",")}
        inner_cv(grid, outers=None if args.full_cv else FIRST_OUTER, log=args.out,
                 seeds=(0,) if args.seeds is None else tuple(int(x) for x in args.seeds.split(",")),
                 datasets=tuple(args.datasets.split(",")) if args.datasets else data.ENCODER)
        return 0
    settings = json.loads(args.settings) if args.settings else {}
    if "hidden" in settings:
        settings["hidden"] = tuple(settings["hidden"])
    result = run(quick=args.quick, settings=settings,
                 seeds=None if args.seeds is None else tuple(int(x) for x in args.seeds.split(",")),
                 datasets=tuple(args.datasets.split(",")) if args.datasets else data.ENCODER)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh)
    _print_table(result)
    return 0 if all(c["passed"] for c in result["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m bench.annotate_ood``: does annotation's out-of-distribution flag mean something?

Held-out protocol on the real datasets of ``../shared/data`` (``bench.quality.data``), for two
embeddings: the README's path (``scatlas.tl.train_metric`` at its defaults on the reference
cells, ``model.embed``) and PCA (log-normalised counts, the 2,000 most variable genes of the
reference cells, 50 components fitted on them, the other cells projected). Each split names a
**query batch** ``d``, a **calibration batch** ``c`` and, for the unseen-type tests, a
**left-out label** ``T``:

- reference = the cells of the other batches, label ``T`` removed: the embedding is fitted on
  them and they are indexed (``CellIndex.build``, cosine, exact);
- calibration cells = batch ``c`` without ``T`` (labelled reference-like cells that are neither
  indexed nor used to fit the embedding): ``idx.calibrate_ood``;
- queries = every cell of ``d`` plus the ``T`` cells of every other batch; **seen** = the cells
  of ``d`` whose label the reference has, **unseen** = the ``T`` cells.

Tests: ``cellbench`` leave-a-line-out (each of the 5 lines, each batch holding it as ``d``),
``baron_loto`` leave-one-type-out within the human donors (each of the 5 types x 4 human donors
as ``d``) and ``baron_species`` (reference: human donors; unseen = every mouse cell; no label
left out; 4 human donors as ``d``). ``c`` is the next batch after ``d`` (in sorted order, among
the human donors for Baron) that still leaves reference cells.

Per split and embedding: the flagged fraction of seen and unseen queries under

- **before**: ``min_dist`` > the 0.99 quantile of the index's own 1-NN distances (self excluded;
  ``annotate``'s default before ``calibrate_ood`` existed, and still without calibration);
- **after**: ``min_dist`` > the conformal 0.99 (and 0.95) quantile of the calibration cells'
  ``min_dist`` (``annotate``'s default once the index is calibrated);

the AUROC for unseen vs seen of ``min_dist`` and of the alternatives weighed for the flag
(:func:`other_scores`: k-th neighbour distance, mean of 5, nearest cell of the predicted label,
its margin ratio, ``1 - confidence``, ``1 - vs_second``), the accuracy, ECE and
mean confidence of the seen queries (``scatlas.search.calibration``), the accuracy of the
unseen queries on ``baron_species`` (mouse cells of types the human reference has) and the
medians of the three ``min_dist`` populations (indexed cells to each other, calibration cells,
seen queries), which show why the index's own distances mis-set the threshold. Pooled rows sum
the counts over splits (AUROC: mean over splits).

Writes ``bench/results/annotate_ood_cpu.json``; exits 1 when a split failed (its error is in
the JSON), 0 otherwise. ``--quick``: the first query batch per left-out label only.
``--calibration``: ``batch`` (above) and / or ``random``: the calibration cells are instead a
random fifth (``RANDOM_FRACTION``) of the reference batches' cells, held out from fitting and
indexing (what a user without a spare batch can do); the reference keeps batch ``c``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .environment import capture
from .io import atomic_write_text
from .quality import data
from .runner import DEFAULT_OUT, log

K = 50
N_HVG = 2000
N_PCS = 50
EMBEDDINGS = ("metric", "pca")
TESTS = ("cellbench", "baron_loto", "baron_species")
PROTOCOLS = ("batch", "random")
RANDOM_FRACTION = 0.2


# ------------------------------------------------------------------------------------ splits
def _next_batch(batches: list[str], d: str) -> str:
    i = batches.index(d)
    return batches[(i + 1) % len(batches)]


def splits(test: str, adata: Any, quick: bool, protocol: str = "batch",
           seed: int = 0) -> Iterator[dict[str, Any]]:
    """``{"name", "query", "calibration", "left_out", masks...}`` for each split of ``test``
    (calibration ``protocol``: ``"batch"`` or ``"random"``, see the module docstring)."""
    for s in _splits(test, adata, quick):
        if protocol == "random":  # a random fifth of the reference batches' cells instead
            pool_ref = s["reference"] | s["calibration"]
            rng = np.random.default_rng([seed, zlib.crc32(s["name"].encode())])
            hold = rng.uniform(size=pool_ref.size) < RANDOM_FRACTION
            s = {**s, "reference": pool_ref & ~hold, "calibration": pool_ref & hold,
                 "calibration_batch": None,
                 "name": s["name"].replace(f"calibration={s['calibration_batch']}",
                                           "calibration=random")}
        yield {**s, "protocol": protocol}


def _splits(test: str, adata: Any, quick: bool) -> Iterator[dict[str, Any]]:
    batch = adata.obs["batch"].astype(str).to_numpy()
    label = adata.obs["label"].astype(str).to_numpy()
    if test == "cellbench":
        allb = sorted(set(batch))
        for T in sorted(set(label)):
            holders = sorted(set(batch[label == T]))
            for d in holders[:1] if quick else holders:
                c = _next_batch(allb, d)
                yield _masks(test, batch, label, d, c, T, np.ones(batch.size, bool))
    elif test in ("baron_loto", "baron_species"):
        human = np.char.startswith(batch.astype(str), "human")
        hb = sorted(set(batch[human]))
        if test == "baron_species":
            for d in hb[:1] if quick else hb:
                c = _next_batch(hb, d)
                s = _masks(test, batch, label, d, c, None, human)
                s["unseen"] = ~human  # every mouse cell
                s["queries"] = (batch == d) | ~human
                yield s
        else:
            for T in sorted(set(label[human])):
                for d in hb[:1] if quick else hb:
                    c = _next_batch(hb, d)
                    yield _masks(test, batch, label, d, c, T, human)
    else:
        raise ValueError(f"unknown test {test!r}")


def _masks(test: str, batch: np.ndarray, label: np.ndarray, d: str, c: str, T: str | None,
           pool: np.ndarray) -> dict[str, Any]:
    other = label != T if T is not None else np.ones(batch.size, bool)
    ref = pool & (batch != d) & (batch != c) & other
    return {"test": test, "name": f"query={d},calibration={c}" + (f",left_out={T}" if T else ""),
            "query_batch": d, "calibration_batch": c, "left_out": T,
            "reference": ref, "calibration": pool & (batch == c) & other,
            "queries": pool & ((batch == d) | ~other), "unseen": pool & ~other}


# -------------------------------------------------------------------------------- embeddings
#: the encoder settings recorded per row (``model.info`` and its config)
MODEL_FACTS = ("preset", "n_top_genes", "input_pcs", "hidden", "latent_dim", "objective",
               "steps", "sparse_step")


def embed_metric(ref: Any, others: list[Any], seed: int) -> tuple[list[np.ndarray], dict]:
    import scatlas

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scatlas.tl.train_metric(ref, "label", "batch", seed=seed, progress=False)
    info = dict(getattr(model, "info", {}) or {})
    config = getattr(model, "config", None)
    facts = {k: info.get(k, getattr(config, k, None)) for k in MODEL_FACTS}
    facts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in facts.items()}
    return [np.asarray(model.embed(a, progress=False), np.float32) for a in [ref, *others]], facts


def embed_pca(ref: Any, others: list[Any], seed: int) -> tuple[list[np.ndarray], dict]:
    import anndata as ad
    import scanpy as sc
    from sklearn.decomposition import PCA

    from scatlas.models.data import lognorm

    L = [lognorm(a.X, dense=False) for a in [ref, *others]]
    tmp = ad.AnnData(L[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(tmp, n_top_genes=min(N_HVG, ref.n_vars), flavor="seurat")
    genes = np.flatnonzero(tmp.var["highly_variable"].to_numpy())
    dense = [x[:, genes].toarray() for x in L]
    pca = PCA(min(N_PCS, dense[0].shape[0] - 1, genes.size), random_state=seed).fit(dense[0])
    return ([pca.transform(x).astype(np.float32) for x in dense],
            {"n_hvg": int(genes.size), "n_pcs": int(pca.n_components_)})


# -------------------------------------------------------------------------------- scoring
def _auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, np.nan_to_num(score, nan=1.0)))


def other_scores(idx: Any, Z_q: np.ndarray, table: Any, y_ref: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """The alternatives to ``min_dist`` weighed for the flag (higher = more out of
    distribution): the 5th / 10th neighbour's distance, the mean of the 5 nearest, the distance
    to the nearest cell of the predicted label, its ratio to the nearest cell of another label
    (a margin), and ``1 - vs_second``."""
    D, ids = idx.search(Z_q, K)
    D, ids = np.asarray(D, np.float64), np.asarray(ids)
    lab = np.where(ids >= 0, np.asarray(y_ref, dtype=object)[np.maximum(ids, 0)], None)
    same = lab == table["label"].to_numpy(dtype=object)[:, None]
    near_same = np.where(same, D, np.inf).min(axis=1)
    near_other = np.where(~same & (ids >= 0), D, np.inf).min(axis=1)
    return {"kth5": D[:, 4], "kth10": D[:, 9], "mean5": D[:, :5].mean(axis=1),
            "label_min_dist": near_same,
            "label_margin_ratio": near_same / np.maximum(near_other, 1e-12),
            "1_minus_vs_second": 1.0 - table["vs_second"].to_numpy()}


def score_split(Z_ref: np.ndarray, y_ref: np.ndarray, Z_cal: np.ndarray, y_cal: np.ndarray,
                Z_q: np.ndarray, y_q: np.ndarray, unseen: np.ndarray) -> dict[str, Any]:
    import pandas as pd

    from scatlas.search import CellIndex, annotate
    from scatlas.search.calibration import calibration

    idx = CellIndex.build(Z_ref, pd.DataFrame({"label": y_ref}), engine="exact")
    before = idx.ood_distance(0.99)
    own = idx.search(Z_ref, 2)[0][:, 1]  # every indexed cell's 1-NN, itself excluded
    table_before = annotate(idx, Z_q, K, label_key="label")
    assert table_before.attrs["ood_source"] == "index"
    rec = idx.calibrate_ood(Z_cal, labels=y_cal, label_key="label")
    after = {q: rec["quantiles"][str(q)] for q in (0.95, 0.99)}
    table = annotate(idx, Z_q, K, label_key="label")
    assert table.attrs["ood_source"] == "calibration"
    d = table["min_dist"].to_numpy()
    conf = table["confidence"].to_numpy()
    seen = ~unseen
    out: dict[str, Any] = {
        "n_reference": int(len(y_ref)), "n_calibration": rec["n_cells"],
        "n_seen": int(seen.sum()), "n_unseen": int(unseen.sum()),
        "threshold_before": before, "threshold_after_q0.99": after[0.99],
        "threshold_after_q0.95": after[0.95],
        "median_min_dist_indexed": float(np.median(own)),
        "median_min_dist_calibration": float(np.median(idx.search(Z_cal, 1)[0][:, 0])),
        "median_min_dist_seen": float(np.median(d[seen])),
        "median_min_dist_unseen": float(np.median(d[unseen])) if unseen.any() else None,
        "auroc_min_dist": _auroc(unseen, d),
        "auroc_1_minus_confidence": _auroc(unseen, 1.0 - conf),
    }
    out.update({f"auroc_{name}": _auroc(unseen, v)
                for name, v in other_scores(idx, Z_q, table, y_ref).items()})
    flags = {"before": d > before, "after_q0.99": table["is_ood"].to_numpy(),
             "after_q0.95": d > after[0.95]}
    assert np.array_equal(flags["after_q0.99"], d > after[0.99])
    assert np.array_equal(table_before["is_ood"].to_numpy(), flags["before"])
    for name, f in flags.items():
        out[f"flagged_seen_{name}"] = int(f[seen].sum())
        out[f"flagged_unseen_{name}"] = int(f[unseen].sum())
    pred = table["label"].to_numpy()
    cal_seen = calibration(pred[seen], conf[seen], y_q[seen], is_ood=flags["after_q0.99"][seen])
    out.update({"accuracy_seen": cal_seen.accuracy, "ece_seen": cal_seen.ece,
                "mean_confidence_seen": cal_seen.mean_confidence,
                "correct_seen": cal_seen.n_correct})
    known = set(y_ref)
    un_known = unseen & np.isin(y_q, list(known))  # cross-species cells of reference types
    if un_known.any():
        ok = pred[un_known] == y_q[un_known]
        out.update({"n_unseen_known_type": int(un_known.sum()),
                    "correct_unseen_known_type": int(ok.sum()),
                    "mean_confidence_unseen_wrong": (float(conf[un_known][~ok].mean())
                                                     if (~ok).any() else None),
                    "flagged_unseen_wrong_after_q0.99": int(flags["after_q0.99"][un_known][~ok]
                                                            .sum()),
                    "flagged_unseen_wrong_before": int(flags["before"][un_known][~ok].sum())})
    return out


def run_test(test: str, embeddings: Sequence[str], quick: bool, seed: int,
             protocol: str = "batch") -> list[dict]:
    name = "cellbench" if test == "cellbench" else "baron_donor"
    if not data.available(name):
        log(f"annotate_ood: {test}: {data.DATASETS[name][0]} is absent; skipped")
        return []
    adata = data.load(name)
    label = adata.obs["label"].astype(str).to_numpy()
    rows = []
    for s in splits(test, adata, quick, protocol, seed):
        ref, cal, q = (adata[s[key]].copy() for key in ("reference", "calibration", "queries"))
        unseen = s["unseen"][s["queries"]]
        for emb in embeddings:
            base = {"test": test, "split": s["name"], "embedding": emb, "seed": seed,
                    "calibration": protocol}
            t0 = time.perf_counter()
            try:
                fn = embed_metric if emb == "metric" else embed_pca
                (Z_ref, Z_cal, Z_q), facts = fn(ref, [cal, q], seed)
                base["embedding_settings"] = facts
                res = score_split(Z_ref, label[s["reference"]], Z_cal, label[s["calibration"]],
                                  Z_q, label[s["queries"]], unseen)
                rows.append({**base, **res, "seconds": time.perf_counter() - t0,
                             "error": None})
            except Exception as err:  # noqa: BLE001 - recorded; the exit status reports it
                traceback.print_exc()
                rows.append({**base, "seconds": time.perf_counter() - t0,
                             "error": f"{type(err).__name__}: {err}"})
            r = rows[-1]
            if r["error"] is None:
                log(f"annotate_ood: {test} {s['name']} {emb}: seen flagged "
                    f"{r['flagged_seen_before']}/{r['n_seen']} before, "
                    f"{r['flagged_seen_after_q0.99']} after; unseen "
                    f"{r['flagged_unseen_before']}/{r['n_unseen']} before, "
                    f"{r['flagged_unseen_after_q0.99']} after; AUROC {r['auroc_min_dist']}")
            else:
                log(f"annotate_ood: {test} {s['name']} {emb}: FAILED {r['error']}")
    return rows


def pooled(rows: list[dict]) -> list[dict]:
    """Per (test, embedding): summed counts -> fractions; AUROC and medians averaged."""
    out = []
    keys = sorted({(r["test"], r["embedding"], r["calibration"]) for r in rows
                   if r.get("error") is None})
    for test, emb, protocol in keys:
        rs = [r for r in rows if (r["test"], r["embedding"], r["calibration"])
              == (test, emb, protocol) and r.get("error") is None]
        n_seen = sum(r["n_seen"] for r in rs)
        n_unseen = sum(r["n_unseen"] for r in rs)
        p: dict[str, Any] = {"test": test, "embedding": emb, "calibration": protocol,
                             "n_splits": len(rs),
                             "n_seen": n_seen, "n_unseen": n_unseen}
        for rule in ("before", "after_q0.99", "after_q0.95"):
            p[f"fraction_seen_flagged_{rule}"] = sum(r[f"flagged_seen_{rule}"]
                                                     for r in rs) / max(n_seen, 1)
            p[f"fraction_unseen_flagged_{rule}"] = sum(r[f"flagged_unseen_{rule}"]
                                                       for r in rs) / max(n_unseen, 1)
        for key in ("auroc_min_dist", "auroc_1_minus_confidence", "auroc_kth5", "auroc_kth10",
                    "auroc_mean5", "auroc_label_min_dist", "auroc_label_margin_ratio",
                    "auroc_1_minus_vs_second", "ece_seen",
                    "median_min_dist_indexed", "median_min_dist_calibration",
                    "median_min_dist_seen", "median_min_dist_unseen"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            p[f"mean_{key}"] = float(np.mean(vals)) if vals else None
        p["accuracy_seen"] = sum(r["correct_seen"] for r in rs) / max(n_seen, 1)
        uk = [r for r in rs if "n_unseen_known_type" in r]
        if uk:
            n_uk = sum(r["n_unseen_known_type"] for r in uk)
            n_wrong = n_uk - sum(r["correct_unseen_known_type"] for r in uk)
            p["accuracy_unseen_known_type"] = 1 - n_wrong / max(n_uk, 1)
            for rule in ("before", "after_q0.99"):
                p[f"fraction_unseen_wrong_flagged_{rule}"] = (
                    sum(r[f"flagged_unseen_wrong_{rule}"] for r in uk) / max(n_wrong, 1))
        out.append(p)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.annotate_ood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", default=",".join(TESTS), help=f"subset of {TESTS}")
    parser.add_argument("--embeddings", default=",".join(EMBEDDINGS),
                        help=f"subset of {EMBEDDINGS}")
    parser.add_argument("--calibration", default=",".join(PROTOCOLS),
                        help=f"calibration protocols, subset of {PROTOCOLS}")
    parser.add_argument("--quick", action="store_true", help="one query batch per label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    tests = [t for t in args.tests.split(",") if t]
    embs = [e for e in args.embeddings.split(",") if e]
    protocols = [p for p in args.calibration.split(",") if p]
    bad = ([t for t in tests if t not in TESTS] + [e for e in embs if e not in EMBEDDINGS]
           + [p for p in protocols if p not in PROTOCOLS])
    if bad:
        parser.error(f"unknown test(s) / embedding(s) {bad}")
    t0 = time.perf_counter()
    rows: list[dict] = []
    for protocol in protocols:
        for test in tests:
            rows += run_test(test, embs, args.quick, args.seed, protocol)
    record = {"benchmark": "annotate_ood", "device": "cpu", "environment": capture("cpu"),
              "command": "python -m bench.annotate_ood " + " ".join(argv or sys.argv[1:]),
              "k": K, "quick": args.quick, "random_fraction": RANDOM_FRACTION,
              "seconds": time.perf_counter() - t0,
              "pooled": pooled(rows), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "annotate_ood_cpu.json"
    atomic_write_text(path, json.dumps(record, indent=1, default=float) + "\n")
    for p in record["pooled"]:
        f = {k: v for k, v in p.items() if isinstance(v, float)}
        log(f"annotate_ood: {p['test']:14s} {p['embedding']:6s} {p['calibration']:6s} seen "
            "flagged "
            f"{f['fraction_seen_flagged_before']:.3f} -> "
            f"{f['fraction_seen_flagged_after_q0.99']:.3f} (q0.95 "
            f"{f['fraction_seen_flagged_after_q0.95']:.3f}); unseen flagged "
            f"{f['fraction_unseen_flagged_before']:.3f} -> "
            f"{f['fraction_unseen_flagged_after_q0.99']:.3f} (q0.95 "
            f"{f['fraction_unseen_flagged_after_q0.95']:.3f}); AUROC min_dist "
            f"{f.get('mean_auroc_min_dist', float('nan')):.3f}, 1-confidence "
            f"{f.get('mean_auroc_1_minus_confidence', float('nan')):.3f}")
    log(f"annotate_ood: wrote {path}")
    failed = [r for r in rows if r.get("error")]
    if failed or not rows:
        log(f"annotate_ood: {len(failed)} split(s) failed" if rows else "annotate_ood: no data")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

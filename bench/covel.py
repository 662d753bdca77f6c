"""CoVEL benchmark (issue 21): unpaired and paired CITE-seq, synthetic RNA + ATAC, ablation.

    python -m bench.covel --section unpaired --seeds 0 1 2      # ours, linked-feature CCA
    python -m bench.covel --section scglue --seeds 0            # the scglue 0.4.1 peer
    python -m bench.covel --section paired --seeds 0            # ours paired vs tl.train_mvae
    python -m bench.covel --section synthetic --seeds 0
    python -m bench.covel --section ablation --seeds 0

Each section writes ``bench/results/covel_<section>.json`` (rows, checks, environment) and
exits non-zero when a method fails. Data: the 500 ECCITE-seq PBMCs of ../shared/data
(``bench.quality.data.load("cite")``: RNA counts, 49 ADT counts).

- ``unpaired``: RNA and protein as two AnnData objects, each shuffled by its own permutation of
  ``default_rng([seed, 21])`` and renamed (``r<i>`` / ``p<i>``), so the pairing is hidden;
  graph: the curated antibody -> gene table (``graphs.gene_protein_graph``). Ours:
  ``tl.train_covel(..., seed=seed)`` at its defaults; FOSCTTM of the RNA and protein embeddings
  on the true pairs (``models.mvae_eval.foscttm``); ``impute_r``: mean over proteins of the
  Pearson r across cells of ``log1p(impute(rna -> protein))`` and ``log1p`` of the measured
  counts. Baseline ``cca_linked``: Seurat-style CCA (``kernels.cca``, k = 20) between RNA
  aggregated over each protein's linked genes (mean of ``log1p(1e4 x / total)`` over the genes)
  and ``log1p(1e4 y / total)`` of the proteins with a linked gene; FOSCTTM of its canonical
  vectors on the true pairs.
- ``scglue``: the same shuffled inputs and links to scglue 0.4.1 at its defaults in its own
  venv (bench/peers/covel_scglue_install.sh, bench/peers/covel_scglue_runner.py); training
  cells/s = epochs x training cells / fit seconds (epochs parsed from scglue's log).
- ``paired``: the splits of bench/quality/vae.py (split ``s``: 350 training / 150 held-out
  cells); ours with ``paired=True`` and ``tl.train_mvae`` at its defaults
  (``bench.quality.vae.fit_ours``) trained on the 350, FOSCTTM and ``impute_r`` (log1p, per
  protein) on the 150.
- ``synthetic``: ``graphs.synthetic_multiome(1000, 200, seed=seed)`` (unpaired RNA and ATAC
  cells, 5 states, planted gene -> peak links); graph: ``gene_peak_graph`` (150 kb window, so it
  holds the planted links and as many decoys); label transfer = accuracy of a 5-NN classifier
  fitted on the RNA embeddings predicting the ATAC cells' states; link AUROC = AUROC of the
  cosine similarity of the learned gene and peak vectors over every gene-peak pair of the
  window graph, planted vs decoy.
- ``ablation``: ``unpaired`` (CITE-seq) and ``synthetic`` with each view switched (graph,
  contrastive, align off; fine-grained on, being off by default).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCGLUE_PY = ROOT / "bench" / ".peers" / "scglue" / "bin" / "python"
ABLATION = {"default": {}, "fine_grained_on": {"fine_grained": True},
            "graph_off": {"graph_view": False}, "contrastive_off": {"contrastive": False},
            "align_off": {"align": False}}


# ------------------------------------------------------------------------------- data

def cite() -> tuple[Any, Any]:
    """(rna, protein) AnnData of the 500 CITE-seq cells, raw counts, the same cell order."""
    import anndata as ad
    import pandas as pd

    from bench.quality.data import load

    a = load("cite")
    rna = ad.AnnData(a.X, obs=pd.DataFrame(index=a.obs_names), var=a.var[[]].copy())
    prot = ad.AnnData(np.asarray(a.obsm["protein_counts"], np.float32),
                      obs=pd.DataFrame(index=a.obs_names),
                      var=pd.DataFrame(index=[str(p) for p in a.uns["protein_names"]]))
    return rna, prot


def hide_pairing(rna: Any, prot: Any, seed: int) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """Shuffled, renamed copies and, per original cell, its row in each copy."""
    rng = np.random.default_rng([seed, 21])
    pr, pp = rng.permutation(rna.n_obs), rng.permutation(prot.n_obs)
    r, p = rna[pr].copy(), prot[pp].copy()
    r.obs_names = [f"r{i}" for i in range(r.n_obs)]
    p.obs_names = [f"p{i}" for i in range(p.n_obs)]
    return r, p, np.argsort(pr), np.argsort(pp)


def _lognorm(X: Any) -> np.ndarray:
    import scipy.sparse as sp

    X = X.toarray() if sp.issparse(X) else np.asarray(X, np.float64)
    return np.log1p(1e4 * X / np.maximum(X.sum(1, keepdims=True), 1))


def per_feature_r(pred: np.ndarray, truth: np.ndarray) -> float:
    from bench.quality.vae import per_protein_pearson

    return float(per_protein_pearson(pred, truth).mean())


# ----------------------------------------------------------------------------- methods

def ours_unpaired(r: Any, p: Any, ir: np.ndarray, ip: np.ndarray, seed: int,
                  **kw: Any) -> dict[str, Any]:
    from scatlas import graphs, tl
    from scatlas.models.mvae_eval import foscttm

    t0 = time.perf_counter()
    g = graphs.gene_protein_graph(p.var_names, r.var_names)
    model = tl.train_covel({"rna": r, "protein": p}, g, seed=seed, progress=False, **kw)
    fit_s = time.perf_counter() - t0
    zr, zp = model.embed(r, "rna"), model.embed(p, "protein")
    imp = model.impute(r, "rna", "protein").to_numpy()
    truth = np.log1p(np.asarray(p.X, np.float64))[ip]
    return {"foscttm": foscttm(zr[ir], zp[ip]), "impute_r": per_feature_r(np.log1p(imp[ir]),
                                                                          truth),
            "cells_per_s": model.info["cells_per_s"], "steps": model.info["steps"],
            "seconds": fit_s}


def cca_linked(r: Any, p: Any, ir: np.ndarray, ip: np.ndarray) -> dict[str, Any]:
    from scatlas import graphs
    from scatlas.kernels.cca import cca
    from scatlas.models.mvae_eval import foscttm

    t0 = time.perf_counter()
    links = graphs.gene_protein_graph(p.var_names, r.var_names).edges
    L = _lognorm(r.X)
    col = {g: i for i, g in enumerate(r.var_names)}
    prots = sorted(set(links["target"]))
    agg = np.stack([L[:, [col[g] for g in links.loc[links["target"] == q, "source"]]].mean(1)
                    for q in prots], 1)
    P = _lognorm(np.asarray(p.X))[:, [list(p.var_names).index(q) for q in prots]]
    z1, z2 = cca(agg, P, k=20)
    return {"foscttm": foscttm(np.asarray(z1)[ir], np.asarray(z2)[ip]),
            "n_proteins": float(len(prots)), "seconds": time.perf_counter() - t0}


def scglue_unpaired(r: Any, p: Any, ir: np.ndarray, ip: np.ndarray, seed: int
                    ) -> dict[str, Any]:
    from scatlas import graphs
    from scatlas.models.mvae_eval import foscttm

    if not SCGLUE_PY.exists():
        raise RuntimeError(f"{SCGLUE_PY} missing: run bench/peers/covel_scglue_install.sh")
    links = graphs.gene_protein_graph(p.var_names, r.var_names).edges
    with tempfile.TemporaryDirectory() as tmp:
        r.write_h5ad(f"{tmp}/rna.h5ad")
        p.write_h5ad(f"{tmp}/prot.h5ad")
        links[["source", "target"]].to_csv(f"{tmp}/links.tsv", sep="\t", index=False)
        t0 = time.perf_counter()
        proc = subprocess.run([str(SCGLUE_PY), str(ROOT / "bench/peers/covel_scglue_runner.py"),
                               tmp, f"{tmp}/out.npz", str(seed)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"scglue failed: {proc.stderr[-3000:]}")
        out = dict(np.load(f"{tmp}/out.npz"))
    log = proc.stdout + proc.stderr
    epochs = [int(e) for e in re.findall(r"\[Epoch (\d+)\]", log)]
    # pretraining and fine-tuning each count from epoch 1: sum the two maxima
    runs, last = [], 0
    for e in epochs:
        if e < last:
            runs.append(last)
        last = e
    runs.append(last)
    n_train = 0.9 * float(out["n_cells"])  # scglue holds 10% out for validation
    fit_s = float(out["fit_s"])
    return {"foscttm": foscttm(out["rna"][ir], out["prot"][ip]),
            "epochs": float(sum(runs)), "fit_s": fit_s, "seconds": wall,
            "cells_per_s": sum(runs) * n_train / fit_s if runs and fit_s else float("nan")}


def paired_split(rna: Any, prot: Any, split_id: int, seed: int) -> list[dict[str, Any]]:
    import anndata as ad

    from bench.quality.vae import fit_ours, split
    from scatlas import graphs, tl
    from scatlas.models.mvae_eval import foscttm

    train, test = split(rna.n_obs, split_id)
    g = graphs.gene_protein_graph(prot.var_names, rna.var_names)
    t0 = time.perf_counter()
    model = tl.train_covel({"rna": rna[train].copy(), "protein": prot[train].copy()}, g,
                           paired=True, seed=seed, progress=False)
    fit_s = time.perf_counter() - t0
    rt, pt = rna[test].copy(), prot[test].copy()
    f = foscttm(model.embed(rt, "rna"), model.embed(pt, "protein"))
    imp = np.log1p(model.impute(rt, "rna", "protein").to_numpy())
    ours = {"foscttm": f, "impute_r": per_feature_r(imp, np.log1p(np.asarray(pt.X, float))),
            "cells_per_s": model.info["cells_per_s"], "seconds": fit_s}
    both = ad.AnnData(rna.X, obs=rna.obs[[]].copy(), var=rna.var[[]].copy())
    both.obsm["protein_counts"] = np.asarray(prot.X, np.float32)
    mv = fit_ours(both, train, test, seed)
    mvae = {"foscttm": mv["foscttm"], "impute_r": mv["impute_r_mean"], "seconds": mv["seconds"]}
    return [_row("paired", "cite", f"{split_id}/seed{seed}", "covel_paired", ours),
            _row("paired", "cite", f"{split_id}/seed{seed}", "mvae", mvae)]


def synthetic_run(seed: int, **kw: Any) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import KNeighborsClassifier

    from scatlas import graphs, tl

    s = graphs.synthetic_multiome(1000, 200, seed=seed)
    g = graphs.gene_peak_graph(s.genes, list(s.atac.var_names))
    t0 = time.perf_counter()
    model = tl.train_covel({"rna": s.rna, "atac": s.atac}, g, seed=seed, progress=False, **kw)
    fit_s = time.perf_counter() - t0
    zr, za = model.embed(s.rna, "rna"), model.embed(s.atac, "atac")
    knn = KNeighborsClassifier(5).fit(zr, s.rna.obs["state"])
    acc = float((knn.predict(za) == s.atac.obs["state"].to_numpy()).mean())
    fe = model.feature_embeddings()
    c = s.candidates
    G = fe["rna"].loc[c["source"]].to_numpy()
    P = fe["atac"].loc[c["target"]].to_numpy()
    cos = (G * P).sum(1) / np.linalg.norm(G, axis=1) / np.linalg.norm(P, axis=1)
    return {"label_transfer": acc, "link_auroc": float(roc_auc_score(c["planted"], cos)),
            "cells_per_s": model.info["cells_per_s"], "seconds": fit_s}


# ---------------------------------------------------------------------------------- run

def _row(section: str, dataset: str, split: str, method: str, metrics: dict[str, Any],
         error: str | None = None) -> dict[str, Any]:
    return {"section": section, "dataset": dataset, "split": split, "method": method,
            "error": error, **{k: (float(v) if v is not None else None)
                               for k, v in metrics.items()}}


def _guard(rows: list, section: str, dataset: str, split: str, method: str, fn: Any,
           *args: Any, **kw: Any) -> None:
    try:
        rows.append(_row(section, dataset, split, method, fn(*args, **kw)))
    except Exception as err:  # recorded; the run exits non-zero
        traceback.print_exc()
        rows.append(_row(section, dataset, split, method, {}, error=repr(err)[:2000]))
    print(json.dumps(rows[-1]), flush=True)


def run(section: str, seeds: list[int], datasets: tuple[str, ...] = ("cite", "synthetic"),
        configs: tuple[str, ...] = tuple(ABLATION), max_steps: int | None = None
        ) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if section in ("unpaired", "scglue", "ablation"):
        rna, prot = cite()
    if section == "paired":
        rna, prot = cite()
        for s in seeds:
            try:
                rows += paired_split(rna, prot, s, s)
            except Exception as err:
                traceback.print_exc()
                rows.append(_row("paired", "cite", f"{s}/seed{s}", "covel_paired", {},
                                 error=repr(err)))
            print(json.dumps(rows[-2:]), flush=True)
    for seed in seeds:
        if section == "unpaired":
            r, p, ir, ip = hide_pairing(rna, prot, seed)
            _guard(rows, section, "cite", f"seed{seed}", "covel",
                   ours_unpaired, r, p, ir, ip, seed)
            _guard(rows, section, "cite", f"seed{seed}", "cca_linked",
                   cca_linked, r, p, ir, ip)
        elif section == "scglue":
            r, p, ir, ip = hide_pairing(rna, prot, seed)
            _guard(rows, section, "cite", f"seed{seed}", "scglue",
                   scglue_unpaired, r, p, ir, ip, seed)
        elif section == "synthetic":
            _guard(rows, section, "synthetic", f"seed{seed}", "covel",
                   synthetic_run, seed)
        elif section == "ablation":
            r, p, ir, ip = hide_pairing(rna, prot, seed)
            for name in configs:
                kw = {**ABLATION[name], **({"max_steps": max_steps} if max_steps else {})}
                if "cite" in datasets:
                    _guard(rows, section, "cite", f"seed{seed}", name,
                           ours_unpaired, r, p, ir, ip, seed, **kw)
                if "synthetic" in datasets:
                    _guard(rows, section, "synthetic", f"seed{seed}", name,
                           synthetic_run, seed, **kw)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", required=True,
                    choices=("unpaired", "scglue", "paired", "synthetic", "ablation"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--datasets", nargs="+", default=["cite", "synthetic"],
                    help="ablation: which data (cite, synthetic)")
    ap.add_argument("--configs", nargs="+", default=list(ABLATION), choices=list(ABLATION),
                    help="ablation: which settings")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="ablation: training steps of every setting (default: the library's)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/covel_<section>"
                    ".json)")
    args = ap.parse_args(argv)
    rows = run(args.section, args.seeds, tuple(args.datasets), tuple(args.configs),
               args.max_steps)
    record = {"section": args.section, "seeds": args.seeds, "rows": rows,
              "command": "python -m bench.covel " + " ".join(sys.argv[1:] if argv is None
                                                              else argv)}
    try:
        from bench.environment import capture

        record["environment"] = capture("cpu")
    except Exception:  # the environment record is best effort
        pass
    out = Path(args.out or RESULTS / f"covel_{args.section}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from scatlas.io import atomic_write

    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=float))
    failed = [r for r in rows if r["error"]]
    print(f"wrote {out}; {len(rows)} rows, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

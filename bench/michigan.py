"""Benchmark ``michigan``: MichiGAN's disentanglement, realism, latent arithmetic and speed
(issue 22 item 1). CPU only here; figures in ``bench/results/michigan_cpu.json``.

(a) ``mig``: synthetic cells whose expression is driven by ``K`` independent uniform factors
    (10 levels each; counts ``Poisson(2,000 softmax(b + W f))``, log-normalised). The mutual
    information gap (MIG; Chen et al. 2018 sec. 5: per factor, the gap between the two latent
    dimensions with the largest mutual information, over the factor's entropy; latents binned in
    20 bins as disentanglement_lib) of the beta-TCVAE's posterior means vs a plain VAE's (the
    same network and steps, ``beta = 1``), several seeds.
(b) ``realism``: CellBench (``../shared/data/cellbench_lung_celllines_5batch.h5ad``), one batch
    left out of training (default ``sc_celseq2_5cl_p3``, :data:`HOLDOUT`; 1,000 HVGs). For the
    held-out cells' posterior means, the GAN's profiles and the VAE decoder's own (Gaussian
    samples; its mean too) are compared with the real held-out profiles (log-normalised, the
    model's genes), in the 30 principal components of the training cells and on the genes
    themselves (``*_genes``): the unbiased RBF-MMD^2 (bandwidth: median pairwise distance of the
    real held-out cells; lower is better) and the ROC AUC of a 15-NN classifier telling real
    from generated (5-fold cross-validated; 0.5 is indistinguishable); and the fraction of
    zeros (real cells: ``real_zero_fraction``).
(c) ``shift``: synthetic control/stimulated cells of three types; the stimulation moves 60 of
    300 genes. Trained without type B's stimulated cells; ``latent_shift`` from type A's
    controls to A's stimulated cells, applied to B's controls; the predicted mean shift
    (generated shifted minus generated unshifted) against the true one (fresh stimulated B
    cells from the simulator minus the B controls), Pearson r over genes (target >= 0.8).
(d) ``speed``: training cells/s of each stage (from the loop's timing, compile excluded).

Usage::

    python -m bench.michigan [--seeds 0,1,2] [--parts mig,realism,shift] [--quick]

Exits 1 when a part raised or produced a non-finite figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: training settings of parts (b) and (c) (``--vae-steps``, ``--gan-steps``, ``--gan-lr``)
TRAIN: dict[str, Any] = {"vae_steps": 1500, "gan_steps": 4000, "gan_learning_rate": 5e-4,
                         "beta": 2.0}
#: the total-correlation weight of part (a)'s beta-TCVAE (``--mig-beta``)
MIG_BETA = [2.0]
#: the CellBench batch left out by default: a CEL-seq2 plate of the 5-line mixture (two other
#: plates of the same design train), so that the held-out cells differ from training by plate,
#: not by technology
HOLDOUT = "sc_celseq2_5cl_p3"
RESULTS = Path(__file__).parent / "results" / "michigan_cpu.json"
CELLBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / \
    "cellbench_lung_celllines_5batch.h5ad"


# ------------------------------------------------------------------------------------ helpers

def _counts_adata(counts: np.ndarray, obs: dict[str, Any] | None = None):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    a = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)),
                   obs=pd.DataFrame(obs or {}, index=[f"c{i}" for i in range(len(counts))]))
    a.var_names = [f"g{j}" for j in range(counts.shape[1])]
    return a


def _lognorm(counts: Any) -> np.ndarray:
    from scatlas.models.data import lognorm

    return np.asarray(lognorm(counts), np.float64)


def mig(latent: np.ndarray, factors: np.ndarray, bins: int = 20) -> float:
    """Mutual information gap of (n, D) codes for (n, K) discrete factors."""
    from sklearn.metrics import mutual_info_score

    binned = [np.digitize(z, np.histogram(z, bins)[1][:-1]) for z in latent.T]
    gaps = []
    for f in factors.T:
        mi = np.sort([mutual_info_score(f, b) for b in binned])[::-1]
        gaps.append((mi[0] - mi[1]) / mutual_info_score(f, f))
    return float(np.mean(gaps))


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased squared MMD with the kernel ``exp(-|a - b|^2 / (2 bandwidth^2))``."""
    from scipy.spatial.distance import cdist

    g = 1.0 / (2.0 * bandwidth**2)
    kxx, kyy = np.exp(-g * cdist(x, x, "sqeuclidean")), np.exp(-g * cdist(y, y, "sqeuclidean"))
    kxy = np.exp(-g * cdist(x, y, "sqeuclidean"))
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean())


def knn_auc(real: np.ndarray, fake: np.ndarray, k: int = 15, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a k-NN classifier of real (0) vs generated (1) profiles."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    X = np.vstack([real, fake])
    y = np.r_[np.zeros(len(real)), np.ones(len(fake))]
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    p = cross_val_predict(KNeighborsClassifier(k), X, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def _vae_only(adata, beta: float, seed: int, steps: int, latent_dim: int) -> tuple[np.ndarray,
                                                                                   float]:
    """Posterior means of a beta-TCVAE trained alone (stage 1 of MichiGAN.fit) and cells/s."""
    import jax
    import jax.numpy as jnp

    from scatlas.models.data import CellBatches
    from scatlas.models.michigan import MichiGANConfig
    from scatlas.models.michigan._module import TCVAE
    from scatlas.models.michigan._task import VAETask
    from scatlas.models.train import TrainConfig, fit

    cfg = MichiGANConfig(n_genes=adata.n_vars, latent_dim=latent_dim, hidden=128, beta=beta,
                         n_train=adata.n_obs)
    batches = CellBatches(adata.X, batch_size=256, balance=None, transform="lognorm", seed=seed)
    res = fit(VAETask(cfg), batches, TrainConfig(max_steps=steps, learning_rate=1e-3, seed=seed,
                                                 progress=False))
    net = cfg.vae()
    mu = net.apply(res.variables, jnp.asarray(_lognorm(adata.X), jnp.float32),
                   method=TCVAE.encode)[0]
    return np.asarray(jax.device_get(mu)), float(res.cells_per_s or 0)


# ---------------------------------------------------------------------------------- the parts

def factor_data(seed: int, n: int = 3000, genes: int = 200, k: int = 4):
    rng = np.random.default_rng([seed, 11])
    factors = rng.integers(0, 10, (n, k))
    f = factors / 4.5 - 1.0
    W = rng.normal(0, 1.0, (genes, k)) * (rng.random((genes, k)) < 0.5)
    logits = rng.normal(0, 1, genes) + f @ W.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    counts = rng.poisson(2000 * p)
    return _counts_adata(counts), factors


def part_mig(seeds: Sequence[int], quick: bool) -> dict[str, Any]:
    steps = 600 if quick else 1500
    rows = []
    for seed in seeds:
        adata, factors = factor_data(seed)
        row = {"seed": seed}
        for name, beta in (("tcvae", MIG_BETA[0]), ("vae", 1.0)):
            mu, rate = _vae_only(adata, beta, seed, steps, latent_dim=8)
            row[name] = mig(mu, factors)
            row[f"{name}_cells_per_s"] = rate
        rows.append(row)
        print(f"  mig seed {seed}: tcvae {row['tcvae']:.3f}  vae {row['vae']:.3f}", flush=True)
    t, v = np.array([r["tcvae"] for r in rows]), np.array([r["vae"] for r in rows])
    return {"rows": rows, "steps": steps, "beta": MIG_BETA[0], "latent_dim": 8, "factors": 4,
            "tcvae_mean": float(t.mean()), "vae_mean": float(v.mean()),
            "margin_mean": float((t - v).mean()), "margin_min": float((t - v).min()),
            "met": bool((t > v).all())}


def _train(quick: bool) -> dict[str, Any]:
    return {**TRAIN, "vae_steps": 300, "gan_steps": 500} if quick else dict(TRAIN)


def part_realism(seeds: Sequence[int], quick: bool, holdout: str | None) -> dict[str, Any]:
    import anndata as ad
    from scipy.spatial.distance import pdist
    from sklearn.decomposition import PCA

    from scatlas import tl

    full = ad.read_h5ad(CELLBENCH)
    batches = full.obs["batch"].astype(str)
    holdout = holdout or HOLDOUT
    train, test = full[batches != holdout].copy(), full[batches == holdout].copy()
    rows = []
    for seed in seeds:
        t0 = time.perf_counter()
        model = tl.train_michigan(train, seed=seed, n_top_genes=1000, progress=False,
                                  **_train(quick))
        secs = time.perf_counter() - t0
        genes = model.genes
        real_tr = _lognorm(train[:, genes].X)
        real = _lognorm(test[:, genes].X)
        pca = PCA(30, random_state=0).fit(real_tr)
        z = model.embed(test)
        profiles = {"gan": model.generate(z, seed=seed),
                    "decoder_sample": model.decode(z, seed=seed),
                    "decoder_mean": model.decode(z, sample=False)}
        R = pca.transform(real)
        bw = float(np.median(pdist(R)))
        bw_genes = float(np.median(pdist(real)))
        row = {"seed": seed, "train_s": secs, "vae_cells_per_s": model.info["vae"]["cells_per_s"],
               "gan_cells_per_s": model.info["gan"]["cells_per_s"]}
        for name, P in profiles.items():
            Q = pca.transform(P)
            row[f"{name}_mmd"] = mmd_rbf(R, Q, bw)
            row[f"{name}_auc"] = knn_auc(R, Q, seed=seed)
            row[f"{name}_mmd_genes"] = mmd_rbf(real, P, bw_genes)
            row[f"{name}_auc_genes"] = knn_auc(real, P, seed=seed)
            row[f"{name}_zero_fraction"] = float(np.mean(P == 0))
        row["real_zero_fraction"] = float(np.mean(real == 0))
        rows.append(row)
        print(f"  realism seed {seed}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in row.items() if k != "seed"), flush=True)
    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))
    out = {"rows": rows, "holdout_batch": holdout, "n_train": int(train.n_obs),
           "n_test": int(test.n_obs), "n_top_genes": 1000}
    for name in ("gan", "decoder_sample", "decoder_mean"):
        for metric in ("mmd", "auc", "mmd_genes", "auc_genes", "zero_fraction"):
            out[f"{name}_{metric}_mean"] = mean(f"{name}_{metric}")
    out["met"] = bool(all(
        r["gan_mmd"] < r["decoder_sample_mmd"]
        and abs(r["gan_auc"] - 0.5) < abs(r["decoder_sample_auc"] - 0.5) for r in rows))
    return out


def shift_data(seed: int, n_per: int = 400, genes: int = 300, n_shift: int = 60):
    """Three cell types x control / stimulated; the stimulation adds ``+-1`` (log scale) to
    ``n_shift`` genes, scaled per type by 0.8..1.2."""
    rng = np.random.default_rng([seed, 23])
    base = rng.normal(0, 1, genes)
    types = rng.normal(0, 1.2, (3, genes)) * (rng.random((3, genes)) < 0.3)
    stim = np.zeros(genes)
    hit = rng.choice(genes, n_shift, replace=False)
    stim[hit] = rng.choice([-1.0, 1.0], n_shift) * rng.uniform(0.7, 1.5, n_shift)
    scale = np.array([1.0, 1.2, 0.8])

    def cells(t: int, s: int, n: int) -> np.ndarray:
        logits = base + types[t] + s * scale[t] * stim + rng.normal(0, 0.2, (n, genes))
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return rng.poisson(rng.uniform(1500, 3000, (n, 1)) * p)

    parts, labels = [], []
    for t in range(3):
        for s in (0, 1):
            parts.append(cells(t, s, n_per))
            labels += [(t, s)] * n_per
    labels = np.array(labels)
    return np.vstack(parts), labels, cells(1, 1, n_per), hit


def part_shift(seeds: Sequence[int], quick: bool) -> dict[str, Any]:
    from scatlas import tl

    rows = []
    for seed in seeds:
        counts, labels, b_stim, hit = shift_data(seed)
        keep = ~((labels[:, 0] == 1) & (labels[:, 1] == 1))  # no stimulated type-B cells
        adata = _counts_adata(counts[keep])
        lab = labels[keep]
        model = tl.train_michigan(adata, seed=seed, n_top_genes=None, progress=False,
                                  **_train(quick))
        a_ctrl = (lab[:, 0] == 0) & (lab[:, 1] == 0)
        a_stim = (lab[:, 0] == 0) & (lab[:, 1] == 1)
        b_ctrl = (lab[:, 0] == 1) & (lab[:, 1] == 0)
        res = model.latent_shift(adata, a_ctrl, a_stim, apply_to=b_ctrl, n_per_cell=5,
                                 seed=seed)
        z = model.embed(adata[b_ctrl])
        before = model.generate(z, 5, seed=seed).mean(0)
        pred = res.profiles.mean(0) - before
        true = _lognorm(b_stim).mean(0) - _lognorm(adata.X[b_ctrl]).mean(0)
        r_all = float(np.corrcoef(pred, true)[0, 1])
        r_hit = float(np.corrcoef(pred[hit], true[hit])[0, 1])
        rows.append({"seed": seed, "r": r_all, "r_stimulated_genes": r_hit})
        print(f"  shift seed {seed}: r {r_all:.3f} (stimulated genes {r_hit:.3f})", flush=True)
    rs = np.array([r["r"] for r in rows])
    return {"rows": rows, "r_mean": float(rs.mean()), "r_min": float(rs.min()),
            "met": bool((rs >= 0.8).all())}


def main(argv: Sequence[str] | None = None) -> int:
    from bench.environment import capture
    from scatlas.io import atomic_write

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--parts", default="mig,realism,shift")
    p.add_argument("--holdout", default=None, help=f"CellBench batch left out (default {HOLDOUT})")
    p.add_argument("--quick", action="store_true", help="few steps (a smoke run)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--mig-beta", type=float, default=MIG_BETA[0])
    for key, kind in (("vae_steps", int), ("gan_steps", int), ("gan_learning_rate", float),
                      ("beta", float)):
        p.add_argument("--" + key.replace("_", "-").replace("learning-rate", "lr"), type=kind,
                       default=TRAIN[key], dest=key)
    args = p.parse_args(argv)
    TRAIN.update({k: getattr(args, k) for k in TRAIN})
    MIG_BETA[0] = args.mig_beta
    seeds = [int(s) for s in args.seeds.split(",")]
    record: dict[str, Any] = {"benchmark": "michigan", "device": "cpu", "seeds": seeds,
                              "train": dict(TRAIN),
                              "quick": bool(args.quick), "environment": capture("cpu")}
    failed = []
    for part in args.parts.split(","):
        print(f"{part}:", flush=True)
        t0 = time.perf_counter()
        try:
            if part == "mig":
                record[part] = part_mig(seeds, args.quick)
            elif part == "realism":
                if not CELLBENCH.is_file():
                    raise FileNotFoundError(f"{CELLBENCH} (shared data) is missing")
                record[part] = part_realism(seeds, args.quick, args.holdout)
            elif part == "shift":
                record[part] = part_shift(seeds, args.quick)
            else:
                raise ValueError(f"unknown part {part!r}")
            record[part]["seconds"] = time.perf_counter() - t0
            if not np.isfinite(_numbers(record[part])).all():
                raise FloatingPointError(f"{part}: non-finite figures")
        except Exception as err:  # recorded, and the run exits 1
            traceback.print_exc()
            failed.append(part)
            record[part] = {"error": f"{type(err).__name__}: {err}"}
    record["failed"] = failed
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=float))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                      for k, v in record.items() if k in ("mig", "realism", "shift")}, indent=1))
    return 1 if failed else 0


def _numbers(d: Any) -> list[float]:
    if isinstance(d, dict):
        return [x for v in d.values() for x in _numbers(v)]
    if isinstance(d, list):
        return [x for v in d for x in _numbers(v)]
    if isinstance(d, float | int) and not isinstance(d, bool):
        return [float(d)]
    return []


if __name__ == "__main__":
    sys.exit(main())

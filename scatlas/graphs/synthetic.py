"""Synthetic RNA + ATAC cells with a planted gene <-> peak graph and known cell states.

Generative model (after the stand-in of ../shared/reference/multimodal_vae.md section 4.2):

- cell states ``k = 0..n_states-1`` with centres ``c_k ~ N(0, 2^2 I_d)``; a cell's latent is
  ``z = c_k + N(0, 0.5^2 I_d)``;
- genes on ``n_chrom`` chromosomes, one every ``spacing`` bases (bodies of ``gene_length``);
  loadings ``W_g ~ N(0, I_d)``; RNA counts ``x ~ NB(l softmax(z W^T + b), theta=10)`` with
  library ``l ~ LogNormal(log(lib), 0.3)``;
- peaks: ``peaks_per_gene`` within ``window`` of each gene. A fraction ``link_fraction`` of them
  are **regulatory** (the planted links): loadings ``W_p = W_g + N(0, 0.3^2 I)``; the others are
  decoys near the gene with independent loadings. Accessibility ``y ~ Bernoulli(sigmoid(z W_p^T +
  b_p))``, ``b_p = -1.5``.

RNA and ATAC cells are drawn separately (``paired=False``: different cells, as two studies) or
share the latent (``paired=True``: both modalities of the same cells, for FOSCTTM).
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..exceptions import ScatlasInputError


@dataclass
class SyntheticMultiome:
    """``rna``, ``atac``: AnnData of counts (``obs["state"]``); ``genes``: the gene table
    (chrom, start, end, strand, name) for :func:`scatlas.graphs.gene_peak_graph`; ``links``:
    the planted gene -> peak links (``source``, ``target``); ``candidates``: every gene-peak
    pair within the window with ``planted`` (bool), the pairs a link recovery is scored on."""

    rna: ad.AnnData
    atac: ad.AnnData
    genes: pd.DataFrame
    links: pd.DataFrame
    candidates: pd.DataFrame


def synthetic_multiome(
    n_cells: int = 600,
    n_genes: int = 200,
    *,
    n_states: int = 5,
    latent_dim: int = 8,
    peaks_per_gene: int = 4,
    link_fraction: float = 0.5,
    n_chrom: int = 4,
    spacing: int = 500_000,
    gene_length: int = 20_000,
    window: int = 150_000,
    lib: float = 2_000.0,
    paired: bool = False,
    seed: int = 0,
) -> SyntheticMultiome:
    """Draw the data (see the module docstring); ``n_cells`` per modality."""
    if n_cells < 2 or n_genes < 2 or n_states < 2 or peaks_per_gene < 1:
        raise ScatlasInputError("need n_cells, n_genes, n_states >= 2 and peaks_per_gene >= 1")
    if not 0 < link_fraction <= 1:
        raise ScatlasInputError(f"link_fraction must be in (0, 1], got {link_fraction}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, (n_states, latent_dim))

    def cells(n: int) -> tuple[np.ndarray, np.ndarray]:
        state = rng.integers(0, n_states, n)
        return state, centres[state] + rng.normal(0, 0.5, (n, latent_dim))

    W_g = rng.normal(0, 1, (n_genes, latent_dim)) / np.sqrt(latent_dim) * 2
    b_g = rng.normal(0, 1, n_genes)
    chrom = np.array([f"chr{i % n_chrom + 1}" for i in range(n_genes)])
    start = (np.arange(n_genes) // n_chrom + 1) * spacing
    strand = np.where(rng.random(n_genes) < 0.5, "+", "-")
    names = np.array([f"G{i:04d}" for i in range(n_genes)])
    genes = pd.DataFrame({"chrom": chrom, "start": start, "end": start + gene_length,
                          "strand": strand, "name": names})
    n_reg = max(1, int(round(link_fraction * peaks_per_gene)))
    peak_rows, W_p, links = [], [], []
    for g in range(n_genes):
        offs = rng.integers(-window + 1_000, window + gene_length - 1_000, peaks_per_gene)
        for j, off in enumerate(offs):
            s = int(start[g] + off)
            name = f"{chrom[g]}:{s}-{s + 500}"
            peak_rows.append((chrom[g], s, s + 500, name))
            if j < n_reg:
                W_p.append(W_g[g] + rng.normal(0, 0.3, latent_dim) * np.linalg.norm(W_g[g])
                           / np.sqrt(latent_dim))
                links.append((names[g], name))
            else:
                W_p.append(rng.normal(0, 1, latent_dim) / np.sqrt(latent_dim) * 2)
    peaks = pd.DataFrame(peak_rows, columns=["chrom", "start", "end", "name"])
    peaks = peaks.drop_duplicates("name")
    W_p = np.asarray(W_p)[peaks.index.to_numpy()]
    links_df = pd.DataFrame(links, columns=["source", "target"]).drop_duplicates()

    s_rna, z_rna = cells(n_cells)
    s_atac, z_atac = (s_rna, z_rna) if paired else cells(n_cells)
    logits = z_rna @ W_g.T + b_g
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    l_cell = np.exp(rng.normal(np.log(lib), 0.3, n_cells))
    mu = l_cell[:, None] * p
    theta = 10.0
    X = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)
    prob = 1 / (1 + np.exp(-(z_atac @ W_p.T - 1.5)))
    Y = (rng.random(prob.shape) < prob).astype(np.float32)

    def adata(M: np.ndarray, var: list, state: np.ndarray, prefix: str) -> ad.AnnData:
        obs = pd.DataFrame({"state": pd.Categorical([f"s{k}" for k in state])},
                           index=[f"{prefix}{i}" for i in range(len(state))])
        return ad.AnnData(sp.csr_matrix(M), obs=obs, var=pd.DataFrame(index=list(var)))

    prefix = "cell" if paired else None
    rna = adata(X, list(names), s_rna, prefix or "rna")
    atac = adata(Y, list(peaks["name"]), s_atac, prefix or "atac")
    from ._links import gene_peak_graph

    window_links = gene_peak_graph(genes, peaks, window=window).edges
    planted = set(map(tuple, links_df.to_numpy()))
    cand = window_links[["source", "target"]].drop_duplicates().reset_index(drop=True)
    cand["planted"] = [(s, t) in planted for s, t in zip(cand["source"], cand["target"],
                                                          strict=True)]
    return SyntheticMultiome(rna, atac, genes, links_df, cand)

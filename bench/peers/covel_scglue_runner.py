"""Run scglue 0.4.1 at its defaults on unpaired RNA + protein (bench/covel.py's peer).

    bench/.peers/scglue/bin/python bench/peers/covel_scglue_runner.py IN_DIR OUT.npz SEED

IN_DIR holds ``rna.h5ad`` and ``prot.h5ad`` (raw counts in X, cells shuffled, pairing hidden) and
``links.tsv`` (gene, protein). Preprocessing follows the scglue tutorial ("Stage 1: Model
training", RNA: 2,000 ``seurat_v3`` HVGs on the counts, normalise, log1p, scale, 100 PCs as
``use_rep``; the 49 proteins: every feature, NB on counts, their PCA (min(48, F - 1)
components) of log1p counts as ``use_rep``); the guidance graph: gene <-> protein links both
ways plus self-loops on every feature (``scglue.graph.check_graph`` requires them). Protein
names are prefixed ``ADT:`` so that they cannot clash with gene names in the graph.
``fit_SCGLUE`` then runs at its defaults (pretraining, balancing, fine-tuning). Writes the
cell embeddings (``rna``, ``prot``, in input order), the feature embeddings and the timings.
"""

from __future__ import annotations

import sys
import tempfile
import time

import anndata as ad
import networkx as nx
import numpy as np
import pandas as pd
import scanpy as sc
import scglue


def main() -> int:
    in_dir, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rna = ad.read_h5ad(f"{in_dir}/rna.h5ad")
    prot = ad.read_h5ad(f"{in_dir}/prot.h5ad")
    links = pd.read_csv(f"{in_dir}/links.tsv", sep="\t")
    prot.var_names = ["ADT:" + v for v in prot.var_names]
    t0 = time.perf_counter()
    rna.layers["counts"] = rna.X.copy()
    sc.pp.highly_variable_genes(rna, n_top_genes=2000, flavor="seurat_v3")
    keep = set(links["source"])
    rna.var["highly_variable"] = rna.var["highly_variable"] | rna.var_names.isin(keep)
    sc.pp.normalize_total(rna)
    sc.pp.log1p(rna)
    sc.pp.scale(rna)
    sc.tl.pca(rna, n_comps=100, svd_solver="auto")
    prot.layers["counts"] = prot.X.copy()
    prot.var["highly_variable"] = True
    pl = prot.copy()
    sc.pp.log1p(pl)
    sc.tl.pca(pl, n_comps=min(48, prot.n_vars - 1))
    prot.obsm["X_pca"] = pl.obsm["X_pca"]
    g = nx.MultiDiGraph()
    for s, t in zip(links["source"], "ADT:" + links["target"], strict=True):
        if s in rna.var_names and t in prot.var_names:
            g.add_edge(s, t, weight=1.0, sign=1)
            g.add_edge(t, s, weight=1.0, sign=1)
    for v in list(rna.var_names[rna.var["highly_variable"]]) + list(prot.var_names):
        g.add_edge(v, v, weight=1.0, sign=1)
    scglue.models.configure_dataset(rna, "NB", use_highly_variable=True, use_layer="counts",
                                    use_rep="X_pca")
    scglue.models.configure_dataset(prot, "NB", use_highly_variable=True, use_layer="counts",
                                    use_rep="X_pca")
    g = g.subgraph(list(rna.var_names[rna.var["highly_variable"]]) + list(prot.var_names))
    scglue.config.ALLOW_TRAINING_INTERRUPTION = False
    t_prep = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        glue = scglue.models.fit_SCGLUE({"rna": rna, "prot": prot}, g,
                                        init_kws={"random_seed": seed},
                                        fit_kws={"directory": tmp})
        t_fit = time.perf_counter() - t1
    z_rna = glue.encode_data("rna", rna)
    z_prot = glue.encode_data("prot", prot)
    feats = list(rna.var_names[rna.var["highly_variable"]]) + list(prot.var_names)
    v = glue.encode_graph(g)
    np.savez(out, rna=z_rna, prot=z_prot, features=np.asarray(feats, dtype=str), v=v,
             prep_s=t_prep, fit_s=t_fit, n_cells=rna.n_obs + prot.n_obs)
    print(f"scglue {scglue.__version__}: fit {t_fit:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

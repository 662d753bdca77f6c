"""``scatlas train covel``: train CoVEL on modalities measured in different (or the same) cells.

Examples::

    scatlas train covel --modality rna=rna.h5ad --modality protein=adt.h5ad \
        --graph cite-seq --out covel/
    scatlas train covel --modality rna=cite.h5ad --modality protein=cite.h5ad:obsm/protein_counts \
        --graph cite-seq --paired --out covel/
    scatlas train covel --modality rna=rna.h5ad --modality atac=atac.h5ad \
        --gene-annotation genes.gtf --out covel/

``--graph`` is a TSV/CSV of links (``source``, ``target``, optional ``weight``, ``sign``,
``source_type``, ``target_type``) or ``cite-seq`` (the curated antibody -> gene table between the
``rna`` and ``protein`` modalities); ``--gene-annotation`` adds gene <-> peak links by genomic
window between ``rna`` and ``atac``. :mod:`scatlas.cli.models` builds ``scatlas train`` and
calls :func:`register_train` here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register_train(models: argparse._SubParsersAction) -> None:
    """Add ``covel`` to the ``train`` subcommands."""
    p = models.add_parser(
        "covel", help="CoVEL: graph-linked, fine-grained and contrastive views (unpaired)",
        description="Train CoVEL on two or more modalities, unpaired (different cells) or "
        "paired; writes a model folder.")
    p.add_argument("--modality", action="append", required=True, metavar="NAME=FILE[:obsm/KEY]",
                   help="a modality: an .h5ad of its counts (X), or a matrix in obsm (feature "
                   "names from its DataFrame columns or uns['<KEY>_names']); repeat per modality")
    p.add_argument("--graph", default=None,
                   help="links file (TSV/CSV: source, target[, weight, sign]) or 'cite-seq'")
    p.add_argument("--gene-annotation", default=None, metavar="GTF_OR_BED",
                   help="gene coordinates: adds gene <-> peak links (rna <-> atac) by window")
    p.add_argument("--window", type=int, default=150_000, help="gene-peak window (bases)")
    p.add_argument("--paired", action="store_true",
                   help="the modalities hold the same cells (matched by obs_names)")
    p.add_argument("--out", required=True, help="model folder to write (atomically)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps")
    p.add_argument("--batch-size", type=int, default=128, help="cells per modality per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--n-top-genes", type=int, default=2000,
                   help="keep this many variable features of wide count modalities (0: all)")
    for view in ("graph-view", "fine-grained", "contrastive", "align"):
        p.add_argument(f"--no-{view}", action="store_true", help=f"switch the {view} view off")
    p.add_argument("--fine-grained-on", action="store_true",
                   help="switch the transformer (fine-grained) view on (default off)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--log", default=None, help="JSON-lines training log")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=cmd_train_covel)


def _read(spec: str) -> tuple[str, Any]:
    import anndata as ad
    import numpy as np
    import pandas as pd

    from ..exceptions import ScatlasInputError

    if "=" not in spec:
        raise ScatlasInputError(f"--modality takes NAME=FILE, got {spec!r}")
    name, loc = spec.split("=", 1)
    path, _, key = loc.partition(":")
    adata = ad.read_h5ad(path)
    if not key:
        return name, adata
    if not key.startswith("obsm/") or key[5:] not in adata.obsm:
        raise ScatlasInputError(f"{path} has no {key!r} (obsm keys {list(adata.obsm)})")
    M = adata.obsm[key[5:]]
    names = (list(M.columns) if isinstance(M, pd.DataFrame) else
             list(adata.uns.get(f"{key[5:]}_names", range(M.shape[1]))))
    var = pd.DataFrame(index=[str(n) for n in names])
    return name, ad.AnnData(np.asarray(M, np.float32), obs=adata.obs[[]].copy(), var=var)


def cmd_train_covel(args: argparse.Namespace) -> int:
    import pandas as pd

    from .. import graphs
    from ..exceptions import ScatlasInputError
    from ..tl import train_covel

    data = dict(_read(s) for s in args.modality)
    graph = None
    if args.graph == "cite-seq":
        if "rna" not in data or "protein" not in data:
            raise ScatlasInputError("--graph cite-seq needs modalities named rna and protein")
        graph = graphs.gene_protein_graph(data["protein"].var_names, data["rna"].var_names)
    elif args.graph:
        sep = "," if args.graph.endswith(".csv") else "\t"
        graph = graphs.as_graph(pd.read_csv(args.graph, sep=sep))
    if args.gene_annotation:
        if "rna" not in data or "atac" not in data:
            raise ScatlasInputError("--gene-annotation needs modalities named rna and atac")
        peaks = graphs.gene_peak_graph(args.gene_annotation, list(data["atac"].var_names),
                                       window=args.window,
                                       gene_names=list(data["rna"].var_names))
        graph = peaks if graph is None else graph | peaks
    if graph is None:
        raise ScatlasInputError("give --graph and/or --gene-annotation (the feature links)")
    model = train_covel(
        data, graph, paired=args.paired, seed=args.seed, max_steps=args.max_steps,
        batch_size=args.batch_size, learning_rate=args.lr,
        n_top_genes=args.n_top_genes or None, checkpoint_dir=args.checkpoint_dir,
        log_path=args.log, progress=args.progress, graph_view=not args.no_graph_view,
        fine_grained=args.fine_grained_on and not args.no_fine_grained,
        contrastive=not args.no_contrastive, align=not args.no_align)
    model.save(args.out)
    print(json.dumps({"model": str(Path(args.out)), "steps": model.info["steps"],
                      "cells_per_s": model.info["cells_per_s"],
                      "n_features": model.info["n_features"]}))
    return 0

"""``scatlas pca``, ``scatlas cca``, ``scatlas snf`` and ``scatlas synthetic``: a tool or a
dataset per file."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from ._common import _done, _preprocess, _read, _write


def cmd_pca(args: argparse.Namespace) -> int:
    from .. import tl

    t0 = time.perf_counter()
    adata = _read(args.input)
    _preprocess(adata, args)
    tl.pca(adata, args.n_comps, layer=args.layer, zero_center=not args.no_center,
           seed=args.seed, method=args.method, device=args.device, progress=args.progress)
    _write(adata, args.output)
    _done("pca", args.output, t0)
    return 0


def cmd_cca(args: argparse.Namespace) -> int:
    from .. import tl

    t0 = time.perf_counter()
    adata = _read(args.input)
    _preprocess(adata, args, batch_key=args.batch_key)
    if args.scale:
        from .. import pp

        pp.scale(adata, batch_key=args.batch_key)
    tl.cca(adata, args.batch_key, groups=tuple(args.groups) if args.groups else None, k=args.k,
           layer=args.layer, key_added=args.key_added, method=args.method, seed=args.seed,
           device=args.device, progress=args.progress)
    _write(adata, args.output)
    _done("cca", args.output, t0)
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from .. import datasets

    t0 = time.perf_counter()
    params = dict(n_genes=args.n_genes, n_batches=args.n_batches,
                  n_cell_types=args.n_cell_types, seed=args.seed)
    if args.skip:  # cells n+1... of the same atlas: new cells, never in a file without --skip
        from ..io import write_h5ad

        cells = datasets.synthetic(args.skip + args.n_cells, **params)[args.skip:].copy()
        write_h5ad(cells, args.output)
    elif args.output.endswith(".zarr"):  # chunk by chunk on Dask (scatlas.atlas)
        from ..atlas import write_synthetic_zarr

        write_synthetic_zarr(args.output, args.n_cells, scheduler=args.scheduler,
                             n_workers=args.n_workers, progress=args.progress, **params)
    else:
        datasets.write_synthetic_h5ad(args.output, args.n_cells, **params)
    _done("synthetic", args.output, t0)
    return 0


def cmd_snf(args: argparse.Namespace) -> int:
    from .. import tl

    t0 = time.perf_counter()
    adata = _read(args.input)
    keys = [k.strip() for k in args.obsm_keys.split(",") if k.strip()]
    tl.snf(adata, keys, K=args.k, mu=args.mu, t=args.t, metric=args.metric,
           n_clusters=args.n_clusters, key_added=args.key_added, device=args.device,
           seed=args.seed)
    _write(adata, args.output)
    _done("snf", args.output, t0)
    return 0


def register(sub: argparse._SubParsersAction, *, common: Callable, io_args: Callable) -> None:
    p = sub.add_parser("pca", help="PCA of an .h5ad (obsm['X_pca'], varm['PCs'], uns['pca'])")
    io_args(p)
    p.add_argument("--n-comps", type=int, default=50, help="number of components (default 50)")
    p.add_argument("--no-center", action="store_true", help="truncated SVD without centring")
    common(p)
    p.set_defaults(func=cmd_pca)

    p = sub.add_parser("cca", help="Seurat-style CCA between two batches (obsm['X_cca'])")
    io_args(p)
    p.add_argument("--batch-key", default="batch", help="obs column with the batch (default batch)")
    p.add_argument("--groups", nargs=2, metavar=("A", "B"),
                   help="the two batches to pair (default: the only two present)")
    p.add_argument("--k", type=int, default=20, help="canonical vectors (default 20)")
    p.add_argument("--scale", action="store_true",
                   help="scale each gene per batch (Seurat ScaleData; densifies)")
    p.add_argument("--key-added", default="X_cca", help="obsm key (default X_cca)")
    common(p)
    p.set_defaults(func=cmd_cca, seed=42)

    p = sub.add_parser("snf", help="similarity network fusion of obsm views, and clusters "
                       "(obsp[KEY_connectivities], obs[KEY_cluster])")
    p.add_argument("input", help="input .h5ad holding the views in .obsm")
    p.add_argument("output", help="output .h5ad (written atomically)")
    p.add_argument("--obsm-keys", required=True, metavar="A,B",
                   help="comma-separated obsm keys, one view each (at least two)")
    p.add_argument("--k", type=int, default=20, help="neighbours K (default 20, snfpy's)")
    p.add_argument("--mu", type=float, default=0.5, help="kernel width mu (default 0.5)")
    p.add_argument("--t", type=int, default=20, help="diffusion iterations (default 20)")
    p.add_argument("--metric", default="sqeuclidean",
                   help="sqeuclidean (default), euclidean or cosine")
    p.add_argument("--n-clusters", type=int, default=None,
                   help="spectral clusters (default: the eigengap estimate)")
    p.add_argument("--key-added", default="snf", help="result keys' prefix (default snf)")
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default=None,
                   help="where to compute (default: where the views are)")
    p.add_argument("--seed", type=int, default=0, help="seed of the spectral clustering")
    p.set_defaults(func=cmd_snf, param_flags={"K": "--k", "obsm_keys": "--obsm-keys"})

    p = sub.add_parser("synthetic", help="write a synthetic single-cell atlas (.h5ad or .zarr)")
    p.add_argument("output", help="output .h5ad, or .zarr (generated on Dask, chunk by chunk)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help=".zarr: Dask scheduler address (default: a local cluster)")
    p.add_argument("--n-workers", type=int, default=None, help=".zarr: local Dask workers")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (.zarr; default: when stderr is a terminal)")
    p.add_argument("--n-cells", type=int, default=10_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--n-batches", type=int, default=3)
    p.add_argument("--n-cell-types", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="leave out the first N cells: the file holds new cells of the same atlas "
                   "(held-out queries for an atlas written without --skip; built in memory)")
    p.set_defaults(func=cmd_synthetic)

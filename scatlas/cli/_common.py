"""What the commands share: reading and writing files, the common options, timing lines."""

from __future__ import annotations

import argparse
import sys
import time


def _read(path: str):
    from .. import io

    return io.read_h5ad(path)


def _write(adata, path: str) -> None:
    from .. import io

    io.write_h5ad(adata, path)


def _preprocess(adata, args: argparse.Namespace, batch_key: str | None = None) -> None:
    from .. import pp

    layer = getattr(args, "layer", None)
    if args.normalize:
        _check_counts_for_normalize(adata, layer)
        pp.normalize_log1p(adata, layer=layer, device=args.device)
    if args.n_top_genes:
        pp.highly_variable_genes(adata, n_top_genes=args.n_top_genes, batch_key=batch_key,
                                 layer=layer, device=args.device)


def _check_counts_for_normalize(adata, layer: str | None) -> None:
    """``--normalize`` needs counts: refuse negative values naming the flags that help."""
    import numpy as np
    import scipy.sparse as sp

    from .._validate import ScatlasInputError

    where = "X" if layer is None else f"layer {layer!r}"
    X = adata.X if layer is None else adata.layers.get(layer)
    if X is None:
        return  # the library names the missing matrix
    values = X.data if sp.issparse(X) else np.asarray(X)
    if values.size and np.nanmin(values) < 0:
        advice = ("drop --normalize (the data look already normalised or scaled), or pass "
                  "--layer with a layer of raw counts")
        if adata.raw is not None and layer is None:
            advice += ("; this file also has .raw (often the log-normalised data): save it "
                       "as a layer first, e.g. adata.layers['lognorm'] = adata.raw.X")
        raise ScatlasInputError(
            f"--normalize log-normalises raw counts, but {where} holds "
            f"{int((values < 0).sum()):,} negative value(s); {advice}")


def _done(what: str, path: str, t0: float) -> None:
    print(f"{what}: wrote {path} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default=None,
                   help="where to compute (default: $SCATLAS_DEVICE, else auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: when stderr is a terminal)")


def _io_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="input .h5ad")
    p.add_argument("output", help="output .h5ad (written atomically)")
    p.add_argument("--layer", default=None, help="use adata.layers[LAYER] instead of .X")
    p.add_argument("--normalize", action="store_true",
                   help="log-normalise raw counts first (scanpy normalize_total + log1p)")
    p.add_argument("--n-top-genes", type=int, default=0,
                   help="select this many highly variable genes first (0: use all genes)")
    p.add_argument("--method", choices=["auto", "randomized", "gram"], default="auto",
                   help="SVD route: exact Gram eigh, randomized, or auto (cheaper)")

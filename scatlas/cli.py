"""The ``scatlas`` command: a thin layer over :mod:`scatlas.tl`, :mod:`scatlas.pp` and friends.

Subcommands (``scatlas SUBCOMMAND --help`` for each):

- ``info``: version, backend and devices, optional components found.
- ``pca IN.h5ad OUT.h5ad``: optional log-normalisation and HVG selection, then PCA.
- ``cca IN.h5ad OUT.h5ad``: Seurat-style CCA between two batches.
- ``synthetic OUT.h5ad``: write a synthetic atlas (the quickstart's data).
- ``integrate``: batch integration (:mod:`scatlas.cli_integrate`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, backend


def _command_modules() -> list[str]:
    """Modules that add subcommands: every ``scatlas/cli_*.py``, in name order.

    Each defines ``register(subparsers, *, common, io_args)`` and sets ``func`` on its parsers
    (``func(args) -> int``).
    """
    package = Path(__file__).parent
    return [f"scatlas.{path.stem}" for path in sorted(package.glob("cli_*.py"))]

OPTIONAL_COMPONENTS = (
    ("cupy", "cupy", "GPU arrays (scatlas[gpu])"),
    ("jax", "jax", "models"),
    ("flax", "flax", "models"),
    ("optax", "optax", "models"),
    ("faiss", "faiss-cpu", "search (CPU)"),
    ("rapids_singlecell", "rapids-singlecell", "GPU preprocessing"),
    ("scanpy", "scanpy", "preprocessing"),
    ("anndata", "anndata", "I/O"),
    ("torch", "torch", "baselines"),
)


def _component_version(module: str, dist: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    for name in (dist, module, f"{dist}-cuda12x", f"{dist}-cuda13x", "faiss-gpu-cu12"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed"


def cmd_info(args: argparse.Namespace) -> int:
    info = {
        "scatlas": __version__,
        "python": sys.version.split()[0],
        "backend": backend.describe(),
        "components": {
            module: _component_version(module, dist) for module, dist, _ in OPTIONAL_COMPONENTS
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    be = info["backend"]
    print(f"scatlas {info['scatlas']} (Python {info['python']})")
    print(f"device: {be['resolved_device']}  (SCATLAS_DEVICE={be['device_env'] or 'unset'})")
    if be["gpus"]:
        for g in be["gpus"]:
            print(f"  GPU {g['index']}: {g['name']}, {g['memory_gib']} GiB")
    else:
        print("  no usable GPU (CuPy missing or no CUDA device)")
    print("optional components:")
    for module, _dist, purpose in OPTIONAL_COMPONENTS:
        ver = info["components"][module]
        print(f"  {module:<18} {ver or 'not installed':<14} {purpose}")
    return 0


def _read(path: str):
    from . import io

    return io.read_h5ad(path)


def _write(adata, path: str) -> None:
    from . import io

    io.write_h5ad(adata, path)


def _preprocess(adata, args: argparse.Namespace, batch_key: str | None = None) -> None:
    from . import pp

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

    from ._validate import ScatlasInputError

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


def cmd_pca(args: argparse.Namespace) -> int:
    from . import tl

    t0 = time.perf_counter()
    adata = _read(args.input)
    _preprocess(adata, args)
    tl.pca(adata, args.n_comps, layer=args.layer, zero_center=not args.no_center,
           seed=args.seed, method=args.method, device=args.device, progress=args.progress)
    _write(adata, args.output)
    _done("pca", args.output, t0)
    return 0


def cmd_cca(args: argparse.Namespace) -> int:
    from . import tl

    t0 = time.perf_counter()
    adata = _read(args.input)
    _preprocess(adata, args, batch_key=args.batch_key)
    if args.scale:
        from . import pp

        pp.scale(adata, batch_key=args.batch_key)
    tl.cca(adata, args.batch_key, groups=tuple(args.groups) if args.groups else None, k=args.k,
           layer=args.layer, key_added=args.key_added, method=args.method, seed=args.seed,
           device=args.device, progress=args.progress)
    _write(adata, args.output)
    _done("cca", args.output, t0)
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from . import datasets

    t0 = time.perf_counter()
    params = dict(n_genes=args.n_genes, n_batches=args.n_batches,
                  n_cell_types=args.n_cell_types, seed=args.seed)
    if args.skip:  # cells n+1... of the same atlas: new cells, never in a file without --skip
        from .io import write_h5ad

        cells = datasets.synthetic(args.skip + args.n_cells, **params)[args.skip:].copy()
        write_h5ad(cells, args.output)
    elif args.output.endswith(".zarr"):  # chunk by chunk on Dask (scatlas.atlas)
        from .atlas import write_synthetic_zarr

        write_synthetic_zarr(args.output, args.n_cells, scheduler=args.scheduler,
                             n_workers=args.n_workers, progress=args.progress, **params)
    else:
        datasets.write_synthetic_h5ad(args.output, args.n_cells, **params)
    _done("synthetic", args.output, t0)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scatlas",
        description="GPU-accelerated single-cell integration, embedding and search.",
    )
    parser.add_argument("--version", action="version", version=f"scatlas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="backend, devices and optional components")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("pca", help="PCA of an .h5ad (obsm['X_pca'], varm['PCs'], uns['pca'])")
    _io_args(p)
    p.add_argument("--n-comps", type=int, default=50, help="number of components (default 50)")
    p.add_argument("--no-center", action="store_true", help="truncated SVD without centring")
    _common(p)
    p.set_defaults(func=cmd_pca)

    p = sub.add_parser("cca", help="Seurat-style CCA between two batches (obsm['X_cca'])")
    _io_args(p)
    p.add_argument("--batch-key", default="batch", help="obs column with the batch (default batch)")
    p.add_argument("--groups", nargs=2, metavar=("A", "B"),
                   help="the two batches to pair (default: the only two present)")
    p.add_argument("--k", type=int, default=20, help="canonical vectors (default 20)")
    p.add_argument("--scale", action="store_true",
                   help="scale each gene per batch (Seurat ScaleData; densifies)")
    p.add_argument("--key-added", default="X_cca", help="obsm key (default X_cca)")
    _common(p)
    p.set_defaults(func=cmd_cca, seed=42)

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

    for module in _command_modules():
        importlib.import_module(module).register(sub, common=_common, io_args=_io_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scatlas`` console script; returns the exit code."""
    from ._validate import ScatlasInputError, TrainingDivergedError, in_caller_terms

    parser = build_parser()
    args = parser.parse_args(argv)
    shown_as = warnings.formatwarning  # names read when shown: integrate adds its method's
    warnings.formatwarning = _warning_line(
        f"scatlas {args.command}", lambda text: in_caller_terms(text, _flag_names(parser, args)))
    try:
        return int(args.func(args) or 0)
    except (ScatlasInputError, TrainingDivergedError) as err:
        # messages lead with the parameter at fault ("lam must be ...", "reference 'x' is ...")
        param = getattr(err, "param", None) or re.match(r"\w*", str(err)).group(0)
        text = in_caller_terms(err, _flag_names(parser, args), param=param)
        print(f"scatlas {args.command}: error: {text}", file=sys.stderr)
        return 2
    except (backend.DeviceUnavailableError, FileNotFoundError) as err:
        print(f"scatlas {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown_as


#: library parameters whose flag is not their own name, per command (the rest map by name:
#: ``label_key`` -> ``--label-key``); ``integrate`` adds its method's (``param_flags``)
PARAM_FLAGS: dict[str, dict[str, str]] = {
    "pca": {"n_components": "--n-comps", "n_comps": "--n-comps", "zero_center": "--no-center"},
    "cca": {"n_components": "--k"},
}


def _leaf_parser(parser: argparse.ArgumentParser,
                 args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser that parsed ``args``: follow the subcommand choices made."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return parser
        action = subs[0]
        chosen = str(getattr(args, action.dest, "") or "").split()
        # a command may rename itself (``index build``): its last word is the choice made here
        name = next((w for w in reversed(chosen) if w in action.choices), None)
        if name is None:
            return parser
        parser = action.choices[name]


def _flag_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """Library parameter -> flag of the command that runs, for
    :func:`scatlas._validate.in_caller_terms`: every long option by its destination
    (``label_key`` -> ``--label-key``), then :data:`PARAM_FLAGS` and the method's own names
    (``args.param_flags``, set by ``integrate``)."""
    names: dict[str, str] = {}
    for action in _leaf_parser(parser, args)._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in ("help", "version"):
            names[action.dest] = longs[0]
    names.update(PARAM_FLAGS.get(str(args.command).split()[0], {}))
    names.update(getattr(args, "param_flags", None) or {})
    return names


def _warning_line(prefix: str, reword: Callable[[str], str] = str) -> Callable[..., str]:
    """``warnings.formatwarning`` for the CLI: ``scatlas CMD: warning: message``, one line
    without the Python source line and path (they name our code, not the user's input), the
    message passed through ``reword`` (parameters as flags); the category is named unless it
    is a plain UserWarning."""

    def format_warning(message: Any, category: type[Warning], filename: str, lineno: int,
                       line: str | None = None) -> str:
        kind = "" if category is UserWarning else f" ({category.__name__})"
        return f"{prefix}: warning{kind}: {reword(str(message))}\n"

    return format_warning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

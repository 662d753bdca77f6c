"""``scatlas integrate``: batch integration of .h5ad files, one method per ``--method``.

Usage::

    scatlas integrate IN.h5ad OUT.h5ad --method inmf --batch-key batch --k 20 --lam 5 --seed 1
    scatlas integrate IN.h5ad OUT.h5ad --method mnn --report report/ --label-key cell_type
    scatlas integrate IN.h5ad OUT.h5ad --method cca --flavor v5
    scatlas integrate IN.h5ad OUT.h5ad --method harmony --theta 2
    scatlas integrate OUT.h5ad --inputs A.h5ad B.h5ad --method online-inmf --k 20
    scatlas integrate IN.h5ad OUT.h5ad --method online-inmf --batch-key batch
    scatlas integrate OUT.h5ad --inputs C.h5ad --method online-inmf --add-to REF.h5ad
    scatlas integrate OUT.h5ad --inputs Q.h5ad --method online-inmf --project-onto REF.h5ad

Options common to every method: the input(s) and output, ``--batch-key``, ``--k``,
``--seed``, ``--key-added``, ``--device``, ``--progress``. Each method adds its own argument group
and a runner to :data:`METHODS`; later methods (scVI ...) plug in there without touching the
common options, as ``harmony`` did. Outputs are written atomically
(:func:`scatlas.io.write_h5ad`).

``online-inmf`` streams every input from disk (backed): with ``--inputs`` each file is one
dataset (or is split by ``--batch-key``) and the output holds all their cells (no ``X``), with the
same keys as ``inmf``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._validate import ScatlasInputError


@dataclass(frozen=True)
class IntegrationMethod:
    """One ``--method``: its option group and its runner ``run(args) -> exit code``."""

    help: str
    add_arguments: Callable[[argparse._ArgumentGroup], None]
    run: Callable[[argparse.Namespace], int]
    multi_input: bool = False  # accepts --inputs (several files, streamed)
    #: library parameter -> flag where the flag is not the parameter's own name (errors name
    #: the flag: ``scatlas.cli.main``)
    param_flags: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# iNMF
# --------------------------------------------------------------------------------------------


def _inmf_common(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--lam", type=float, default=5.0,
                   help="[inmf, online-inmf] penalty on dataset-specific metagenes (default 5)")
    g.add_argument("--n-genes", type=int, default=None,
                   help="[inmf, online-inmf] rliger nGenes: top variable genes per batch "
                        "(default: all passing the test)")
    g.add_argument("--var-thresh", type=float, default=0.1,
                   help="[inmf, online-inmf] rliger var.thresh of selectGenes (default 0.1)")
    g.add_argument("--no-quantile", action="store_true",
                   help="[inmf, online-inmf] skip quantile normalisation")
    g.add_argument("--reference", default=None,
                   help="[inmf, online-inmf] batch/dataset to align to (default: largest)")


def _inmf_args(g: argparse._ArgumentGroup) -> None:
    _inmf_common(g)
    g.add_argument("--n-iter", type=int, default=30, help="[inmf] iterations (default 30)")
    g.add_argument("--solver", choices=["bpp", "hals"], default="bpp",
                   help="[inmf] block solver (default bpp, libplanc's)")
    g.add_argument("--n-restarts", type=int, default=1, help="[inmf] restarts (default 1)")
    g.add_argument("--layer", default=None, help="[inmf] use adata.layers[LAYER] (raw counts)")


def _online_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--max-epochs", type=int, default=5,
                   help="[online-inmf] epochs (default 5)")
    g.add_argument("--minibatch-size", type=int, default=5000,
                   help="[online-inmf] cells per mini-batch over all datasets (default 5000)")
    g.add_argument("--chunk-size", type=int, default=1000,
                   help="[online-inmf] contiguous cells shuffled together (default 1000)")
    g.add_argument("--add-to", metavar="REF.h5ad", default=None,
                   help="[online-inmf] scenario 2: refine the online result in REF.h5ad with "
                        "the inputs as new datasets")
    g.add_argument("--project-onto", metavar="REF.h5ad", default=None,
                   help="[online-inmf] scenario 3: project the inputs onto the metagenes of "
                        "the iNMF result in REF.h5ad")


def _run_inmf(args: argparse.Namespace) -> int:
    from .. import io
    from ..tl import inmf

    adata = io.read_h5ad(args.inputs[0])
    inmf(adata, args.batch_key, k=args.k, lam=args.lam, layer=args.layer, seed=args.seed,
         n_iter=args.n_iter, solver=args.solver, n_restarts=args.n_restarts,
         thresh=args.var_thresh, n_genes=args.n_genes, quantile=not args.no_quantile,
         reference=args.reference, key_added=args.key_added, device=args.device,
         progress=args.progress)
    io.write_h5ad(adata, args.output)
    return 0


def _run_online(args: argparse.Namespace) -> int:
    from .. import io
    from .. import tl as tl_inmf

    if args.add_to and args.project_onto:
        raise ScatlasInputError("give --add-to or --project-onto, not both")
    common = dict(key_added=args.key_added, device=args.device, progress=args.progress)
    quantile = not args.no_quantile
    if args.add_to or args.project_onto:
        ref = io.read_h5ad(args.add_to or args.project_onto)
        if args.add_to:
            out = tl_inmf.online_inmf_add(
                ref, args.inputs, args.batch_key, seed=args.seed, max_epochs=args.max_epochs,
                minibatch_size=args.minibatch_size, chunk_size=args.chunk_size,
                quantile=quantile, quantile_reference=args.reference, **common)
        else:
            out = tl_inmf.project_inmf(ref, args.inputs, args.batch_key, seed=args.seed,
                                       quantile=quantile, quantile_reference=args.reference,
                                       **common)
    else:
        out = tl_inmf.online_inmf(
            args.inputs, args.batch_key, k=args.k, lam=args.lam, seed=args.seed,
            max_epochs=args.max_epochs, minibatch_size=args.minibatch_size,
            chunk_size=args.chunk_size, thresh=args.var_thresh, n_genes=args.n_genes,
            quantile=quantile, reference=args.reference, **common)
    io.write_h5ad(out, args.output)
    return 0


# --------------------------------------------------------------------------------------------
# Seurat CCA anchors and fastMNN (through tl.integrate)
# --------------------------------------------------------------------------------------------


def _anchor_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--n-top-genes", type=int, default=2000,
                   help="[cca, mnn, harmony] batch-aware highly variable genes used "
                        "(default 2000)")
    g.add_argument("--flavor", choices=["v3", "v5"], default="v3",
                   help="[cca] v3: IntegrateData on expression; v5: correct the joint PCA")
    g.add_argument("--n-pcs", type=int, default=30,
                   help="[cca, harmony] PCs / CCA dims (default 30)")
    g.add_argument("--k-anchor", type=int, default=5, help="[cca] k.anchor (default 5)")
    g.add_argument("--k-score", type=int, default=30, help="[cca] k.score (default 30)")
    g.add_argument("--k-filter", type=_k_filter, default=None, metavar="N|none",
                   help="[cca] k.filter; 'none' skips anchor filtering (default 200 for v3, "
                        "none for v5, as Seurat)")
    g.add_argument("--k-weight", type=int, default=100, help="[cca] k.weight (default 100)")


def _k_filter(value: str) -> int | str:
    """``--k-filter``: a positive integer, or 'none' / 'NA' (no filtering)."""
    if value.strip().lower() in ("none", "na"):
        return "none"
    try:
        return int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {value!r}") from err


def _mnn_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--mnn-k", type=int, default=20,
                   help="[mnn] neighbours for mutual nearest neighbours (default 20)")
    g.add_argument("--mnn-d", type=int, default=50, help="[mnn] multi-batch PCs (default 50)")


def _harmony_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--theta", type=float, default=None,
                   help="[harmony] diversity penalty (default: harmonypy's, 2)")
    g.add_argument("--max-iter-harmony", type=int, default=None,
                   help="[harmony] Harmony rounds (default: harmonypy's, 10)")


def _run_tl_integrate(args: argparse.Namespace) -> int:
    from .. import io
    from ..tl import integrate

    adata = io.read_h5ad(args.inputs[0])
    if args.method == "cca":
        extra = {"k_weight": args.k_weight, "dims": args.n_pcs, "k_anchor": args.k_anchor,
                 "k_score": args.k_score}
        if args.k_filter is not None:  # else the flavor's default (v3: 200, v5: none)
            extra["k_filter"] = None if args.k_filter == "none" else args.k_filter
    elif args.method == "harmony":  # only what was given: the library's own defaults otherwise
        extra = {name: value for name, value in (("theta", args.theta),
                 ("max_iter_harmony", args.max_iter_harmony)) if value is not None}
    else:
        extra = {"k": args.mnn_k, "d": args.mnn_d}
    integrate(adata, args.batch_key, method=args.method, key_added=args.key_added,
              n_top_genes=args.n_top_genes, n_pcs=args.n_pcs, flavor=args.flavor,
              seed=args.seed, device=args.device, progress=args.progress, **extra)
    io.write_h5ad(adata, args.output)
    return 0


#: ``--method`` name -> method. Later issues add entries (and their option groups) here.
METHODS: dict[str, IntegrationMethod] = {
    "cca": IntegrationMethod(
        "Seurat CCA anchors + IntegrateData (obsm X_cca, X_cca_corrected)", _anchor_args,
        _run_tl_integrate, param_flags={"dims": "--n-pcs", "n_pcs": "--n-pcs"}),
    "mnn": IntegrationMethod("fastMNN as batchelor (obsm X_mnn)", _mnn_args, _run_tl_integrate,
                             param_flags={"k": "--mnn-k", "d": "--mnn-d"}),
    "harmony": IntegrationMethod(
        "Harmony (harmonypy on the CPU, rapids-singlecell on a GPU) on --n-pcs PCs of the "
        "scaled HVGs (obsm X_harmony; needs pip install 'scatlas[harmony]')", _harmony_args,
        _run_tl_integrate, param_flags={"n_pcs": "--n-pcs"}),
    "inmf": IntegrationMethod(
        "LIGER integrative NMF, in memory (obsm X_inmf, X_inmf_norm)", _inmf_args, _run_inmf,
        param_flags={"thresh": "--var-thresh", "n_genes": "--n-genes"}),
    "online-inmf": IntegrationMethod(
        "online iNMF streamed from disk (several --inputs; --add-to, --project-onto)",
        _online_args, _run_online, multi_input=True),
}


# --------------------------------------------------------------------------------------------
# the subcommand
# --------------------------------------------------------------------------------------------


def _resolve_files(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``files`` is IN OUT, or OUT alone with ``--inputs``; set ``args.inputs``/``output``."""
    method = METHODS[args.method]
    if args.inputs:
        if len(args.files) != 1:
            parser.error("with --inputs give exactly one positional file, the output "
                         f"(got {args.files}); put OUT.h5ad before --inputs")
        if len(args.inputs) > 1 and not method.multi_input:
            parser.error(f"--method {args.method} takes one input file; several --inputs need "
                         "a streaming method (online-inmf)")
        args.output = args.files[0]
    else:
        if len(args.files) != 2:
            parser.error(f"expected IN.h5ad OUT.h5ad, got {args.files}")
        args.inputs, args.output = [args.files[0]], args.files[1]
    if args.output in args.inputs:
        parser.error("the output must differ from the inputs")


def _check_report_keys(args: argparse.Namespace) -> None:
    """``--label-key`` must name an obs column of the input (read from its obs only)."""
    from .. import io

    obs = io.read_h5ad(args.inputs[0], backed="r")
    try:
        if args.label_key not in obs.obs.columns:
            raise ScatlasInputError(
                f"--label-key {args.label_key!r} is not a column of {args.inputs[0]}'s obs "
                f"(available: {list(obs.obs.columns)[:20]})")
    finally:
        obs.file.close()


def cmd_integrate(args: argparse.Namespace) -> int:
    """Run the chosen method and write the output."""
    _resolve_files(args, args._parser)
    if args.report and args.label_key and not args.inputs[1:]:
        _check_report_keys(args)  # before the integration, not after minutes of it
    t0 = time.perf_counter()
    code = METHODS[args.method].run(args)
    print(f"integrate ({args.method}): wrote {args.output} in {time.perf_counter() - t0:.2f} s",
          file=sys.stderr)
    if code == 0 and args.report:
        from ..report import integration_report

        where = integration_report(args.output, args.report, batch_key=args.batch_key or "batch",
                                   label_key=args.label_key, key=args.key_added,
                                   progress=args.progress)
        print(f"integrate ({args.method}): report in {where}", file=sys.stderr)
    return code


def register(subparsers: Any, *, common: Callable[[argparse.ArgumentParser], None],
             io_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Add ``scatlas integrate`` (``io_args`` is not used: its ``--method`` is the SVD route)."""
    p = subparsers.add_parser(
        "integrate", help="integrate batches (Seurat CCA, fastMNN, Harmony, iNMF, online iNMF)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="IN.h5ad OUT.h5ad, or only OUT.h5ad when --inputs is given")
    p.add_argument("--inputs", nargs="+", metavar="IN.h5ad", default=None,
                   help="several input files (each a dataset, or split by --batch-key)")
    p.add_argument("--method", choices=sorted(METHODS), default="inmf",
                   help="; ".join(f"{name}: {m.help}" for name, m in METHODS.items()))
    p.add_argument("--batch-key", default=None,
                   help="obs column with the batch (default 'batch' for a single input; none "
                        "with --inputs: each file is one dataset)")
    p.add_argument("--k", type=int, default=20, help="number of factors (default 20)")
    p.add_argument("--key-added", default=None,
                   help="obsm key of the result; other keys derive from it (default X_METHOD, "
                        "X_inmf for online-inmf)")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="write metrics (JSON) and UMAP plots before/after, by batch and label")
    p.add_argument("--label-key", default=None,
                   help="obs column with cell labels for the report's bio-conservation metrics")
    common(p)
    for name, method in METHODS.items():
        method.add_arguments(p.add_argument_group(f"{name} options"))
    p.set_defaults(func=_with_defaults, seed=1, _parser=p)


def _with_defaults(args: argparse.Namespace) -> int:
    """Fill method-dependent defaults, then run."""
    if args.batch_key is None and not args.inputs:
        args.batch_key = "batch"
    if args.key_added is None:
        args.key_added = "X_inmf" if args.method == "online-inmf" else f"X_{args.method}"
    args.param_flags = dict(METHODS[args.method].param_flags)
    return cmd_integrate(args)

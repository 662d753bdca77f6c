"""The ``scatlas`` command: a thin layer over :mod:`scatlas.tl`, :mod:`scatlas.pp` and friends.

Subcommands (``scatlas SUBCOMMAND --help`` for each):

- ``info``: version, backend and devices, optional components found.
- ``pca IN.h5ad OUT.h5ad``: optional log-normalisation and HVG selection, then PCA.
- ``cca IN.h5ad OUT.h5ad``: Seurat-style CCA between two batches.
- ``synthetic OUT.h5ad``: write a synthetic atlas (the quickstart's data).
- ``integrate``: batch integration (:mod:`.integrate`).
- ``train metric|mvae|michigan|covel``, ``embed``, ``impute``: models (:mod:`.models`,
  :mod:`.michigan`, :mod:`.covel`); ``generate`` (:mod:`.michigan`).
- ``index``, ``search``, ``annotate``, ``serve``: cell search (:mod:`.search`).
- ``atlas build``: raw counts to a served index (:mod:`.atlas`).

The commands are thin: their work is in :mod:`scatlas.tl`, :mod:`scatlas.pp`,
:mod:`scatlas.search` and :mod:`scatlas.atlas` (flax's ``examples/*/main.py`` are kept short the
same way). Every library error a command meets is reported once, in :func:`main`, with the
parameters it names rewritten as the command's flags (:func:`_flag_names`).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__, backend
from ._common import _common, _io_args

#: the modules that add commands, in the order of ``scatlas --help``; each defines
#: ``register(subparsers, *, common, io_args)`` and sets ``func`` (``func(args) -> int``), and
#: may set ``param_flags`` (library parameter -> flag, where the flag is not the parameter's
#: own name) and ``param_values`` (Python value -> flag value) on its parsers
COMMAND_MODULES = ("info", "tools", "integrate", "models", "michigan", "search", "atlas")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scatlas",
        description="GPU-accelerated single-cell integration, embedding and search.",
    )
    parser.add_argument("--version", action="version", version=f"scatlas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for module in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{module}").register(sub, common=_common,
                                                                 io_args=_io_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scatlas`` console script; returns the exit code."""
    from .._validate import ScatlasInputError, TrainingDivergedError, in_caller_terms

    parser = build_parser()
    args = parser.parse_args(argv)
    shown_as = warnings.formatwarning  # names read when shown: integrate adds its method's
    values = getattr(args, "param_values", None)
    warnings.formatwarning = _warning_line(
        f"scatlas {args.command}",
        lambda text: in_caller_terms(text, _flag_names(parser, args), values=values))
    try:
        return int(args.func(args) or 0)
    except (ScatlasInputError, TrainingDivergedError) as err:
        # messages lead with the parameter at fault ("lam must be ...", "reference 'x' is ...")
        param = getattr(err, "param", None) or re.match(r"\w*", str(err)).group(0)
        text = in_caller_terms(err, _flag_names(parser, args), values=values, param=param)
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

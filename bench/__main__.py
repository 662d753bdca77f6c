"""Command line: ``python -m bench {list,run,report}``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import list_benchmarks
from .runner import DEFAULT_OUT

#: the page whose results block is rewritten (the README links to it)
DEFAULT_README = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def parse_value(text: str) -> Any:
    """``--param`` values: ints (``1e6`` too), floats, true/false/none, else the string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(lowered)
    except ValueError:
        pass
    try:
        number = float(lowered)
    except ValueError:
        return text
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["k=30", "exact_max_size=1e6"]`` -> ``{"k": 30, "exact_max_size": 1000000}``."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--param expects KEY=VALUE, got {item!r}")
        params[key.strip()] = parse_value(value)
    return params


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m bench``."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the benchmarks")

    run = sub.add_parser("run", help="run one benchmark at chosen sizes")
    run.add_argument("name")
    run.add_argument("--sizes", help="comma-separated, e.g. 1e4,1e5,1e6 (default: the "
                     "benchmark's own)")
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--warmup", type=int, default=1)
    run.add_argument("--device", default="auto", choices=("cpu", "gpu", "auto"))
    run.add_argument("--out", type=Path, default=DEFAULT_OUT)
    run.add_argument("--methods", help="comma-separated method names, shell patterns or roles "
                     "(ours, baseline); default all")
    run.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                     help="per method and size, stop repeating after this much timed time")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="benchmark parameter override (repeatable)")
    run.add_argument("--no-report", action="store_true",
                     help="skip regenerating the markdown table and plot")

    rep = sub.add_parser("report", help="regenerate tables, plots, docs/benchmarks.md block")
    rep.add_argument("--results", type=Path, default=DEFAULT_OUT)
    rep.add_argument("--readme", type=Path, default=DEFAULT_README)
    rep.add_argument("--no-readme", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "list":
        from . import REGISTRY

        for name, desc in list_benchmarks().items():
            print(f"{name:8s} {desc}  [{REGISTRY[name][0]}]")
        return 0
    if args.command == "run":
        from .runner import result_path, run_benchmark

        record = run_benchmark(
            args.name, args.sizes, repeats=args.repeats, warmup=args.warmup,
            device=args.device, out=args.out,
            methods=args.methods.split(",") if args.methods else None,
            budget_s=args.budget, report=not args.no_report, **parse_params(args.param),
        )
        print(result_path(args.out, record["benchmark"], record["device"]))
        from .runner import failed_methods

        failed = failed_methods(record)
        if failed:
            print(f"failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1 if failed else 0
        return 0
    from .report import write_report

    write_report(args.results, None if args.no_readme else args.readme)
    print(Path(args.results) / "REPORT.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

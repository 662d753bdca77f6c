"""``python -m bench.quality``: every method at its defaults on the real datasets, held out.

Runs the chosen sections (default: all) and writes, in ``--out`` (``bench/results``):

- ``quality_<device>.json``: the environment and, per section, every row and check; sections
  not rerun keep their rows from the previous file;
- ``quality_<device>.md`` and ``quality_<device>.png``: the pooled tables, the targets and a plot;
- the block between ``<!-- quality:start -->`` and ``<!-- quality:end -->`` of docs/benchmarks.md.

Exits 1 when a method or a section run now failed (its error is in the table), 0 otherwise;
with ``--strict`` also 2 when one of their targets is not met.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..environment import capture
from ..io import atomic_write_bytes, atomic_write_text
from ..runner import DEFAULT_OUT, log
from .report import plot_png, render, replace_block

SECTIONS = ("integration", "encoder", "vae")
#: the page whose quality block is rewritten (the README links to it)
DEFAULT_README = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def _load_section(name: str) -> Callable[..., dict[str, Any]]:
    return importlib.import_module(f"bench.quality.{name}").run


def run_section(name: str, quick: bool,
                loader: Callable[[str], Callable[..., dict[str, Any]]] | None = None
                ) -> dict[str, Any]:
    """Run one section; a section that raises is recorded with its error, never re-raised."""
    loader = loader or _load_section
    started = time.perf_counter()
    entry: dict[str, Any] = {"ran_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": quick,
                             "rows": [], "checks": [], "error": None}
    try:
        out = loader(name)(quick=quick)
        entry["rows"] = [dict(r, section=name) for r in out.get("rows", [])]
        entry["checks"] = [dict(c, section=name) for c in out.get("checks", [])]
        if out.get("description"):
            entry["description"] = out["description"]
    except Exception as exc:  # noqa: BLE001 - recorded and turned into the exit status
        entry["error"] = f"{type(exc).__name__}: {exc}"
        log(traceback.format_exc())
    entry["seconds"] = time.perf_counter() - started
    return entry


def failures(record: dict[str, Any]) -> list[str]:
    """Every failed section or method of the record, as text."""
    out = []
    for name, sec in record.get("sections", {}).items():
        if sec.get("error"):
            out.append(f"{name}: {sec['error']}")
        out += [f"{name} / {r.get('dataset')} / {r.get('method')}: {r['error']}"
                for r in sec.get("rows", []) if r.get("error")]
    return out


def unmet(record: dict[str, Any]) -> list[str]:
    """Every target of the record that is not met, as text."""
    return [f"{name} / {c.get('dataset')}: {c.get('check')} ({c.get('value')} vs "
            f"{c.get('target')})"
            for name, sec in record.get("sections", {}).items()
            for c in sec.get("checks", []) if not c.get("passed")]


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_outputs(record: dict[str, Any], out: Path, readme: Path | None) -> Path:
    """JSON, markdown, PNG (all atomic) and the docs/benchmarks.md block; returns the JSON path."""
    stem = f"quality_{record['device']}"
    path = out / f"{stem}.json"
    atomic_write_text(path, json.dumps(record, indent=1, default=_json_default) + "\n")
    atomic_write_bytes(out / f"{stem}.png", plot_png(record))
    atomic_write_text(out / f"{stem}.md", render(record, f"{stem}.png", level=2) + "\n")
    if readme is not None and readme.exists():
        link = Path(os.path.relpath((out / f"{stem}.png").resolve(),
                                    readme.resolve().parent)).as_posix()
        text = readme.read_text(encoding="utf-8")
        atomic_write_text(readme, replace_block(text, render(record, str(link))))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer splits and seeds (a smoke run of a few minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--readme", type=Path, default=DEFAULT_README,
                        help="page whose quality block is rewritten (default docs/benchmarks.md)")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the table, plot and page block from the JSON")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is unmet")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")

    device = "cpu"
    path = args.out / f"quality_{device}.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    record = {"benchmark": "quality", "device": device,
              "environment": old.get("environment") if args.report_only else capture(device),
              "sections": dict(old.get("sections", {}))}
    if not args.report_only:
        for name in chosen:
            log(f"quality: section {name}{' (quick)' if args.quick else ''}")
            record["sections"][name] = {**run_section(name, args.quick),
                                        "environment": capture(device)}
        record["sections"] = {n: record["sections"][n] for n in SECTIONS
                              if n in record["sections"]}
    args.out.mkdir(parents=True, exist_ok=True)
    written = write_outputs(record, args.out, None if args.no_readme else args.readme)
    log(f"quality: wrote {written}")
    # the exit status speaks for the sections run now (all of them with --report-only)
    judged = {**record, "sections": {n: s for n, s in record["sections"].items()
                                     if args.report_only or n in chosen}}
    missed = unmet(judged)
    for line in missed:
        log(f"target not met: {line}")
    bad = failures(judged)
    for line in bad:
        log(f"FAILED: {line}")
    if bad:
        return 1
    return 2 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())

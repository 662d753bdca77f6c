"""Run a benchmark: warm-up, repeats, median/min/max wall time, accuracy, JSON, table, plot.

Results go to ``<out>/<benchmark>_<device>.json``, one file per benchmark and device. A run
merges into the existing file: each (size, method) it runs replaces the old entry, everything
else is kept. The environment of every run still referenced is kept under ``runs`` and each
result names its ``run_id``. The file is rewritten after every size (atomically), so a crash at
a large size keeps the smaller ones.

A method that raises is recorded (``status: error``) and the next one runs; but a run with
failures must not look like a success: :func:`failed_methods` lists them, ``run_benchmark``
logs them at the end, and ``python -m bench.runner check FILE.json ...`` exits 1 naming every
failed method of each file's latest run (``bench/gpu/run.sh`` runs it after every benchmark).
"""

from __future__ import annotations

import fnmatch
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import environment, load_benchmark
from .io import atomic_write_text
from .spec import Benchmark, Method, Workload

SCHEMA_VERSION = 1
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    """Progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def parse_sizes(text: str | Iterable[Any]) -> list[int]:
    """``"1e4,1e5,2.5k,1M"`` (or an iterable of numbers) -> sorted unique ints."""
    items = text.split(",") if isinstance(text, str) else list(text)
    sizes = {_parse_size(item) for item in items if str(item).strip()}
    if not sizes:
        raise ValueError("no sizes given")
    return sorted(sizes)


def _parse_size(item: Any) -> int:
    text = str(item).strip().lower().replace("_", "")
    scale = {"k": 1e3, "m": 1e6}.get(text[-1:], 1.0)
    number = float(text[:-1] if scale != 1.0 else text) * scale
    if number < 1 or number != int(number):
        raise ValueError(f"size must be a positive integer, got {item!r}")
    return int(number)


def result_path(out: str | Path, name: str, device: str) -> Path:
    """Where a benchmark's JSON for one device lives."""
    return Path(out) / f"{name}_{device}.json"


def _load_1m() -> float | None:
    """The 1-minute load average when the timing ended (other work on the machine skews it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not available on this platform
        return None


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of the timed repeats (seconds)."""
    ordered = sorted(times)
    n = len(ordered)
    if n == 0:
        raise ValueError("no timings to summarize")
    mid = n // 2
    median = ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    return {"median_s": median, "min_s": ordered[0], "max_s": ordered[-1], "repeats": n}


def time_call(
    fn: Callable[[], Any],
    *,
    repeats: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
    budget_s: float | None = None,
) -> tuple[list[float], Any]:
    """Call ``fn`` ``warmup`` times untimed, then up to ``repeats`` times timed.

    ``sync`` runs before starting and before stopping the clock (GPU synchronisation). Once the
    timed calls have used ``budget_s`` seconds the remaining repeats are dropped (at least one
    always runs). Returns the wall times and the last call's output.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    output = None
    for _ in range(warmup):
        output = None  # drop the previous output before the next call allocates its own
        output = fn()
        sync()
    times: list[float] = []
    for _ in range(repeats):
        output = None
        sync()
        start = time.perf_counter()
        output = fn()
        sync()
        times.append(time.perf_counter() - start)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return times, output


def select_methods(methods: Sequence[Method], patterns: Sequence[str] | None) -> list[Method]:
    """Methods whose name (or role) equals or matches any shell-style pattern; all when none
    given (an exact name counts even when it has brackets, e.g. ``scatlas.metric.embed[csr]``)."""
    if not patterns:
        return list(methods)
    chosen = [
        m for m in methods
        if any(p in (m.name, m.role) or fnmatch.fnmatchcase(m.name, p) for p in patterns)
    ]
    if not chosen:
        known = ", ".join(m.name for m in methods)
        raise ValueError(f"no method matches {list(patterns)}; methods: {known}")
    return chosen


def run_method(
    bench: Benchmark,
    method: Method,
    workload: Workload,
    size: int,
    *,
    repeats: int,
    warmup: int,
    device: str,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Time one method at one size and measure its accuracy; never raises (except Ctrl-C)."""
    entry: dict[str, Any] = {"role": method.role, "group": method.group,
                             "runs_on": device if method.on_device else "cpu"}
    skip = method.skip_message(size)
    if skip is not None:
        return {**entry, "status": "skipped", "reason": skip}
    sync = _synchronizer(device if method.on_device else "cpu")
    try:
        times, output = time_call(
            lambda: method.call(workload), repeats=repeats, warmup=warmup, sync=sync,
            budget_s=budget_s,
        )
    except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking
        traceback.print_exc(file=sys.stderr)
        return {**entry, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
    entry.update(status="ok", times_s=times, warmup=warmup, load_1m=_load_1m(),
                 **summarize(times))
    try:
        scores = bench.accuracy(workload, method, output)
        entry["accuracy"] = {k: v if isinstance(v, str) else _number(v)
                             for k, v in scores.items()}
    except Exception as exc:  # noqa: BLE001 - timing stays valid without accuracy
        traceback.print_exc(file=sys.stderr)
        entry["accuracy_error"] = f"{type(exc).__name__}: {exc}"
    return entry


def _synchronizer(device: str) -> Callable[[], None]:
    if device != "gpu":
        return lambda: None
    backend = environment.get_backend()
    return backend.synchronize


def _number(value: Any) -> float | int | None:
    """JSON-safe scalar (NaN/inf -> None)."""
    if value is None:
        return None
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return int(number) if isinstance(value, int | bool) else number


def load_record(path: Path) -> dict[str, Any] | None:
    """An existing result file, or None when absent or of another schema."""
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        record = json.load(fh)
    if record.get("schema_version") != SCHEMA_VERSION:
        log(f"[bench] {path}: schema {record.get('schema_version')} != {SCHEMA_VERSION}; "
            "starting a new file")
        return None
    return record


def new_record(bench: Benchmark, device: str) -> dict[str, Any]:
    """An empty result record for one benchmark and device."""
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": bench.name,
        "description": bench.description,
        "device": device,
        "size_label": bench.size_label,
        "metrics": {key: m.to_json() for key, m in bench.metrics.items()},
        "methods": {},
        "runs": {},
        "latest_run": None,
        "results": {},
    }


def merge_size(record: dict[str, Any], size: int, entry: dict[str, Any]) -> None:
    """Put one size's results into the record, replacing only the methods that ran."""
    key = str(size)
    old = record["results"].get(key, {"size": size, "methods": {}})
    methods = {**old.get("methods", {}), **entry["methods"]}
    record["results"][key] = {**old, **entry, "methods": methods}
    record["results"] = dict(sorted(record["results"].items(), key=lambda kv: int(kv[0])))


def prune_runs(record: dict[str, Any]) -> None:
    """Forget run environments no result refers to any more."""
    used = {
        m.get("run_id")
        for size in record["results"].values()
        for m in size["methods"].values()
    }
    used.add(record.get("latest_run"))
    record["runs"] = {rid: env for rid, env in record["runs"].items() if rid in used}


def save_record(record: dict[str, Any], path: Path) -> None:
    """Write the record atomically."""
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=False) + "\n")


def run_benchmark(
    name: str,
    sizes: str | Iterable[Any] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    device: str | None = "auto",
    out: str | Path = DEFAULT_OUT,
    *,
    methods: Sequence[str] | None = None,
    budget_s: float | None = None,
    report: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """Run benchmark ``name`` at ``sizes`` and merge the results into ``<out>/<name>_<dev>.json``.

    ``methods``: shell-style patterns (or ``"ours"`` / ``"baseline"``) selecting methods.
    ``budget_s``: per method and size, stop repeating once the timed calls took this long.
    ``params`` override the benchmark's ``default_params``. With ``report`` the per-benchmark
    markdown table and PNG plot are regenerated next to the JSON. Returns the whole record.
    """
    bench = load_benchmark(name)
    dev = environment.get_backend().resolve_device(device)
    size_list = parse_sizes(sizes) if sizes is not None else list(bench.default_sizes)
    unknown = set(params) - set(bench.default_params)
    if unknown:
        raise ValueError(f"unknown parameters for {name}: {sorted(unknown)}; "
                         f"known: {sorted(bench.default_params)}")
    full_params = {**bench.default_params, **params}
    declared = list(bench.methods(full_params))
    chosen = select_methods(declared, methods)

    path = result_path(out, name, dev)
    record = load_record(path) or new_record(bench, dev)
    record.update(description=bench.description, size_label=bench.size_label,
                  metrics={key: m.to_json() for key, m in bench.metrics.items()})
    run_id, env = _start_run(record, dev, full_params, repeats, warmup, budget_s)
    record["methods"] = _method_table(declared, record["methods"])
    log(f"[{name}] device={dev} ({environment.describe_hardware(env)}), sizes={size_list}, "
        f"repeats={repeats}, warmup={warmup} -> {path}")
    for size in size_list:
        entry = _run_size(bench, chosen, size, dev, full_params, repeats, warmup, budget_s)
        for result in entry["methods"].values():
            result["run_id"] = run_id
        merge_size(record, size, entry)
        prune_runs(record)
        save_record(record, path)
    if report:
        from .report import write_benchmark_report  # matplotlib is slow to import

        write_benchmark_report(record, path.parent)
    failures = failed_methods(record, run_id)
    if failures:
        log(f"[{name}] FAILED {len(failures)} method run(s): " + "; ".join(failures))
    return record


def failed_methods(record: Mapping[str, Any], run_id: str | None = None) -> list[str]:
    """``"size=N method: error"`` for every result of run ``run_id`` (default: the record's
    latest run) that raised (``status: error``) or whose accuracy could not be measured
    (``accuracy_error``); results without a ``run_id`` count as the latest run's."""
    run_id = run_id if run_id is not None else record.get("latest_run")
    out = []
    for key, size in record.get("results", {}).items():
        for name, res in size.get("methods", {}).items():
            if res.get("run_id", run_id) != run_id:
                continue
            if res.get("status") == "error":
                out.append(f"size={key} {name}: {res.get('error', 'error')}")
            elif res.get("accuracy_error"):
                out.append(f"size={key} {name}: accuracy: {res['accuracy_error']}")
    return out


def check_results(paths: Sequence[str | Path]) -> int:
    """Exit status for result files: 0 when every method of each file's latest run succeeded,
    1 when one failed or a file is missing or unreadable (each named on stderr)."""
    status = 0
    for path in map(Path, paths):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log(f"[check] {path}: no result record ({type(exc).__name__}: {exc})")
            status = 1
            continue
        failures = failed_methods(record)
        ran = sum(1 for size in record.get("results", {}).values()
                  for res in size.get("methods", {}).values()
                  if res.get("run_id", record.get("latest_run")) == record.get("latest_run"))
        for failure in failures:
            log(f"[check] {path.name}: FAILED {failure}")
        if failures:
            status = 1
        else:
            log(f"[check] {path.name}: {ran} method result(s) of the latest run, none failed")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.runner check FILE.json [...]``: see :func:`check_results`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.runner")
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="exit 1 when a method of the latest run failed")
    chk.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    return check_results(args.files)


def _method_table(declared: Sequence[Method], old: Mapping[str, Any]) -> dict[str, Any]:
    """Method metadata in the benchmark's declaration order, then methods it no longer has."""
    table = {m.name: {"role": m.role, "group": m.group, "description": m.description}
             for m in declared}
    return {**table, **{name: meta for name, meta in old.items() if name not in table}}


def _start_run(
    record: dict[str, Any], device: str, params: Mapping[str, Any], repeats: int, warmup: int,
    budget_s: float | None,
) -> tuple[str, dict[str, Any]]:
    env = environment.capture(device)
    run_id = env["timestamp"]
    suffix = 1
    while run_id in record["runs"]:
        suffix += 1
        run_id = f"{env['timestamp']}#{suffix}"
    record["runs"][run_id] = {
        **env, "params": _jsonable(params), "repeats": repeats, "warmup": warmup,
        "budget_s": budget_s,
    }
    record["latest_run"] = run_id
    return run_id, env


def _run_size(
    bench: Benchmark, methods: Sequence[Method], size: int, device: str,
    params: Mapping[str, Any], repeats: int, warmup: int, budget_s: float | None,
) -> dict[str, Any]:
    tag = f"[{bench.name}] {bench.size_label}={size:,}"
    log(f"{tag}: building workload ...")
    start = time.perf_counter()
    workload = bench.build(size, device, params)
    workload.info.setdefault("build_s", round(time.perf_counter() - start, 3))
    log(f"{tag}: workload ready in {workload.info['build_s']:.1f} s")
    results: dict[str, Any] = {}
    for method in methods:
        log(f"{tag}: {method.name} ...")
        results[method.name] = run_method(
            bench, method, workload, size, repeats=repeats, warmup=warmup, device=device,
            budget_s=budget_s,
        )
        log(f"{tag}: {method.name}: {_describe_result(results[method.name])}")
    info = _jsonable(workload.info)
    del workload
    gc.collect()
    return {"size": size, "workload": info, "methods": results}


def _describe_result(result: Mapping[str, Any]) -> str:
    if result["status"] == "skipped":
        return f"skipped: {result['reason']}"
    if result["status"] == "error":
        return f"ERROR {result['error']}"
    acc = ", ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v:.3g}"
                    for k, v in result.get("accuracy", {}).items() if v is not None)
    return (f"median {result['median_s']:.4g} s [{result['min_s']:.4g}, {result['max_s']:.4g}]"
            f" x{result['repeats']}" + (f"; {acc}" if acc else ""))


def _jsonable(value: Any) -> Any:
    """Convert NumPy scalars / tuples / paths into plain JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | bool | type(None)):
        return value
    if isinstance(value, int | float):
        return _number(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _number(value.item())
    return str(value)


if __name__ == "__main__":
    sys.exit(main())

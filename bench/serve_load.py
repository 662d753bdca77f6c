"""Load test of the HTTP search service (``scatlas serve``) against direct ``index.search``.

Usage::

    python -m bench.serve_load --n-cells 1e6 --duration 20 --concurrency 32
    python -m bench.serve_load --n-cells 1e5 --duration 20 --concurrency 32 --max-wait-ms 0

Steps (each bounded in time, the script stops by itself):

1. Index: clustered synthetic unit embeddings (:func:`scatlas.search.synthetic.iter_clustered`,
   300 anisotropic clusters, ``--dim`` 128) with metadata (``cell_type`` = cluster, ``donor``),
   built with ``CellIndex.build(engine=--engine)`` and cached under ``bench/.cache/serve/``
   together with held-out queries from the same mixture.
2. Direct, in process (before the server starts, so they do not compete): single-query latency
   of ``idx.search(q[None], k)`` (sequential calls) and batched throughput of ``idx.search(Q, k)``
   with ``Q`` of ``--max-batch`` rows.
3. Server: ``python -m scatlas.cli serve`` on a free loopback port in a subprocess.
4. Single requests: one client, one keep-alive connection, sequential ``POST /search`` of one
   query (``--single-duration`` seconds): latency p50 / p99 -> HTTP overhead = HTTP p50 - direct
   p50.
5. Load: ``--concurrency`` async workers (httpx, one connection each) send ``POST /search`` back
   to back for ``--duration`` seconds: QPS, latency p50 / p99, errors, and the server's own
   ``/metrics`` (index calls, mean queries per call, batch-size histogram).
6. SIGTERM; the server must exit 0.
7. HTTP floor: the same load against a trivial Starlette endpoint (reads the body, returns a
   constant) for ``--floor-duration`` seconds: the ceiling of uvicorn + the client here.

The client runs on the same machine as the server (loopback), so on few cores it competes with
the server for CPU: the figures are a lower bound of what the service does with a remote client.
The 1-minute load average is recorded before and after (the machine may be shared).

Results go to ``bench/results/serve_<device>.json`` (one entry per ``--n-cells`` and ``--label``,
replaced when re-run) and ``serve_<device>.md`` (regenerated from the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .environment import REPO_ROOT, capture, describe_hardware
from .io import atomic_write_text

CACHE = REPO_ROOT / "bench" / ".cache" / "serve"
RESULTS = REPO_ROOT / "bench" / "results"
N_QUERIES = 4096


def log(message: str) -> None:
    print(f"[serve_load] {message}", file=sys.stderr, flush=True)


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


def quantiles_ms(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(latencies) * 1e3
    out = {f"p{round(q * 100)}": round(float(np.quantile(a, q)), 3) for q in (0.5, 0.9, 0.99)}
    return {**out, "mean": round(float(a.mean()), 3), "max": round(float(a.max()), 3)}


# ------------------------------------------------------------------------------------------------
# index and queries (cached)
# ------------------------------------------------------------------------------------------------


def cache_dir(n: int, dim: int, engine: str) -> Path:
    return CACHE / f"n{n}_d{dim}_{engine}"


def build_or_load(n: int, dim: int, engine: str, seed: int = 0):
    """The cached index folder and held-out queries (building them on the first run)."""
    import pandas as pd

    from scatlas.search import CellIndex
    from scatlas.search.synthetic import iter_clustered

    folder = cache_dir(n, dim, engine)
    index_dir, query_path = folder / "index", folder / "queries.npy"
    if index_dir.is_dir() and query_path.is_file():
        t0 = time.perf_counter()
        idx = CellIndex.load(index_dir)
        log(f"loaded cached index {index_dir} ({idx.ntotal} x {idx.dim}, {idx.engine}) in "
            f"{time.perf_counter() - t0:.1f} s")
        info = {"cached": True}
        if (folder / "build.json").is_file():
            info.update(json.loads((folder / "build.json").read_text()))
        return idx, index_dir, np.load(query_path), info
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    chunk = 100_000
    X = np.empty((n, dim), np.float32)
    labels = np.empty(n, np.int64)
    queries = None
    start = 0
    # rows after n come from the same mixture: the held-out queries
    for part, lab in iter_clustered(n + N_QUERIES, dim, seed=seed, chunk_size=chunk, labels=True):
        take = min(part.shape[0], n - start) if start < n else 0
        X[start:start + take], labels[start:start + take] = part[:take], lab[:take]
        if take < part.shape[0]:
            rest = part[take:]
            queries = rest if queries is None else np.concatenate([queries, rest])
        start += take
    assert queries is not None
    queries = queries[:N_QUERIES]
    rng = np.random.default_rng(seed)
    meta = pd.DataFrame({"cell_type": pd.Categorical([f"c{i}" for i in labels]),
                         "donor": pd.Categorical(rng.choice([f"d{i}" for i in range(8)], n))})
    t_data = time.perf_counter() - t0
    log(f"generated {n} x {dim} embeddings in {t_data:.1f} s; building {engine} index")
    t0 = time.perf_counter()
    idx = CellIndex.build(X, meta, engine=engine, progress=False)
    t_build = time.perf_counter() - t0
    log(f"built {idx!r} in {t_build:.1f} s")
    idx.save(index_dir)
    np.save(query_path, queries)
    info = {"build_s": round(t_build, 2), "data_s": round(t_data, 2),
            "build_load_1m_after": load1()}
    atomic_write_text(folder / "build.json", json.dumps(info) + "\n")
    return idx, index_dir, queries, {"cached": False, **info}


# ------------------------------------------------------------------------------------------------
# direct in-process timings
# ------------------------------------------------------------------------------------------------


def direct_timings(idx, queries: np.ndarray, k: int, batch: int, seconds: float) -> dict[str, Any]:
    idx.search(queries[:batch], k)  # warm-up
    single: list[float] = []
    t_end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < t_end or len(single) < 20:
        q = queries[i % len(queries)][None]
        t0 = time.perf_counter()
        idx.search(q, k)
        single.append(time.perf_counter() - t0)
        i += 1
    batches: list[float] = []
    t_end = time.perf_counter() + seconds
    j = 0
    while time.perf_counter() < t_end or len(batches) < 3:
        s = (j * batch) % (len(queries) - batch + 1)
        t0 = time.perf_counter()
        idx.search(queries[s:s + batch], k)
        batches.append(time.perf_counter() - t0)
        j += 1
    per_batch = float(np.median(batches))
    return {"single_latency_ms": quantiles_ms(single), "single_calls": len(single),
            "batch_size": batch, "batch_median_ms": round(per_batch * 1e3, 3),
            "batch_queries_per_s": round(batch / per_batch, 1), "batch_calls": len(batches)}


# ------------------------------------------------------------------------------------------------
# the server and the HTTP client
# ------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_ms_per_request(before: float | None, after: float | None, n: int) -> float | None:
    if before is None or after is None or n == 0:
        return None
    return round((after - before) * 1e3 / n, 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "scatlas.cli", "serve", "--index", str(index_dir), "--port",
           str(port), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--log-level", "warning"]
    if args.index_threads:
        cmd += ["--index-threads", str(args.index_threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO_ROOT)


#: a Starlette endpoint that reads the body and answers a fixed small JSON: the HTTP stack's own
#: ceiling on this machine with this client (no parsing, no index, no batching)
FLOOR_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def search(request):
    await request.body()
    return JSONResponse({"ok": True})

async def health(request):
    return JSONResponse({"status": "ok", "engine": "none", "ntotal": 0})

app = Starlette(routes=[Route("/search", search, methods=["POST"]), Route("/health", health)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def floor_phase(payloads: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """QPS of the trivial endpoint under the same client and concurrency."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 60)
        cpu0 = cpu_seconds(proc.pid)
        out = asyncio.run(load_phase(url, payloads, args.concurrency, args.floor_duration, 1))
        cpu1 = cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    return {"requests_per_s": out["requests_per_s"], "latency_ms": out["latency_ms"],
            "errors": out["errors"], "duration_s": args.floor_duration,
            "server_cpu_ms_per_request": cpu_ms_per_request(cpu0, cpu1, out["requests"])}


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{proc.communicate()[1][-3000:]}")
        try:
            r = httpx.get(f"{url}/health", timeout=2.0)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout} s")


def bodies(queries: np.ndarray, per_request: int, k: int, metadata: bool) -> list[bytes]:
    """Pre-encoded request bodies (the client's JSON encoding is not timed)."""
    out = []
    for s in range(0, len(queries) - per_request + 1, per_request):
        out.append(json.dumps({"embeddings": queries[s:s + per_request].tolist(), "k": k,
                               "include_metadata": metadata}).encode())
    return out


async def single_phase(url: str, payloads: list[bytes], seconds: float) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as c:
        for p in payloads[:5]:  # warm-up
            await c.post("/search", content=p)
        t_end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            r = await c.post("/search", content=payloads[i % len(payloads)],
                             headers={"content-type": "application/json"})
            lat.append(time.perf_counter() - t0)
            errors += r.status_code != 200
            i += 1
    return {"requests": len(lat), "errors": errors, "latency_ms": quantiles_ms(lat)}


async def load_phase(url: str, payloads: list[bytes], concurrency: int, seconds: float,
                     per_request: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    lat: list[float] = []
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as c:
        t_start = time.perf_counter()
        t_end = t_start + seconds

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                try:
                    r = await c.post("/search", content=payloads[i % len(payloads)],
                                     headers={"content-type": "application/json"})
                    if r.status_code == 200:
                        lat.append(time.perf_counter() - t0)
                    else:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                except httpx.HTTPError as err:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t_start
    n_ok = len(lat)
    return {"concurrency": concurrency, "elapsed_s": round(elapsed, 3), "requests": n_ok,
            "errors": sum(errors.values()), "error_kinds": errors,
            "requests_per_s": round(n_ok / elapsed, 1),
            "queries_per_s": round(n_ok * per_request / elapsed, 1),
            "latency_ms": quantiles_ms(lat)}


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return {"exit_code": None, "stop_s": None, "stderr_tail": err[-1000:]}
    return {"exit_code": proc.returncode, "stop_s": round(time.perf_counter() - t0, 3),
            "stderr_tail": err[-1000:] if proc.returncode else ""}


# ------------------------------------------------------------------------------------------------
# the run and the report
# ------------------------------------------------------------------------------------------------


def stack_versions() -> dict[str, Any]:
    """Versions of the HTTP stack (uvicorn uses httptools / uvloop when they are installed)."""
    from .environment import package_version

    return {name: package_version(name) for name in
            ("starlette", "uvicorn", "httpx", "httptools", "uvloop", "faiss-cpu")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    n = int(float(args.n_cells))
    load_before = load1()
    t_all = time.perf_counter()
    idx, index_dir, queries, build_info = build_or_load(n, args.dim, args.engine)
    if args.index_threads:
        import faiss

        faiss.omp_set_num_threads(args.index_threads)
    index_info = {"ntotal": int(idx.ntotal), "dim": int(idx.dim), "engine": idx.engine,
                  "metric": idx.metric, "nlist": idx.nlist, "nprobe": idx.nprobe, **build_info}
    log(f"direct in-process timings ({args.direct_seconds:g} s each)")
    direct = direct_timings(idx, queries, args.k, args.max_batch, args.direct_seconds)
    log(f"direct: single p50 {direct['single_latency_ms']['p50']} ms, batch of "
        f"{args.max_batch}: {direct['batch_queries_per_s']} queries/s")
    del idx
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = start_server(index_dir, port, args)
    try:
        health = wait_healthy(url, proc, args.startup_timeout)
        startup_s = time.perf_counter() - t0
        log(f"server up in {startup_s:.1f} s: {health['engine']}, {health['ntotal']} vectors")
        payloads = bodies(queries, args.queries_per_request, args.k, args.metadata)
        single = asyncio.run(single_phase(url, bodies(queries, 1, args.k, args.metadata),
                                          args.single_duration))
        log(f"single requests: {single['requests']} in {args.single_duration:g} s, p50 "
            f"{single['latency_ms']['p50']} ms")
        load_mid = load1()
        cpu0 = cpu_seconds(proc.pid)
        load = asyncio.run(load_phase(url, payloads, args.concurrency, args.duration,
                                      args.queries_per_request))
        load["server_cpu_ms_per_request"] = cpu_ms_per_request(cpu0, cpu_seconds(proc.pid),
                                                               load["requests"])
        log(f"load: {load['requests_per_s']} req/s, p50 {load['latency_ms']['p50']} ms, p99 "
            f"{load['latency_ms']['p99']} ms, errors {load['errors']}")
        server_metrics = httpx.get(f"{url}/metrics", timeout=10).json()
    finally:
        if proc.poll() is None:
            stop = stop_server(proc)
        else:
            stop = {"exit_code": proc.returncode, "stop_s": None, "stderr_tail": ""}
    log(f"server stopped: exit code {stop['exit_code']}")
    floor = None
    if args.floor_duration > 0:
        floor = floor_phase(payloads, args)
        log(f"HTTP floor (trivial endpoint): {floor['requests_per_s']} req/s")
    overhead = None
    if single["latency_ms"]["p50"] is not None:
        overhead = round(single["latency_ms"]["p50"] - direct["single_latency_ms"]["p50"], 3)
    batches = server_metrics["batches"]
    return {
        "n_cells": n,
        "label": args.label,
        "command": "python -m bench.serve_load " + " ".join(sys.argv[1:]),
        "settings": {"dim": args.dim, "k": args.k, "engine": args.engine,
                     "concurrency": args.concurrency, "duration_s": args.duration,
                     "single_duration_s": args.single_duration,
                     "queries_per_request": args.queries_per_request,
                     "include_metadata": args.metadata, "max_batch": args.max_batch,
                     "max_wait_ms": args.max_wait_ms,
                     "index_threads": args.index_threads or "faiss default"},
        "index": index_info,
        "stack": stack_versions(),
        "direct": direct,
        "server_startup_s": round(startup_s, 2),
        "http_single": single,
        "http_load": load,
        "http_overhead_p50_ms": overhead,
        "http_floor": floor,
        "server": {"index_calls": batches["index_calls"],
                   "mean_queries_per_call": batches["mean_queries_per_call"],
                   "queries_per_call_hist": batches["queries_per_call_hist"],
                   "index_busy_s": batches["busy_s"],
                   "search_latency_ms": server_metrics["endpoints"].get("search", {})
                   .get("latency_ms")},
        "shutdown": stop,
        "load_1m": {"before": load_before, "before_load_phase": load_mid, "after": load1()},
        "wall_s": round(time.perf_counter() - t_all, 1),
    }


def result_paths(device: str) -> tuple[Path, Path]:
    return RESULTS / f"serve_{device}.json", RESULTS / f"serve_{device}.md"


def merge(entry: dict[str, Any], env: dict[str, Any], device: str) -> dict[str, Any]:
    path, _ = result_paths(device)
    record: dict[str, Any] = {"kind": "serve_load", "device": device, "entries": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("kind") == "serve_load":
                record = old
        except ValueError:
            pass
    entry = {**entry, "environment": env}
    record["entries"][f"{entry['n_cells']}:{entry['label']}"] = entry
    record["entries"] = dict(sorted(record["entries"].items(),
                                    key=lambda kv: (int(kv[0].split(":")[0]), kv[0])))
    return record


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _stack(stack: dict[str, Any]) -> str:
    if not stack:
        return "HTTP stack not recorded"
    http = "httptools" if stack.get("httptools") else "h11"
    loop = "uvloop" if stack.get("uvloop") else "asyncio"
    return (f"uvicorn {stack.get('uvicorn')} ({http}, {loop}), starlette {stack.get('starlette')}, "
            f"httpx {stack.get('httpx')} client")


def markdown(record: dict[str, Any]) -> str:
    intro = (
        "`python -m bench.serve_load`: `scatlas serve` on loopback, driven by an async httpx "
        "client on the same machine (client and server share the CPU); direct = `idx.search` in "
        "process. Latencies in ms (client side); q/s = queries per second (one query per "
        "request, 16 for the q16 rows). HTTP floor = the same client against a Starlette "
        "endpoint that only reads the body and returns a constant: the ceiling of the HTTP "
        "stack and client on this machine at that moment. Server CPU ms/req = the server "
        "process's user + system CPU time during the load phase per answered request (less "
        "sensitive to other work on the machine than wall-clock figures); server p50 = the "
        "service's own `/search` latency from `/metrics` (request read to response built).")
    lines = [f"### HTTP search service load test ({record['device']})", "", intro, "",
             "| cells | engine (nprobe) | direct 1-query p50 / p99 | direct batch q/s "
             "| HTTP 1-query p50 / p99 | overhead p50 | load: conc. | q/s | p50 / p99 | errors "
             "| mean batch | server p50 | server CPU ms/req | HTTP floor req/s (CPU ms/req) "
             "| load 1m |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in record["entries"].values():
        d, s, ld = e["direct"], e["http_single"], e["http_load"]
        floor = e.get("http_floor") or {}
        idx = e["index"]
        engine = idx["engine"] + (f" ({idx['nprobe']})" if idx.get("nprobe") else "")
        lines.append(
            f"| {_fmt(e['n_cells'])}{'' if e['label'] == 'default' else ' ' + e['label']} "
            f"| {engine} "
            f"| {_fmt(d['single_latency_ms']['p50'])} / {_fmt(d['single_latency_ms']['p99'])} "
            f"| {_fmt(d['batch_queries_per_s'])} (batch {d['batch_size']}) "
            f"| {_fmt(s['latency_ms']['p50'])} / {_fmt(s['latency_ms']['p99'])} "
            f"| {_fmt(e['http_overhead_p50_ms'])} "
            f"| {ld['concurrency']} | {_fmt(ld['queries_per_s'])} "
            f"| {_fmt(ld['latency_ms']['p50'])} / {_fmt(ld['latency_ms']['p99'])} "
            f"| {ld['errors']} | {_fmt(e['server']['mean_queries_per_call'])} "
            f"| {_fmt((e['server'].get('search_latency_ms') or {}).get('p50'))} "
            f"| {_fmt(ld.get('server_cpu_ms_per_request'))} "
            f"| {_fmt(floor.get('requests_per_s'))} "
            f"({_fmt(floor.get('server_cpu_ms_per_request'))}) "
            f"| {_fmt(e['load_1m']['before_load_phase'])} -> {_fmt(e['load_1m']['after'])} |")
    lines.append("")
    for key, e in record["entries"].items():
        env = e["environment"]
        st = e["settings"]
        commit = (env["git"].get("commit") or "?")[:10]
        dirty = " (dirty)" if env["git"].get("dirty") else ""
        lines.append(
            f"- `{key}`: {describe_hardware(env)}, {env['timestamp']}, commit {commit}{dirty}"
            f"; k={st['k']}, d={st['dim']}, max_batch={st['max_batch']}, max_wait_ms="
            f"{st['max_wait_ms']}, index threads {st.get('index_threads', '?')}, "
            f"{st['queries_per_request']} query/request, metadata "
            f"{'on' if st['include_metadata'] else 'off'}, {st['duration_s']} s load; index "
            f"build {e['index'].get('build_s', 'cached')} s; {_stack(e.get('stack', {}))}; "
            f"shutdown exit code "
            f"{e['shutdown']['exit_code']} in {e['shutdown']['stop_s']} s; command: "
            f"`{e['command']}`")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cells", default="1e5", help="indexed cells (e.g. 1e5, 1e6)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--engine", default="auto", help="CellIndex engine (default auto)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--duration", type=float, default=20.0, help="load phase seconds")
    p.add_argument("--single-duration", type=float, default=5.0,
                   help="sequential single-request phase seconds")
    p.add_argument("--direct-seconds", type=float, default=3.0,
                   help="seconds of each direct in-process timing")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--floor-duration", type=float, default=8.0,
                   help="seconds of the trivial-endpoint ceiling phase (0: skip)")
    p.add_argument("--queries-per-request", type=int, default=1)
    p.add_argument("--metadata", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for the hits' metadata rows (default yes)")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--index-threads", type=int, default=1,
                   help="faiss threads in the server and the direct timings (0: faiss default)")
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--label", default="default", help="result entry label (settings variant)")
    p.add_argument("--no-save", action="store_true", help="print the JSON, write nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cpu"
    env = capture(device)
    entry = run(args)
    if args.no_save:
        print(json.dumps(entry, indent=1))
        return 0
    record = merge(entry, env, device)
    json_path, md_path = result_paths(device)
    atomic_write_text(json_path, json.dumps(record, indent=1) + "\n")
    atomic_write_text(md_path, markdown(record))
    log(f"wrote {json_path} and {md_path}")
    print(markdown(record))
    return 0 if entry["shutdown"]["exit_code"] == 0 and entry["http_load"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

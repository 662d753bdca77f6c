"""Does the web page's traffic slow the JSON API? ``/search`` QPS and p99 with and without
concurrent page traffic, on loopback, bounded in count and time (issue 23).

Usage::

    python -m bench.web_load --n-cells 1e5 --duration 10 --concurrency 8 --viewers 4

Steps:

1. Index: the cached synthetic index of :mod:`bench.serve_load` (clustered unit embeddings,
   ``cell_type`` / ``donor`` metadata), plus a stored 2-D map (``pca``, quick at any size; the
   embeddings are generated again from the same seed) so the page's endpoints have data.
2. ``scatlas serve`` on a free loopback port (``--max-wait-ms``, ``--index-threads 1``).
3. Warm-up: a page load and a query (which also draws ``/map.png`` once; it is cached after).
4. Three phases of ``--duration`` seconds each (run ``--rounds`` times, interleaved, so that a
   drift of the machine's load shows), the same JSON clients in each:
   ``--concurrency`` async workers sending ``POST /search`` (one query, ``k`` = 10, metadata)
   back to back, with

   - ``alone``: nothing else;
   - ``paced``: ``--viewers`` page viewers, each making one query by cell id per
     ``--think-s`` seconds (a person reading the results between queries);
   - ``saturating``: the same viewers with no pause (the worst case: queries back to back).

   A viewer first loads the page as a browser does (``GET /``, ``/static/app.css``,
   ``/static/app.js``, ``/health``, ``/map``, ``/map.png``), then queries by cell id as the
   page's JavaScript does (``GET /cells/<id>``; ``POST /search`` and ``POST /annotate``, k = 50,
   together; ``POST /map/points``), and reloads the page every ``--reload-every`` queries (the
   CSS, JavaScript and map picture then come from the browser's cache: they are served with
   ``max-age``).
5. SIGTERM; the server must exit 0.

Each phase stops after ``--duration`` seconds (page viewers also after ``--max-queries``
queries in all). The clients share the machine with the server, so on few cores the page
viewers compete for the same CPU as the server: the ``saturating`` figures show that
contention, not a property of the page's code. Results: ``bench/results/web_load_cpu.json``
and ``.md``, with the environment and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .environment import REPO_ROOT, capture, describe_hardware
from .io import atomic_write_text
from .serve_load import (
    N_QUERIES,
    bodies,
    build_or_load,
    free_port,
    load1,
    load_phase,
    quantiles_ms,
    stop_server,
    wait_healthy,
)

RESULTS = REPO_ROOT / "bench" / "results"
PAGE_FILES = ("/", "/static/app.css", "/static/app.js", "/health", "/map", "/map.png")
#: what a browser keeps between loads of the page (versioned static files, the map picture)
CACHED_FILES = ("/static/app.css", "/static/app.js", "/map.png")


def log(message: str) -> None:
    print(f"[web_load] {message}", file=sys.stderr, flush=True)


def ensure_map(index_dir: Path, n: int, dim: int, seed: int = 0) -> str:
    """Store a pca map in the cached index folder unless one is there; its method."""
    from scatlas.search.atlas_map import compute_map, load_map, save_map
    from scatlas.search.synthetic import iter_clustered

    stored = load_map(index_dir)
    if stored is not None and stored.n == n:
        return stored.method
    t0 = time.perf_counter()
    X = np.empty((n, dim), np.float32)
    start = 0
    for part in iter_clustered(n + N_QUERIES, dim, seed=seed, chunk_size=100_000):
        take = min(part.shape[0], n - start)
        if take <= 0:
            break
        X[start:start + take] = part[:take]
        start += take
    save_map(index_dir, X, compute_map(X, "pca"), method="pca")
    log(f"stored a pca map of {n} cells in {time.perf_counter() - t0:.1f} s")
    return "pca"


def _count(counts: dict[str, int], status: int) -> None:
    counts[str(status)] = counts.get(str(status), 0) + 1


async def page_load(c: Any, counts: dict[str, int], *, cached: bool) -> None:
    """The requests of a page load; ``cached``: the browser holds the page's CSS, JavaScript
    and map picture (served with ``max-age``), so only the page and its JSON are fetched."""
    for path in PAGE_FILES:
        if cached and path in CACHED_FILES:
            continue
        _count(counts, (await c.get(path)).status_code)


async def cell_query(c: Any, cell: int, counts: dict[str, int]) -> None:
    """The requests of one query by cell id on an open page (as app.js sends them)."""
    r = await c.get(f"/cells/{cell}")
    _count(counts, r.status_code)
    emb = r.json()["embedding"]
    hits, ann = await asyncio.gather(
        c.post("/search", json={"embeddings": [emb], "k": 50}),
        c.post("/annotate", json={"embeddings": [emb], "k": 50, "label_key": "cell_type"}))
    pts = await c.post("/map/points", json={"ids": hits.json()["ids"]})
    for r in (hits, ann, pts):
        _count(counts, r.status_code)


async def viewers_phase(url: str, viewers: int, think_s: float, seconds: float,
                        max_queries: int, n_cells: int, reload_every: int) -> dict[str, Any]:
    """``viewers`` page viewers for ``seconds``: each loads the page, then queries by cell id
    (at most ``max_queries`` in all), one per ``think_s`` seconds, reloading the page (from the
    browser's cache) every ``reload_every`` queries."""
    import httpx

    counts: dict[str, int] = {}
    queries: list[float] = []
    loads: list[bool] = []
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as c:
        t_end = time.perf_counter() + seconds

        async def viewer(v: int) -> None:
            rng = np.random.default_rng(v)
            done = 0
            while time.perf_counter() < t_end and len(queries) < max_queries:
                t0 = time.perf_counter()
                try:
                    if done % reload_every == 0:  # a fresh load first, cached reloads after
                        await page_load(c, counts, cached=done > 0)
                        loads.append(done > 0)
                    await cell_query(c, int(rng.integers(0, n_cells)), counts)
                    queries.append(time.perf_counter() - t0)
                except httpx.HTTPError as err:
                    counts[type(err).__name__] = counts.get(type(err).__name__, 0) + 1
                done += 1
                left = t_end - time.perf_counter()
                await asyncio.sleep(min(left, max(0.0, think_s - (time.perf_counter() - t0))))

        await asyncio.gather(*(viewer(v) for v in range(viewers)))
    return {"viewers": viewers, "think_s": think_s, "queries": len(queries),
            "queries_per_s": round(len(queries) / seconds, 2),
            "page_loads": {"fresh": loads.count(False), "cached": loads.count(True)},
            "requests": sum(counts.values()), "requests_per_s": round(sum(counts.values())
                                                                     / seconds, 1),
            "status": counts, "query_ms": quantiles_ms(queries)}


async def phase(url: str, payloads: list[bytes], args: argparse.Namespace, viewers: int,
                think_s: float) -> dict[str, Any]:
    """The JSON clients (:func:`bench.serve_load.load_phase`) for ``args.duration`` s, with
    ``viewers`` page viewers beside them (none: the JSON clients alone)."""
    clients = load_phase(url, payloads, args.concurrency, args.duration, 1)
    if not viewers:
        return {"search": await clients}
    search, page = await asyncio.gather(clients, viewers_phase(
        url, viewers, think_s, args.duration, args.max_queries, args.n_cells_int,
        args.reload_every))
    return {"search": search, "page": page}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    n = int(float(args.n_cells))
    args.n_cells_int = n
    t_all = time.perf_counter()
    load_before = load1()
    idx, index_dir, queries, _ = build_or_load(n, args.dim, args.engine)
    index_info = {"ntotal": int(idx.ntotal), "dim": int(idx.dim), "engine": idx.engine,
                  "nprobe": idx.nprobe}
    del idx
    method = ensure_map(index_dir, n, args.dim)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "scatlas.cli", "serve", "--index", str(index_dir), "--port",
           str(port), "--max-wait-ms", str(args.max_wait_ms), "--index-threads", "1",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                            cwd=REPO_ROOT)
    phases: dict[str, Any] = {}
    try:
        wait_healthy(url, proc, args.startup_timeout)
        payloads = bodies(queries, 1, 10, True)

        async def warm() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=120.0) as c:
                await page_load(c, {}, cached=False)
                await cell_query(c, 0, {})
                # the stored embeddings are the index's: cell 7 is its own nearest hit
                emb = (await c.get("/cells/7")).json()["embedding"]
                hit = (await c.post("/search", json={"embeddings": [emb], "k": 1})).json()
                if hit["ids"][0][0] != 7:
                    raise RuntimeError(f"the map's embeddings do not match the index: {hit}")

        asyncio.run(warm())
        plan = (("alone", 0, 0.0), ("paced", args.viewers, args.think_s),
                ("saturating", args.viewers, 0.0))
        for r in range(1, args.rounds + 1):  # rounds interleave: drift in the load shows
            for base, viewers, think in plan:
                name = base if args.rounds == 1 else f"{base} {r}"
                phases[name] = asyncio.run(phase(url, payloads, args, viewers, think))
            p = phases[name]
            log(f"{name}: /search {p['search']['requests_per_s']} req/s, p99 "
                f"{p['search']['latency_ms']['p99']} ms"
                + (f"; {p['page']['queries']} page queries" if "page" in p else ""))
        server = httpx.get(f"{url}/metrics", timeout=10).json()["endpoints"]
    finally:
        stop = stop_server(proc) if proc.poll() is None else {"exit_code": proc.returncode}
    return {
        "n_cells": n, "label": args.label,
        "command": "python -m bench.web_load " + " ".join(sys.argv[1:]),
        "settings": {"dim": args.dim, "engine": args.engine, "concurrency": args.concurrency,
                     "duration_s": args.duration, "max_queries": args.max_queries,
                     "reload_every": args.reload_every,
                     "viewers": args.viewers, "think_s": args.think_s,
                     "max_wait_ms": args.max_wait_ms, "map": method},
        "index": index_info, "phases": phases,
        "server_errors": {k: v["errors"] for k, v in server.items() if v["errors"]},
        # the server's own latency per endpoint over the whole run (last 10,000 requests each)
        "server_latency_ms": {k: v.get("latency_ms") for k, v in server.items()},
        "shutdown": {"exit_code": stop.get("exit_code")},
        "load_1m": {"before": load_before, "after": load1()},
        "wall_s": round(time.perf_counter() - t_all, 1),
    }


def markdown(record: dict[str, Any]) -> str:
    lines = ["# /search with and without the web page's traffic (CPU, loopback)", "",
             "Written by `bench/web_load.py`; each row: the JSON clients' `POST /search` "
             "(1 query, k = 10, metadata) while page viewers query by cell id.", ""]
    for key, e in record["entries"].items():
        env = e["environment"]
        s = e["settings"]
        lines += [f"## {key}: {e['n_cells']} cells, {e['index']['engine']}", "",
                  f"{describe_hardware(env)}; {s['concurrency']} JSON clients, "
                  f"{s['viewers']} page viewers (paced: a query by cell id per {s['think_s']} "
                  f"s each; a page reload every {s['reload_every']} queries), "
                  f"{s['duration_s']} s per phase, at most {s['max_queries']} page queries; "
                  f"1-minute load average {e['load_1m']['before']} before, "
                  f"{e['load_1m']['after']} after; `{e['command']}`", "",
                  "| phase | /search req/s | p50 ms | p99 ms | errors | page queries/s | "
                  "page requests/s | page query p50 ms |", "|---|---|---|---|---|---|---|---|"]
        for name, p in e["phases"].items():
            page = p.get("page", {})
            lat = p["search"]["latency_ms"]
            lines.append(f"| {name} | {p['search']['requests_per_s']} | {lat['p50']} | "
                         f"{lat['p99']} | {p['search']['errors']} | "
                         f"{page.get('queries_per_s', '')} | {page.get('requests_per_s', '')} | "
                         f"{page.get('query_ms', {}).get('p50', '')} |")
        lines += ["", "The server's own latency per endpoint over the run (ms):", "",
                  "| endpoint | p50 | p99 | requests in window |", "|---|---|---|---|"]
        for name, lat in sorted(e.get("server_latency_ms", {}).items()):
            if lat:
                lines.append(f"| {name} | {lat['p50']} | {lat['p99']} | {lat['window']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.web_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cells", default="1e5", help="indexed cells (default 1e5)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--engine", default="auto")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--max-queries", type=int, default=2_000,
                   help="page queries per phase at most (all viewers)")
    p.add_argument("--reload-every", type=int, default=10,
                   help="a viewer reloads the page every this many queries (default 10)")
    p.add_argument("--concurrency", type=int, default=8, help="JSON clients")
    p.add_argument("--viewers", type=int, default=4, help="page viewers")
    p.add_argument("--think-s", type=float, default=1.0,
                   help="seconds between a paced viewer's queries (default 1)")
    p.add_argument("--rounds", type=int, default=2,
                   help="times the three phases are run, interleaved (default 2)")
    p.add_argument("--max-wait-ms", type=float, default=0.0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--label", default="default")
    p.add_argument("--no-save", action="store_true", help="print the JSON, write nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = capture("cpu")
    entry = {**run(args), "environment": env}
    ok = entry["shutdown"]["exit_code"] == 0 and not any(
        p["search"]["errors"] for p in entry["phases"].values())
    if args.no_save:
        print(json.dumps(entry, indent=1))
        return 0 if ok else 1
    path = RESULTS / "web_load_cpu.json"
    record: dict[str, Any] = {"kind": "web_load", "entries": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            record = old if old.get("kind") == "web_load" else record
        except ValueError:
            pass
    record["entries"][f"{entry['n_cells']}:{entry['label']}"] = entry
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    atomic_write_text(path.with_suffix(".md"), markdown(record))
    log(f"wrote {path} and {path.with_suffix('.md')}")
    print(markdown(record))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

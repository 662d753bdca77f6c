"""The HTTP service's counters and latency quantiles (``GET /metrics``). Split from
:mod:`scatlas.search.service` (issue 18)."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

import numpy as np

from ._batcher import MicroBatcher

LATENCY_WINDOW = 10_000
QUANTILES = (0.5, 0.9, 0.99)



class Metrics:
    """Request counts, error counts and latency windows per endpoint (event-loop thread only)."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self.window = window
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, deque[float]] = {}
        self.latency_sum: Counter[str] = Counter()

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        self.latency.setdefault(endpoint, deque(maxlen=self.window)).append(seconds)
        self.latency_sum[endpoint] += seconds

    def snapshot(self, batcher: MicroBatcher) -> dict[str, Any]:
        endpoints: dict[str, Any] = {}
        for (endpoint, status), n in sorted(self.requests.items()):
            e = endpoints.setdefault(endpoint, {"requests": 0, "errors": 0, "status": {}})
            e["requests"] += n
            e["status"][str(status)] = n
            if status >= 400:
                e["errors"] += n
        for endpoint, window in self.latency.items():
            lat = np.fromiter(window, dtype=np.float64)
            e = endpoints[endpoint]
            e["latency_ms"] = {f"p{round(q * 100)}": round(float(np.quantile(lat, q)) * 1e3, 3)
                               for q in QUANTILES}
            e["latency_ms"]["mean"] = round(float(lat.mean()) * 1e3, 3)
            e["latency_ms"]["window"] = int(lat.size)
        stats = batcher.stats
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": sum(self.requests.values()),
            "errors": sum(n for (_, s), n in self.requests.items() if s >= 400),
            "endpoints": endpoints,
            "batches": {
                "index_calls": stats.calls,
                "queries": stats.queries,
                "requests": stats.requests,
                "mean_queries_per_call": round(stats.queries / stats.calls, 3)
                if stats.calls else None,
                "busy_s": round(stats.busy_s, 6),
                "queries_per_call_hist": {f"<={b}": n for b, n in sorted(stats.size_hist.items())},
                "requests_per_call_hist": {
                    f"<={b}": n for b, n in sorted(stats.requests_hist.items())
                },
                "queue_depth": batcher.queue_depth,
                "in_flight": batcher.in_flight,
            },
        }

    def prometheus(self, batcher: MicroBatcher) -> str:
        lines = ["# TYPE scatlas_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'scatlas_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        lines.append("# TYPE scatlas_request_latency_seconds summary")
        for endpoint, window in sorted(self.latency.items()):
            lat = np.fromiter(window, dtype=np.float64)
            for q in QUANTILES:
                lines.append(f'scatlas_request_latency_seconds{{endpoint="{endpoint}",'
                             f'quantile="{q}"}} {float(np.quantile(lat, q)):.6g}')
            count = sum(n for (e, _), n in self.requests.items() if e == endpoint)
            lines.append(f'scatlas_request_latency_seconds_sum{{endpoint="{endpoint}"}} '
                         f"{self.latency_sum[endpoint]:.6g}")
            lines.append(f'scatlas_request_latency_seconds_count{{endpoint="{endpoint}"}} {count}')
        stats = batcher.stats
        lines.append("# TYPE scatlas_index_calls_total counter")
        lines.append(f"scatlas_index_calls_total {stats.calls}")
        lines.append("# TYPE scatlas_index_queries_total counter")
        lines.append(f"scatlas_index_queries_total {stats.queries}")
        lines.append("# TYPE scatlas_batch_queries histogram")
        cumulative = 0
        for bucket, n in sorted(stats.size_hist.items()):
            cumulative += n
            lines.append(f'scatlas_batch_queries_bucket{{le="{bucket}"}} {cumulative}')
        lines.append(f'scatlas_batch_queries_bucket{{le="+Inf"}} {stats.calls}')
        lines.append(f"scatlas_batch_queries_sum {stats.queries}")
        lines.append(f"scatlas_batch_queries_count {stats.calls}")
        lines.append("# TYPE scatlas_queue_depth gauge")
        lines.append(f"scatlas_queue_depth {batcher.queue_depth}")
        return "\n".join(lines) + "\n"

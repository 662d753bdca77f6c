"""Micro-batching of concurrent search requests into one index call (asyncio + one worker thread).

Each HTTP request hands its queries (an ``(m, d)`` float32 block) to :meth:`MicroBatcher.submit`
and awaits the answer. One background task collects pending requests: it waits at most
``max_wait_ms`` after the oldest pending request arrived (or until ``max_batch`` queries are
pending), then concatenates the requests that share a *group key* into one ``(sum m, d)`` block,
runs the search function once in a worker thread (so the event loop never blocks) and hands every
request its own rows back. Requests that arrive while a batch runs wait in the queue and form the
next batch at once when their deadline has passed, so under load batches fill up by themselves.

Grouping: the key is ``(k, nprobe, filter)`` exactly; only requests with identical search
parameters share a call. Serving mixed ``k`` with the largest ``k`` and trimming would be exact for
brute force and for IVF (the probed lists depend on ``nprobe`` only), but not for filtered searches
that over-fetch, so the simple, always-identical rule was chosen: every request gets exactly what
``index.search(its_queries, k, nprobe=..., filter=...)`` returns on its own (up to the last bits of
float rounding, which BLAS blocking may change with the batch size).

A failed group call is retried request by request, so one bad request cannot fail its neighbours;
each request then gets its own result or its own exception.

All index calls (batched searches and whatever else is sent through :meth:`run`) go through one
worker thread, so the index is never used from two threads at once.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..exceptions import BatcherClosedError, ScatlasInputError

__all__ = ["BatcherClosedError", "MicroBatcher"]




@dataclass
class _Pending:
    queries: np.ndarray  # (m, d) float32
    key: Hashable
    params: dict[str, Any]
    future: asyncio.Future
    enqueued: float  # loop.time() at submit

    @property
    def m(self) -> int:
        return int(self.queries.shape[0])


@dataclass
class BatchStats:
    """Counts of index calls made by the batcher (for ``/metrics``)."""

    calls: int = 0
    queries: int = 0
    requests: int = 0
    busy_s: float = 0.0
    #: queries per index call, bucketed by powers of two: bucket b counts calls with
    #: 2**(b-1) < size <= 2**b (bucket 0: size 1)
    size_hist: collections.Counter = field(default_factory=collections.Counter)
    #: requests per index call, same buckets
    requests_hist: collections.Counter = field(default_factory=collections.Counter)

    def record(self, n_queries: int, n_requests: int, seconds: float) -> None:
        self.calls += 1
        self.queries += n_queries
        self.requests += n_requests
        self.busy_s += seconds
        self.size_hist[_bucket(n_queries)] += 1
        self.requests_hist[_bucket(n_requests)] += 1


def _bucket(n: int) -> int:
    """Upper power-of-two bound of ``n`` (1, 2, 4, 8 ...)."""
    return 1 << max(0, int(n - 1).bit_length())


class MicroBatcher:
    """Collect concurrent searches into batched calls of ``search_fn``.

    ``search_fn(queries, **params) -> (distances, ids)`` with ``queries`` ``(m, d)`` float32 and
    both outputs ``(m, k)``. ``max_batch`` caps the queries per call (a single larger request is
    still served, alone); ``max_wait_ms`` is how long the oldest pending request may wait for
    company (0: take only what is already queued). Use from one event loop: :meth:`start` (or the
    first :meth:`submit`) binds it to the running loop, :meth:`close` drains and stops it.
    """

    def __init__(
        self,
        search_fn: Callable[..., tuple[np.ndarray, np.ndarray]],
        *,
        max_batch: int = 256,
        max_wait_ms: float = 2.0,
    ) -> None:
        if max_batch < 1:
            raise ScatlasInputError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ScatlasInputError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self._search = search_fn
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.stats = BatchStats()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: collections.deque[_Pending] = collections.deque()
        self._pending_queries = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._in_flight = 0  # requests submitted and not answered yet

    # ---------------------------------------------------------------------------------------
    # lifecycle
    # ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind to the running loop and start the collecting task (idempotent per loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task = loop.create_task(self._run(), name="scatlas-batcher")

    async def close(self) -> None:
        """Stop taking requests, answer every pending one, then stop the task.

        The worker thread stays usable for :meth:`run` until :meth:`shutdown_executor`.
        """
        self._closing = True
        if self._task is None or self._loop is not asyncio.get_running_loop():
            return
        assert self._wakeup is not None
        self._wakeup.set()
        await self._task

    def shutdown_executor(self) -> None:
        """Release the worker thread (after :meth:`close`; a later call starts a new one)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queue_depth(self) -> int:
        """Requests waiting to be batched."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet answered."""
        return self._in_flight

    # ---------------------------------------------------------------------------------------
    # requests
    # ---------------------------------------------------------------------------------------

    async def submit(
        self, queries: np.ndarray, *, key: Hashable, **params: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search ``queries`` (``(m, d)`` float32) with ``params``; requests with equal ``key``
        (which must identify ``params``) may share one call. Returns ``(distances, ids)``."""
        if self._closing:
            raise BatcherClosedError("the search service is shutting down")
        if self._loop is not asyncio.get_running_loop() or self._task is None or self._task.done():
            await self.start()
        assert self._loop is not None and self._wakeup is not None
        item = _Pending(queries, key, params, self._loop.create_future(), self._loop.time())
        self._pending.append(item)
        self._pending_queries += item.m
        self._in_flight += 1
        # wake the collector when it may be idle (first request) or the batch is full; the
        # batch window itself ends on a timer, so other arrivals cost no wake-up
        if len(self._pending) == 1 or self._pending_queries >= self.max_batch:
            self._wakeup.set()
        try:
            return await item.future
        finally:
            self._in_flight -= 1

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the index worker thread (serialised with searches)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scatlas-index")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # ---------------------------------------------------------------------------------------
    # the collecting task
    # ---------------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._loop is not None and self._wakeup is not None
        loop, wakeup = self._loop, self._wakeup
        while True:
            if not self._pending:
                if self._closing:
                    return
                wakeup.clear()
                await wakeup.wait()
                continue
            deadline = self._pending[0].enqueued + self.max_wait
            if (self._pending_queries < self.max_batch and not self._closing
                    and deadline > loop.time()):
                wakeup.clear()
                timer = loop.call_at(deadline, wakeup.set)
                try:
                    await wakeup.wait()  # the window ends, the batch fills, or close()
                finally:
                    timer.cancel()
                # no re-check of the clock: uvloop's millisecond timers may fire a little early,
                # and waiting again for the remainder would spin
            batch = self._take()
            try:
                await self._execute(batch)
            except Exception as err:  # noqa: BLE001 - never let the collecting task die
                for item in batch:
                    _settle(item.future, error=err)

    def _take(self) -> list[_Pending]:
        """Pop pending requests, oldest first, up to ``max_batch`` queries (at least one)."""
        batch = [self._pending.popleft()]
        n = batch[0].m
        while self._pending and n + self._pending[0].m <= self.max_batch:
            item = self._pending.popleft()
            batch.append(item)
            n += item.m
        self._pending_queries -= n
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        groups: dict[Hashable, list[_Pending]] = {}
        for item in batch:
            if item.future.done():  # cancelled: the client went away
                continue
            groups.setdefault(item.key, []).append(item)
        for items in groups.values():
            await self._execute_group(items)

    async def _execute_group(self, items: list[_Pending]) -> None:
        queries = (items[0].queries if len(items) == 1
                   else np.concatenate([it.queries for it in items], axis=0))
        try:
            distances, ids = await self._call(queries, items[0].params, len(items))
        except Exception as err:  # noqa: BLE001 - handed to the requests
            if len(items) == 1:
                _settle(items[0].future, error=err)
                return
            for item in items:  # find whose request failed; the others still get answers
                await self._execute_group([item])
            return
        start = 0
        for item in items:
            stop = start + item.m
            _settle(item.future, result=(distances[start:stop], ids[start:stop]))
            start = stop

    async def _call(
        self, queries: np.ndarray, params: dict[str, Any], n_requests: int
    ) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        distances, ids = await self.run(self._search, queries, **params)
        self.stats.record(queries.shape[0], n_requests, time.perf_counter() - t0)
        distances, ids = np.asarray(distances), np.asarray(ids)
        if distances.shape[0] != queries.shape[0] or ids.shape != distances.shape:
            raise RuntimeError(
                f"search returned shapes {distances.shape} / {ids.shape} for "
                f"{queries.shape[0]} queries"
            )
        return distances, ids


def _settle(future: asyncio.Future, *, result: Any = None, error: BaseException | None = None):
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

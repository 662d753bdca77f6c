"""The native IVF sharded over several devices (one GPU per shard; NumPy shards as the CPU twin).

Layout: ``n_shards`` :class:`~.ivf_native.NativeIVF` engines that share the SAME coarse
centroids (trained once on shard 0, copied to the others with ``set_centroids``). Shard ``j``
lives on GPU ``j % n_gpus`` (every allocation and call under ``cupy.cuda.Device``); on the CPU
all shards are NumPy (the twin that carries the tests). Every inverted list is split across the
shards round-robin by its rank within the list: the ``r``-th row of list ``l`` (in insertion
order) goes to shard ``r % n_shards``, so each shard holds ~1/n of every list and a query's
probed lists cost every shard the same work (faiss ``IndexShards`` splits the rows the same
way, in contiguous blocks of insertion order).

Search: the queries are copied to every shard's device, each shard runs the unsharded search
(same probed lists, since the centroids are equal), the per-shard top-k ``(keys, ids)`` come back
to shard 0's device and are merged by :func:`.smallest_k` on (key, id). Any global top-k hit is in
its own shard's top-k, so the merge returns exactly what one unsharded engine over all rows
returns (ties broken by the smaller id). Range search concatenates the per-shard hits of each
query and sorts them on (key, id), as the unsharded engine. On the GPU the shards run in one
thread each (CUDA calls release the GIL; the current device is per thread).

Persistence writes ONE unsharded layout (:meth:`to_native` gathers the shards into a NumPy
:class:`NativeIVF`, rows sorted by (list, id) -- the order an unsharded build produces -- and
reuses its ``save``), so an index saved from 4 GPUs loads on 1 GPU or on the CPU;
:meth:`from_native` re-shards a loaded unsharded engine over the devices at hand.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ... import backend
from ...exceptions import ScatlasInputError
from . import hits_per_query, smallest_k
from ._contract import EngineBase
from .ivf_native import NativeIVF, replayable

__all__ = ["ShardedNativeIVF", "gpu_count"]


def gpu_count() -> int:
    """Visible CUDA devices (0 without CuPy or a GPU)."""
    if not backend.gpu_available():
        return 0
    return int(backend.gpu_module().cuda.runtime.getDeviceCount())


class ShardedNativeIVF(EngineBase):
    """IVF-Flat over ``n_shards`` :class:`NativeIVF` shards; see the module docstring.

    Same engine interface as :class:`NativeIVF` (``name`` is ``"native-ivf"``: the saved form is
    the unsharded one).

    Peak device memory: per GPU, its shard's :class:`NativeIVF` figures (about 1/n_shards of
    the lists, the full (nlist, d) centroids, a search's score buffer per shard); shard 0's
    device also receives every shard's (m, k) keys and ids to merge. Saving gathers all shards
    into one NumPy engine (host memory: the whole index).
    """

    name = "native-ivf"

    def __init__(self, d: int, kind: str, nlist: int, device: str = "cpu", seed: int = 0,
                 n_shards: int = 2, parallel: bool | None = None, list_dtype: Any = "float32"):
        if n_shards < 1:
            raise ScatlasInputError(f"n_shards must be >= 1, got {n_shards}")
        if np.dtype(list_dtype).name == "int8":
            raise ScatlasInputError("list_dtype='int8' is not sharded yet; use n_shards=1 or "
                                    "list_dtype='float16'", param="list_dtype")
        self.d, self.kind, self.nlist, self.device, self.seed = d, kind, nlist, device, seed
        self.n_shards = int(n_shards)
        if device == "gpu":
            n_gpu = max(gpu_count(), 1)
            self.device_ids: list[int | None] = [j % n_gpu for j in range(self.n_shards)]
        else:
            self.device_ids = [None] * self.n_shards
        self.parallel = (device == "gpu") if parallel is None else bool(parallel)
        self._pool: ThreadPoolExecutor | None = None
        self.shards: list[NativeIVF] = []
        for j in range(self.n_shards):
            with self._on(j):
                self.shards.append(NativeIVF(d, kind, nlist, device, seed, list_dtype))

    @classmethod
    def create(cls, d: int, kind: str, nlist: int, *, device: str = "cpu",
               variant: str = "native-ivf", seed: int = 0, n_shards: int = 2,
               parallel: bool | None = None, list_dtype: Any = "float32") -> ShardedNativeIVF:
        return cls(d, kind, nlist, device, seed, n_shards, parallel, list_dtype)

    @property
    def list_dtype(self) -> np.dtype:
        """dtype of the stored list vectors (every shard's)."""
        return self.shards[0].list_dtype

    def bytes_per_cell(self) -> float:
        """A shard's figure (every shard stores its rows the same way)."""
        return self.shards[0].bytes_per_cell()

    # -- devices --------------------------------------------------------------------------------
    def _on(self, j: int):
        """Context making shard ``j``'s device current (nothing on the CPU)."""
        dev = self.device_ids[j]
        if dev is None:
            return contextlib.nullcontext()
        return backend.gpu_module().cuda.Device(dev)

    def _to(self, x: Any, j: int) -> Any:
        """``x`` on shard ``j``'s device (a no-op when it is already there).

        ``cupy.asarray`` under the target device copies from another GPU with an asynchronous
        peer copy on the target's stream, which orders nothing on the source device: the
        source's stream is synchronised first (its producer kernels done) and the target's
        after (so the source buffer may be freed and reused at once).
        """
        dst = self.device_ids[j]
        if dst is None:
            return backend.to_host(x)
        cp = backend.gpu_module()
        if isinstance(x, cp.ndarray) and x.device.id != dst:
            with x.device:
                x = cp.ascontiguousarray(x)
                cp.cuda.get_current_stream().synchronize()
            with cp.cuda.Device(dst):
                y = cp.asarray(x)
                cp.cuda.get_current_stream().synchronize()
            return y
        with cp.cuda.Device(dst):
            return cp.asarray(x)

    def _map(self, fn) -> list[Any]:
        """``[fn(j) for j in shards]``, each under its device; in threads when ``parallel``."""
        def run(j: int) -> Any:
            with self._on(j):
                return fn(j)

        if not self.parallel or self.n_shards == 1:
            return [run(j) for j in range(self.n_shards)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.n_shards,
                                            thread_name_prefix="scatlas-shard")
        return list(self._pool.map(run, range(self.n_shards)))

    # -- state ----------------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self.shards[0].is_trained

    @property
    def centroids(self) -> Any:
        """The shared (nlist, d) centroids (shard 0's copy)."""
        return self.shards[0].centroids

    @property
    def spherical(self) -> bool:
        return self.shards[0].spherical

    @spherical.setter
    def spherical(self, value: bool) -> None:
        for s in self.shards:
            s.spherical = bool(value)

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    @property
    def n_dead(self) -> int:
        return sum(s.n_dead for s in self.shards)

    def shard_sizes(self) -> list[int]:
        """Stored rows (live and tombstoned) per shard."""
        return [s.n_stored for s in self.shards]

    def set_centroids(self, C: Any) -> None:
        """Use given coarse centroids (nlist, d) on every shard."""
        C = backend.to_host(C) if self.device_ids[0] is None else C
        for j, s in enumerate(self.shards):
            with self._on(j):
                s.set_centroids(self._to(C, j))

    def train(self, sample: Any) -> None:
        """k-means on shard 0 (exactly as the unsharded engine), centroids copied to the rest."""
        with self._on(0):
            self.shards[0].train(self._to(sample, 0))
        spherical = self.shards[0].spherical
        for j in range(1, self.n_shards):
            with self._on(j):
                self.shards[j].set_centroids(self._to(self.shards[0].centroids, j))
                self.shards[j].spherical = spherical

    # -- adding ---------------------------------------------------------------------------------
    def _list_totals(self) -> np.ndarray:
        """Stored rows per list over all shards (host int64, nlist)."""
        tot = np.zeros(self.nlist, dtype=np.int64)
        for j, s in enumerate(self.shards):
            with self._on(j):
                tot += backend.to_host(s.list_counts())  # over its segments, no merging
        return tot

    def _route(self, X: Any, base: Any) -> tuple[Any, Any, Any]:
        """Labels, global ranks within the list (``base[list]`` + stable rank in the chunk) and
        target shards of a chunk's rows; computed on shard 0's device."""
        s0 = self.shards[0]
        lab = s0._assign(X)
        rank = NativeIVF._slots(lab, base)
        return lab, rank, rank % self.n_shards

    def bulk_add(self, make_chunks, reiterable: bool = True) -> None:
        """Two passes over ``make_chunks(record) -> iterator of (X, ids)``, as
        :meth:`NativeIVF.bulk_add`: pass 1 assigns (on shard 0's device) and counts, every shard
        allocates its lists once, pass 2 scatters each chunk's rows to their shard and slot."""
        if any(s.n_stored for s in self.shards):
            for X, ids in make_chunks(True):
                self.add(X, ids)
            return
        make_chunks = replayable(make_chunks, reiterable)

        n, nl = self.n_shards, self.nlist
        with self._on(0):
            xp = backend.array_module(self.shards[0].centroids)
            labels_all, counts = [], np.zeros(nl, dtype=np.int64)
            for X, _ in make_chunks(True):
                lab = self.shards[0]._assign(self._to(X, 0))
                labels_all.append(lab.astype(np.int32))
                counts += backend.to_host(xp.bincount(lab, minlength=nl))
            # rank r of list l goes to shard r % n: shard j holds ceil((count - j) / n) rows
            per_shard = [np.maximum(0, (counts - j + n - 1) // n) for j in range(n)]
            offs = np.zeros((n, nl + 1), dtype=np.int64)
            np.cumsum(np.stack(per_shard), axis=1, out=offs[:, 1:])
        for j, s in enumerate(self.shards):
            with self._on(j):
                sx = backend.array_module(s.centroids)
                m = int(offs[j, -1])
                s.vectors = sx.empty((m, self.d), dtype=s.list_dtype)
                s.ids = sx.empty(m, dtype=np.int64)
                s.dead = sx.zeros(m, dtype=bool)
                s.offsets = sx.asarray(offs[j])
                s.n_dead = 0
        with self._on(0):
            offs_d = xp.asarray(offs)
            fill = xp.zeros(nl, dtype=np.int64)
            for (X, ids), lab in zip(make_chunks(False), labels_all, strict=True):
                X = self._to(X, 0)
                ids = xp.asarray(ids, dtype=np.int64)
                lab = lab.astype(np.int64)
                rank = NativeIVF._slots(lab, fill)
                shard = rank % n
                pos = offs_d[shard, lab] + rank // n
                for j, s in enumerate(self.shards):
                    sel = xp.flatnonzero(shard == j)
                    if not sel.shape[0]:
                        continue
                    Xj, idj, pj = X[sel], ids[sel], pos[sel]
                    with self._on(j):
                        pj = self._to(pj, j)
                        s.vectors[pj] = self._to(Xj, j)
                        s.ids[pj] = self._to(idj, j)
                fill += xp.bincount(lab, minlength=nl)

    def add(self, X: Any, ids: Any) -> None:
        """Route each row to shard ``(rows stored in its list so far + its rank) % n`` and
        merge it there with :meth:`NativeIVF.add` (keeps every list balanced over shards)."""
        if X.shape[0] == 0:
            return
        with self._on(0):
            xp = backend.array_module(self.shards[0].centroids)
            X = self._to(X, 0)
            ids = xp.asarray(ids, dtype=np.int64)
            _, _, shard = self._route(X, xp.asarray(self._list_totals()))
            parts = [xp.flatnonzero(shard == j) for j in range(self.n_shards)]
            parts = [(X[sel], ids[sel]) if sel.shape[0] else None for sel in parts]

        def add_one(j: int) -> None:
            if parts[j] is not None:
                self.shards[j].add(self._to(parts[j][0], j), self._to(parts[j][1], j))

        self._map(add_one)

    # -- search ---------------------------------------------------------------------------------
    def _allowed_on(self, allowed: Any, j: int) -> Any:
        return None if allowed is None else self._to(allowed, j)

    def search(self, Q: Any, k: int, nprobe: int, allowed: Any = None) -> tuple[Any, Any]:
        allowed = None if allowed is None else backend.to_host(allowed)

        def one(j: int) -> tuple[Any, Any]:
            return self.shards[j].search(self._to(Q, j), k, nprobe,
                                         self._allowed_on(allowed, j))

        res = self._map(one)
        with self._on(0):
            xp = backend.array_module(self.shards[0].centroids)
            keys = xp.concatenate([self._to(kk, 0) for kk, _ in res], axis=1)
            ids = xp.concatenate([self._to(ii, 0) for _, ii in res], axis=1)
            return smallest_k(keys, ids, k)

    def range_search(self, Q: Any, max_key: float, nprobe: int, allowed: Any = None):
        allowed = None if allowed is None else backend.to_host(allowed)
        m = Q.shape[0]

        def one(j: int) -> tuple[Any, Any, np.ndarray]:
            res = self.shards[j].range_search(self._to(Q, j), max_key, nprobe,
                                              self._allowed_on(allowed, j))
            sx = backend.array_module(self.shards[j].centroids)
            lens = np.array([int(kk.shape[0]) for kk, _ in res], dtype=np.int64)
            return (sx.concatenate([kk for kk, _ in res]), sx.concatenate([ii for _, ii in res]),
                    lens)

        res = self._map(one)
        with self._on(0):
            xp = backend.array_module(self.shards[0].centroids)
            keys = xp.concatenate([self._to(kk, 0) for kk, _, _ in res])
            ids = xp.concatenate([self._to(ii, 0) for _, ii, _ in res])
            qidx = xp.asarray(np.concatenate([np.repeat(np.arange(m), lens)
                                              for _, _, lens in res]))
            return hits_per_query(qidx, keys, ids, m)

    # -- removal --------------------------------------------------------------------------------
    def remove(self, ids: Any) -> int:
        ids = backend.to_host(ids)
        return int(sum(self._map(lambda j: self.shards[j].remove(self._to(ids, j)))))

    def compact(self) -> None:
        """Drop tombstoned rows on every shard."""
        self._map(lambda j: self.shards[j].compact())

    # -- gathering and re-sharding --------------------------------------------------------------
    def to_native(self, device: str = "cpu") -> NativeIVF:
        """One unsharded :class:`NativeIVF` holding every row (tombstones kept), rows sorted by
        (list, id): the layout an unsharded build of the same rows has. Built on the host, then
        moved to ``device``."""
        lists, vecs, ids, dead = [], [], [], []
        for j, s in enumerate(self.shards):
            with self._on(j):
                lists.append(backend.to_host(s._list_of_rows()))
                vecs.append(backend.to_host(s.vectors))
                ids.append(backend.to_host(s.ids))
                dead.append(backend.to_host(s.dead))
        lst, all_ids = np.concatenate(lists), np.concatenate(ids)
        order = np.lexsort((all_ids, lst))
        offsets = np.zeros(self.nlist + 1, dtype=np.int64)
        np.cumsum(np.bincount(lst, minlength=self.nlist), out=offsets[1:])
        eng = NativeIVF(self.d, self.kind, self.nlist, "cpu", self.seed)
        eng.set_centroids(backend.to_host(self.centroids))
        eng.spherical = self.spherical
        eng.vectors = np.ascontiguousarray(np.concatenate(vecs)[order])
        eng.ids, eng.offsets = all_ids[order], offsets
        eng.dead = np.concatenate(dead)[order]
        eng.n_dead = int(eng.dead.sum())
        if device == "cpu":
            return eng
        xp = backend.gpu_module()
        out = NativeIVF(self.d, self.kind, self.nlist, device, self.seed)
        out.set_centroids(eng.centroids)
        out.spherical, out.n_dead = eng.spherical, eng.n_dead
        out.vectors, out.ids = xp.asarray(eng.vectors), xp.asarray(eng.ids)
        out.offsets, out.dead = xp.asarray(eng.offsets), xp.asarray(eng.dead)
        return out

    @classmethod
    def from_native(cls, eng: NativeIVF, n_shards: int, device: str = "cpu",
                    parallel: bool | None = None) -> ShardedNativeIVF:
        """Split an unsharded engine (any device) into ``n_shards`` shards on ``device``: row
        ``r`` of each list goes to shard ``r % n_shards``."""
        out = cls(eng.d, eng.kind, eng.nlist, device, eng.seed, n_shards, parallel,
                  eng.list_dtype)
        offsets = backend.to_host(eng.offsets)
        vectors, ids = backend.to_host(eng.vectors), backend.to_host(eng.ids)
        dead = backend.to_host(eng.dead)
        n = ids.shape[0]
        lst = np.searchsorted(offsets[1:], np.arange(n), side="right")
        shard = (np.arange(n) - offsets[lst]) % n_shards
        C = backend.to_host(eng.centroids)
        for j, s in enumerate(out.shards):
            sel = np.flatnonzero(shard == j)
            off = np.zeros(eng.nlist + 1, dtype=np.int64)
            np.cumsum(np.bincount(lst[sel], minlength=eng.nlist), out=off[1:])
            with out._on(j):
                s.set_centroids(out._to(C, j))
                s.spherical = bool(eng.spherical)
                s.vectors = out._to(np.ascontiguousarray(vectors[sel]), j)
                s.ids, s.dead = out._to(ids[sel], j), out._to(dead[sel], j)
                s.offsets = out._to(off, j)
                s.n_dead = int(dead[sel].sum())
        return out

    # -- persistence ----------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"spherical": self.spherical, "n_dead": self.n_dead, "n_shards": self.n_shards,
                "list_dtype": self.list_dtype.name}

    def save(self, folder: Path) -> list[str]:
        """The unsharded layout (:meth:`to_native` + :meth:`NativeIVF.save`)."""
        return self.to_native("cpu").save(folder)

    @classmethod
    def load(cls, folder: Path, meta: dict[str, Any], device: str,
             n_shards: int | None = None) -> ShardedNativeIVF:
        """Read the unsharded files on the host and shard them over ``n_shards`` (default: the
        visible GPUs on the GPU, else the shard count recorded at save, else 2)."""
        if n_shards is None:
            saved = int(meta.get("engine_meta", {}).get("n_shards", 2))
            n_shards = max(gpu_count(), 1) if device == "gpu" else max(saved, 1)
        return cls.from_native(NativeIVF.load(folder, meta, "cpu"), n_shards, device)

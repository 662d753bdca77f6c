"""faiss IVF engines: ``IndexIVFFlat`` / ``IndexIVFPQ`` on the CPU, ``GpuIndexIVFFlat`` on GPUs.

Built as ``faiss.IndexIVFFlat(IndexFlatIP | IndexFlatL2, d, nlist, metric)`` (or ``IndexIVFPQ``
with ``d / 4`` sub-quantizers of 8 bits: 32 bytes per 128-d vector), trained with faiss' k-means
(``niter = 10``, seeded) on the training sample, filled with ``add_with_ids`` chunk by chunk
(faiss stores the inverted lists itself, so no second full copy is made).

Filters: on the CPU a packed bitmap over ids (``IDSelectorBitmap``) in ``SearchParametersIVF``,
so filtered searches are exact within the probed lists and need no over-fetch. GPU indexes take
no selector: there the search over-fetches (4 k, then 16 k, ... up to 2048) and post-filters.

GPU (faiss built with GPU support, e.g. Meta's ``faiss-gpu`` wheel; ../shared/reference/
search_gpu.md 1, 2, 7): the trained CPU index is cloned with ``index_cpu_to_gpu``; with several
GPUs ``index_cpu_to_all_gpus`` with ``shard=True`` and a common quantizer (``IndexShardsIVF``),
so each GPU holds 1/n of the lists. Saving goes through ``index_gpu_to_cpu`` (faiss cannot write
GPU indexes), loading clones back onto the GPUs. Removal on the GPU round-trips via the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ... import backend
from . import faiss_gpu_available, faiss_module, mismatch, smallest_k
from ._contract import EngineBase

GPU_MAX_K = 2048  # classic GPU faiss: k and nprobe <= 2048


def _host32(X: Any) -> np.ndarray:
    return np.ascontiguousarray(backend.to_host(X), dtype=np.float32)


def _pq_m(d: int) -> int:
    """Sub-quantizers for IVF-PQ: d/4 (32 bytes at d=128), reduced to a divisor of d."""
    m = max(1, d // 4)
    while d % m:
        m -= 1
    return m


class FaissIVF(EngineBase):
    """faiss IVF-Flat / IVF-PQ (CPU) or GPU IVF-Flat behind the engine interface.

    Peak device memory (faiss-gpu only; on the CPU the figures are host memory): the lists, n
    (4 d + 8) bytes for IVF-Flat (IVF-PQ: n (32 + 8) at d = 128) plus the (nlist, d) centroids,
    spread over the GPUs when sharded; the trained CPU index is kept beside the GPU clone (host
    memory: the same lists again), and faiss's own scratch memory per GPU
    (``StandardGpuResources``). Adding goes chunk by chunk (no second copy of the lists);
    removal on the GPU round-trips through the CPU index.
    """

    def __init__(self, index: Any, d: int, kind: str, nlist: int, variant: str, device: str):
        self.index = index  # the CPU index (trained, with the lists) unless on the GPU
        self.d, self.kind, self.nlist, self.name, self.device = d, kind, nlist, variant, device
        self._gpu = None  # the GPU clone (faiss-gpu) when device == "gpu"
        self._gpu_res: list[Any] = []

    @classmethod
    def create(cls, d: int, kind: str, nlist: int, *, device: str = "cpu",
               variant: str = "faiss-ivf", seed: int = 0) -> FaissIVF:
        faiss = faiss_module()
        metric = faiss.METRIC_INNER_PRODUCT if kind == "ip" else faiss.METRIC_L2
        quantizer = faiss.IndexFlatIP(d) if kind == "ip" else faiss.IndexFlatL2(d)
        if variant == "faiss-ivfpq":
            index = faiss.IndexIVFPQ(quantizer, d, nlist, _pq_m(d), 8, metric)
        else:
            index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
        index.cp.seed = int(seed)
        eng = cls(index, d, kind, nlist, variant, "gpu" if variant == "faiss-gpu" else "cpu")
        eng._quantizer = quantizer
        return eng

    # -- GPU ------------------------------------------------------------------------------------
    def _to_gpu(self) -> None:
        faiss = faiss_module()
        ngpu = faiss.get_num_gpus()
        if ngpu > 1:  # shard the lists over all GPUs, one common coarse quantizer
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True
            co.common_ivf_quantizer = True
            self._gpu = faiss.index_cpu_to_all_gpus(self.index, co=co)
        else:
            res = faiss.StandardGpuResources()
            self._gpu_res.append(res)
            self._gpu = faiss.index_cpu_to_gpu(res, 0, self.index)

    def _cpu_index(self) -> Any:
        """The CPU form holding every list (copied back from the GPU when there)."""
        if self._gpu is not None:
            faiss = faiss_module()
            self.index = faiss.index_gpu_to_cpu(self._gpu)
        return self.index

    @property
    def _live(self) -> Any:
        return self._gpu if self._gpu is not None else self.index

    # -- interface ------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self._live.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._live.is_trained)

    def train(self, sample: Any) -> None:
        self.index.train(_host32(sample))
        if self.device == "gpu":
            self._to_gpu()

    def add(self, X: Any, ids: Any) -> None:
        self._live.add_with_ids(_host32(X), np.ascontiguousarray(backend.to_host(ids),
                                                                 dtype=np.int64))

    def _params(self, nprobe: int, sel: Any = None) -> Any:
        """``SearchParametersIVF``; without a selector the one per ``nprobe`` is reused (a
        single query's search takes ~0.1 ms: building it each time was a visible share)."""
        cache = self.__dict__.setdefault("_param_cache", {})
        if sel is None and nprobe in cache:
            return cache[nprobe]
        faiss = faiss_module()
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe)
        if sel is not None:
            params.sel = sel
        else:
            cache[nprobe] = params
        return params

    def _selector(self, allowed: Any) -> tuple[Any, Any]:
        faiss = faiss_module()
        bits = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
        return faiss.IDSelectorBitmap(int(allowed.shape[0]), faiss.swig_ptr(bits)), bits

    def _keys(self, D: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """faiss's distances as keys (``-q.x`` for ip), +inf where no hit; float32, in place
        when ``D`` is float32 (faiss's own output)."""
        writable = D.dtype == np.float32 and D.flags.writeable
        keys = D if writable else np.array(D, dtype=np.float32)
        if self.kind == "ip":
            np.negative(keys, out=keys)
        keys[ids < 0] = np.inf
        return keys

    def search(self, Q: Any, k: int, nprobe: int, allowed: Any = None) -> tuple[Any, Any]:
        q = _host32(Q)
        if self._gpu is not None:
            return self._search_gpu(q, k, nprobe, allowed)
        sel, bits = self._selector(allowed) if allowed is not None else (None, None)
        D, ids = self.index.search(q, int(k), params=self._params(nprobe, sel))
        del bits
        keys, ids = self._keys(D, ids), ids.astype(np.int64, copy=False)
        if not (keys[:, 1:] == keys[:, :-1]).any():  # faiss sorts by key: no ties, in order
            return keys, ids
        return smallest_k(keys, ids, k)  # ties: ordered by the smaller id

    def _search_gpu(self, q: np.ndarray, k: int, nprobe: int, allowed: Any) -> tuple[Any, Any]:
        faiss = faiss_module()
        faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", int(nprobe))
        kk = k if allowed is None else min(GPU_MAX_K, 4 * k)
        while True:
            D, ids = self._gpu.search(q, kk)
            ids = ids.astype(np.int64)
            keys = self._keys(D, ids)
            if allowed is None:
                return smallest_k(keys, ids, k)
            ok = (ids >= 0) & allowed[np.clip(ids, 0, allowed.shape[0] - 1)]
            enough = ok.sum(axis=1) >= k
            exhausted = (ids < 0).any(axis=1)  # fewer than kk hits in the probed lists
            if kk >= GPU_MAX_K or bool((enough | exhausted).all()):
                keys = np.where(ok, keys, np.inf)
                return smallest_k(keys, np.where(ok, ids, -1), k)
            kk = min(GPU_MAX_K, 4 * kk)

    def range_search(self, Q: Any, max_key: float, nprobe: int, allowed: Any = None):
        q = _host32(Q)
        index = self._cpu_index()  # GPU IVF has no range search; use the CPU form
        margin = 1e-4 * (1.0 + abs(float(max_key)))
        radius = -(max_key + margin) if self.kind == "ip" else max_key + margin
        sel, bits = self._selector(allowed) if allowed is not None else (None, None)
        lims, D, ids = index.range_search(q, float(radius), params=self._params(nprobe, sel))
        del bits
        out = []
        for i in range(q.shape[0]):
            kk = self._keys(D[lims[i] : lims[i + 1]], ids[lims[i] : lims[i + 1]])
            ii = ids[lims[i] : lims[i + 1]].astype(np.int64)
            keep = kk <= max_key
            kk, ii = kk[keep], ii[keep]
            o = np.lexsort((ii, kk))
            out.append((kk[o], ii[o]))
        return out

    def remove(self, ids: Any) -> int:
        faiss = faiss_module()
        arr = np.ascontiguousarray(backend.to_host(ids), dtype=np.int64)
        index = self._cpu_index()
        n = int(index.remove_ids(faiss.IDSelectorBatch(arr.size, faiss.swig_ptr(arr))))
        if self._gpu is not None:
            self._to_gpu()
        return n

    def bytes_per_cell(self) -> float:
        """IVF-Flat: 4 d + 8 (float32 vector, int64 id); IVF-PQ: m + 8 (m one-byte codes)."""
        if self.name == "faiss-ivfpq":
            return float(_pq_m(self.d)) + 8.0
        return 4.0 * self.d + 8.0

    def meta(self) -> dict[str, Any]:
        return {"faiss_class": type(self._cpu_index_for_meta()).__name__}

    def _cpu_index_for_meta(self) -> Any:
        return self.index

    def save(self, folder: Path) -> list[str]:
        faiss = faiss_module()
        faiss.write_index(self._cpu_index(), str(folder / "index.faiss"))
        return ["index.faiss"]

    @classmethod
    def load(cls, folder: Path, meta: dict[str, Any], device: str) -> FaissIVF:
        faiss = faiss_module()
        index = faiss.read_index(str(folder / "index.faiss"))
        ivf = faiss.extract_index_ivf(index)
        if index.d != int(meta["dim"]):
            raise mismatch(folder, "dimension", index.d, meta["dim"])
        variant = meta["engine"]
        on_gpu = device == "gpu" and faiss_gpu_available()
        if variant == "faiss-gpu" and not on_gpu:
            variant = "faiss-ivf"
        elif variant == "faiss-ivf" and on_gpu:  # IVF-PQ stays on the CPU
            variant = "faiss-gpu"
        eng = cls(index, int(index.d), meta["kind"], int(ivf.nlist), variant,
                  "gpu" if variant == "faiss-gpu" else "cpu")
        if eng.name == "faiss-gpu":
            eng._to_gpu()
        return eng

"""CPU threads: BLAS threads never multiply with scatlas's own pools (issue 15, item 6).

Each test reads the BLAS thread limit with threadpoolctl *inside* the pool's worker threads and
checks ``pool workers x BLAS threads <= budget``. The budget is set explicitly (a 2-thread BLAS
limit and ``SCATLAS_NUM_THREADS=2``) so the tests mean the same on a 1-core CI runner as on a
workstation. No timings are asserted.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.sparse as sp

threadpoolctl = pytest.importorskip("threadpoolctl")

from scatlas import backend, datasets  # noqa: E402
from scatlas.kernels import _operator, nmf, nnls  # noqa: E402

BUDGET = 2


def _blas_now() -> int:
    n = backend.blas_threads()
    if n is None:
        pytest.skip("no BLAS library that threadpoolctl can inspect")
    return n


@pytest.fixture
def two_thread_budget(monkeypatch):
    """A user budget of two threads: BLAS allowed 2 threads, scatlas pools 2 workers."""
    monkeypatch.setenv(backend.THREADS_ENV, str(BUDGET))
    with threadpoolctl.threadpool_limits(limits=BUDGET, user_api="blas"):
        if _blas_now() != BUDGET:
            pytest.skip("this BLAS cannot be set to two threads")
        yield


class _RecordingPool:
    """Wraps a pool's ``map``: records the BLAS limit each task sees while it runs (after the
    task's own setup: ``fn`` is called with a recorder to call from inside)."""

    def __init__(self, pool):
        self.pool, self.seen, self.lock = pool, [], threading.Lock()

    def record(self) -> None:
        n = backend.blas_threads()
        with self.lock:
            self.seen.append((threading.get_ident(), n))

    def map(self, fn, items):
        return self.pool.map(fn, items)

    def shutdown(self, wait=True):
        self.pool.shutdown(wait=wait)


class _RecordingBlock:
    """A CSR row block whose products record the BLAS limit of the thread computing them."""

    def __init__(self, sub, rec):
        self.sub, self.rec = sub, rec

    def __matmul__(self, other):
        self.rec.record()
        return self.sub @ other

    @property
    def T(self):
        return _RecordingBlock(self.sub.T, self.rec)


def _csr(n=4000, p=300, seed=0):
    return sp.random(n, p, density=0.05, format="csr", dtype=np.float64,
                     random_state=np.random.default_rng(seed))


def test_operator_pool_runs_with_serial_blas(two_thread_budget, monkeypatch):
    monkeypatch.setattr(_operator, "_THREAD_MIN_NNZ", 0)
    X = _csr()
    op = _operator.ShiftedOperator(X, col_shift=np.asarray(X.mean(axis=0)).ravel())
    assert op._pool is not None  # the pooled path is what this test is about
    rec = _RecordingPool(op._pool)
    op._pool = rec
    op._blocks = [(lo, hi, _RecordingBlock(sub, rec)) for lo, hi, sub in op._blocks]
    V = np.random.default_rng(1).standard_normal((X.shape[1], 5))
    Q = np.random.default_rng(2).standard_normal((X.shape[0], 5))
    Y, Z = op.matmat(V), op.rmatmat(Q)
    op.close()
    workers = len(op._blocks)
    assert rec.seen and workers >= 2
    assert workers * max(n for _, n in rec.seen) <= BUDGET, rec.seen
    # and the products are still right (float64: both sides agree to rounding)
    Xc = X.toarray() - np.asarray(X.mean(axis=0))
    np.testing.assert_allclose(Y, Xc @ V, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(Z, Xc.T @ Q, rtol=1e-10, atol=1e-10)
    assert _blas_now() == BUDGET  # limit restored after the pooled section


def test_inmf_data_pool_runs_with_serial_blas(two_thread_budget, monkeypatch):
    monkeypatch.setattr(nmf, "_PAR_NNZ", 0)
    X = _csr(seed=3)
    data = nmf._Data(X, np.dtype(np.float64))
    assert len(data.blocks) == BUDGET
    seen = []
    real = nnls.executor

    def recording_executor(n):
        rec = _RecordingPool(real(n))
        seen.append(rec)
        return rec

    monkeypatch.setattr(nmf, "executor", recording_executor)
    rec_blocks = _RecordingPool(None)
    seen.append(rec_blocks)
    data.blocks = [(a, b, _RecordingBlock(sub, rec_blocks)) for a, b, sub in data.blocks]
    L = np.random.default_rng(4).random((X.shape[1], 4))
    H = np.random.default_rng(5).random((X.shape[0], 4))
    np.testing.assert_allclose(data.times(L), X @ L, rtol=1e-10)
    np.testing.assert_allclose(data.t_times(H), X.T @ H, rtol=1e-10)
    counts = [n for rec in seen for _, n in rec.seen]
    assert counts and len(data.blocks) * max(counts) <= BUDGET, counts
    assert _blas_now() == BUDGET


def test_cpu_threads_follows_the_blas_limit(monkeypatch):
    monkeypatch.delenv(backend.THREADS_ENV, raising=False)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        if _blas_now() != 1:
            pytest.skip("this BLAS cannot be limited")
        assert backend.cpu_threads() == 1  # OPENBLAS_NUM_THREADS=1 also makes our pools serial
    monkeypatch.setenv(backend.THREADS_ENV, "3")
    assert backend.cpu_threads() == 3
    monkeypatch.setenv(backend.THREADS_ENV, "0")
    with pytest.raises(ValueError, match="SCATLAS_NUM_THREADS"):
        backend.cpu_threads()


def test_serial_blas_held_from_two_threads(two_thread_budget):
    """OpenBLAS (pthreads) has one process-wide limit that threadpoolctl >= 3.8 lets only one
    thread change: a section opened in thread A, then one in the main thread, closed in that
    order, must still restore the user's limit (the last to leave is not the controlling
    thread)."""
    entered, release, done = threading.Event(), threading.Event(), threading.Event()

    def holder():
        with backend.serial_blas():
            entered.set()
            release.wait(30)
        done.set()

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(30)
    with backend.serial_blas():
        assert _blas_now() == 1
        release.set()
        assert done.wait(30)
        assert _blas_now() == 1  # one holder left
    t.join()
    assert _blas_now() == BUDGET
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert _blas_now() == 1  # no thread was left in control: the main thread can limit
    assert _blas_now() == BUDGET


def test_synthetic_restores_the_blas_limit(two_thread_budget):
    """Block threads used to set and restore the limit from whichever worker came first/last;
    under threadpoolctl 3.8 the restore was silently ignored and BLAS stayed at one thread."""
    datasets.synthetic(2 * datasets.BLOCK_SIZE + 10, 50, n_jobs=2, seed=0)
    assert _blas_now() == BUDGET


def test_lapack_runs_serial(two_thread_budget, monkeypatch):
    import scipy.linalg

    from scatlas.kernels import linalg

    seen = []
    real = scipy.linalg.eigh

    def eigh(*args, **kwargs):
        seen.append(backend.blas_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", eigh)
    A = np.random.default_rng(6).standard_normal((60, 40))
    evals, _ = linalg.top_eigh(A.T @ A, 5)
    assert seen == [1]
    # against the dense SVD: eigenvalues of A^T A are the squared singular values (float64,
    # relative error ~ m eps kappa, far below 1e-8 for this well-conditioned matrix)
    np.testing.assert_allclose(evals, np.linalg.svd(A, compute_uv=False)[:5] ** 2, rtol=1e-8)
    assert _blas_now() == BUDGET

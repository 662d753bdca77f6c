"""The sparse training step (CSR batches, XLA custom calls) against the dense formulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

import scatlas
from scatlas import datasets
from scatlas._validate import ScatlasInputError
from scatlas.models import sparse_ops, xla_ffi
from scatlas.models.data import CellBatches, csr_arrays, csr_capacity
from scatlas.models.metric import MetricConfig, MetricTask, use_sparse_step
from scatlas.models.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not xla_ffi.available(),
                                reason="sparse XLA custom calls unavailable here (numba, pthreads, "
                                "or an untested JAX: scatlas.models.xla_ffi.enabled())")


def _csr(X: sp.csr_matrix, pad: int = 0) -> sparse_ops.CSR:
    arrays = csr_arrays(X, capacity=X.nnz + pad)
    return sparse_ops.CSR(*(jnp.asarray(arrays[k]) for k in ("x_indptr", "x_indices", "x_data")))


def _random_csr(n: int, G: int, seed: int, density: float = 0.1) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = sp.random(n, G, density=density, format="csr", dtype=np.float32, random_state=rng)
    X.data = np.log1p(10 * X.data).astype(np.float32)
    X.data[::7] = 0  # explicit zeros, as dropout leaves them
    return X


def test_custom_calls_equal_scipy():
    """X @ B, X.T @ D and X densely (with padding past indptr[-1] and explicit zeros)."""
    X = _random_csr(37, 211, seed=0)
    rng = np.random.default_rng(1)
    B = rng.normal(size=(211, 19)).astype(np.float32)
    D = rng.normal(size=(37, 23)).astype(np.float32)
    arrays = csr_arrays(X, capacity=X.nnz + 50)
    arrays["x_data"][X.nnz:] = 5.0  # padding must be ignored whatever it holds
    csr = [jnp.asarray(arrays[k]) for k in ("x_indptr", "x_indices", "x_data")]
    got = jax.jit(xla_ffi.csr_matmul)(*csr, jnp.asarray(B))
    np.testing.assert_allclose(np.asarray(got), X @ B, rtol=1e-5, atol=1e-5)
    got_t = jax.jit(xla_ffi.csr_t_matmul, static_argnums=4)(*csr, jnp.asarray(D), 211)
    np.testing.assert_allclose(np.asarray(got_t), X.T @ D, rtol=1e-5, atol=1e-5)
    densify = jax.jit(xla_ffi.csr_to_dense, static_argnums=3)
    np.testing.assert_array_equal(np.asarray(densify(*csr, 211)), X.toarray())
    # repeated (row, column) entries are summed, as scipy sums them
    indptr, indices = np.array([0, 3, 4], np.int32), np.array([2, 2, 0, 1], np.int32)
    data = np.array([1.5, 2.0, 3.0, 4.0], np.float32)
    want = sp.csr_matrix((data, indices, indptr), shape=(2, 3)).toarray()
    got = densify(jnp.asarray(indptr), jnp.asarray(indices), jnp.asarray(data), 3)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_csr_matmul_gradient_equals_dense():
    X = _random_csr(30, 120, seed=2)
    B = jnp.asarray(np.random.default_rng(3).normal(size=(120, 9)).astype(np.float32))
    Xd = jnp.asarray(X.toarray())
    csr = _csr(X, pad=11)
    want = jax.grad(lambda B: jnp.sum(jnp.sin(Xd @ B)))(B)
    got = jax.jit(jax.grad(lambda B: jnp.sum(jnp.sin(sparse_ops.csr_matmul(csr, B)))))(B)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_csr_dropout_matches_dense_dropout_statistics():
    X = _random_csr(200, 500, seed=6, density=0.2)
    X.eliminate_zeros()
    csr = _csr(X, pad=100)
    out = sparse_ops.dropout(csr, 0.4, jax.random.PRNGKey(0))
    data, kept = np.asarray(out.data)[: X.nnz], np.asarray(out.data)[: X.nnz] != 0
    assert abs(kept.mean() - 0.6) < 0.01  # each stored entry kept with probability 0.6
    np.testing.assert_allclose(data[kept], X.data[kept] / 0.6, rtol=1e-6)
    assert sparse_ops.dropout(csr, 0.0, jax.random.PRNGKey(0)) is csr


def test_capacity_buckets():
    for nnz in (0, 1, 1024, 1025, 5000, 2_800_000, 10**9):
        cap = csr_capacity(nnz)
        assert cap >= max(nnz, 1024) and cap <= 1.125 * max(nnz, 1024)
    assert len({csr_capacity(n) for n in range(2_700_000, 2_800_000, 1000)}) <= 2
    with pytest.raises(ValueError, match="capacity"):
        csr_arrays(sp.identity(5, format="csr"), capacity=3)


def test_sparse_batches_hold_the_dense_batches():
    a = datasets.synthetic(300, 80, n_batches=2, n_cell_types=3, seed=1)
    kw = dict(labels=a.obs["cell_type"].to_numpy(), batch_size=64, seed=3)
    dense, csr = CellBatches(a.X, **kw), CellBatches(a.X, sparse=True, **kw)
    for t in (0, 5):
        d, s = dense.batch(t), csr.batch(t)
        n = s["x_indptr"][-1]
        X = sp.csr_matrix((s["x_data"][:n], s["x_indices"][:n], s["x_indptr"]), shape=d["x"].shape)
        np.testing.assert_allclose(X.toarray(), d["x"], rtol=1e-6)
        assert np.array_equal(s["label"], d["label"]) and np.array_equal(s["index"], d["index"])
    assert 0 < csr.density() < 1


@pytest.mark.parametrize("train", [True, False])
def test_sparse_step_equals_dense_step(train):
    """Without dropout the whole loss (triplet + MSE + L1) and every gradient agree."""
    n, G = 64, 700
    X = _random_csr(n, G, seed=7)
    rng = np.random.default_rng(8)
    meta = {"label": rng.integers(0, 4, n).astype(np.int32),
            "study": rng.integers(0, 2, n).astype(np.int32)}
    cfg = MetricConfig(n_genes=G, hidden=(48, 40), latent_dim=16, dropout=0.0,
                       input_dropout=0.0)
    tcfg = TrainConfig(max_steps=10, data_parallel=False)
    task = MetricTask(cfg, tcfg, np.eye(4, dtype=bool))
    dense_batch = {"x": X.toarray(), **meta}
    sparse_batch = {**csr_arrays(X), **meta}
    ts = Trainer(task, tcfg).init_state(dense_batch)

    def loss_and_grads(batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        fn = jax.jit(jax.value_and_grad(task.loss, has_aux=True), static_argnums=5)
        (loss, (metrics, state)), grads = fn(ts.params, ts.state, batch, jax.random.PRNGKey(1),
                                             ts.step, train)
        return loss, metrics, state, grads

    want, got = loss_and_grads(dense_batch), loss_and_grads(sparse_batch)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1]["mse"], want[1]["mse"], rtol=1e-5)
    for g, w in zip(jax.tree_util.tree_leaves((got[2], got[3])),
                    jax.tree_util.tree_leaves((want[2], want[3])), strict=True):
        # biases feeding BatchNorm have zero gradient up to rounding (~1e-8): an absolute floor
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * float(np.abs(w).max()) + 1e-7)


def test_train_metric_sparse_step_learns_as_the_dense_step():
    """Same data, steps and seed: the sparse run's loss curve and embedding quality follow the
    dense run's (their dropout draws differ, so not bit for bit)."""
    a = datasets.synthetic(600, 120, n_batches=2, n_cell_types=3, seed=0)
    kw = dict(max_steps=100, batch_size=100, hidden=(32,), latent_dim=8, progress=False)
    sparse = scatlas.tl.train_metric(a, "cell_type", "batch", sparse_step=True, **kw)
    # the same network on the genes (the auto preset's PCA input trains on the dense step only)
    auto = scatlas.tl.train_metric(a, "cell_type", "batch", input_pcs=None, **kw)
    assert sparse.info["sparse_step"] is True
    assert auto.info["sparse_step"] is False  # 120 genes: the dense step pays
    from sklearn.neighbors import KNeighborsClassifier

    labels = a.obs["cell_type"].to_numpy()
    acc, mse = {}, {}
    for name, model in (("sparse", sparse), ("dense", auto)):
        Z = model.embed(a)
        acc[name] = KNeighborsClassifier(5).fit(Z[::2], labels[::2]).score(Z[1::2], labels[1::2])
        mse[name] = [h["mse"] for h in model.history if "mse" in h]
    assert mse["sparse"][-1] < 0.8 * mse["sparse"][0]
    np.testing.assert_allclose(mse["sparse"], mse["dense"], rtol=0.02)
    assert abs(acc["sparse"] - acc["dense"]) < 0.1


def test_use_sparse_step_rules():
    big = MetricConfig(n_genes=20_000)
    assert use_sparse_step(None, big, 1, density=0.08)
    assert not use_sparse_step(None, big, 1, density=0.4)  # dense inputs: the dense step pays
    assert use_sparse_step(None, MetricConfig(n_genes=2000), 1, density=0.1)
    assert use_sparse_step(None, MetricConfig(n_genes=1000), 1, density=0.3)  # both bounds in
    assert not use_sparse_step(None, MetricConfig(n_genes=999), 1, density=0.05)
    assert not use_sparse_step(None, MetricConfig(n_genes=1000), 1, density=0.31)
    assert not use_sparse_step(False, big, 1)
    assert use_sparse_step(True, MetricConfig(n_genes=50), 1)
    with pytest.raises(ScatlasInputError, match="one device"):
        use_sparse_step(True, big, 2)
    with pytest.raises(ScatlasInputError, match="float32"):
        use_sparse_step(True, MetricConfig(n_genes=50, bf16=True), 1)
    assert not use_sparse_step(None, big, 2, density=0.05)


def test_cli_sparse_step_option(tmp_path):
    from scatlas import cli
    from scatlas.models import load

    data = tmp_path / "atlas.h5ad"
    datasets.write_synthetic_h5ad(data, 200, 40, n_batches=2, seed=0)
    for choice, expect in (("on", True), ("off", False)):
        out = tmp_path / choice
        assert cli.main(["train", "metric", str(data), "--out", str(out), "--label-key",
                         "cell_type", "--max-steps", "5", "--batch-size", "50", "--hidden", "16",
                         "--latent-dim", "4", "--sparse-step", choice]) == 0
        assert load(out).info["sparse_step"] is expect

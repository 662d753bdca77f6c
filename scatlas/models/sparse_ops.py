"""Differentiable products with a sparse expression batch, for training on the CPU.

A batch of expression profiles is ~90 % zeros, yet a dense training step multiplies it densely
twice in the first layer (``X @ W1`` and the weight gradient ``X.T @ dH``) and three times more
in the reconstruction loss (the decoder's output ``H @ W + b``, its weight gradient and its input
gradient, each (B, hidden) x (hidden, n_genes)). Keeping the batch in CSR form:

- :func:`csr_matmul` is ``X @ B`` over the non-zeros, with ``dB = X.T @ dY`` as its gradient
  (both :mod:`scatlas.kernels.xla_ffi` custom calls); inputs get no gradient;
- :func:`reconstruction_mse` is ``mean((H W^T + b - X) ** 2)`` for the decoder's gene-major output
  kernel W (n_genes, hidden) without forming ``H W^T``: expanding the square,
  ``sum((H W^T + b)^2) = <H^T H, W^T W> + 2 (W H^T 1) . b + B |b|^2`` and
  ``<H W^T + b, X> = <H, X W> + b . colsum(X)``; its gradients are
  ``dH = s (H W^T W + 1 (W^T b)^T - X W)``, ``dW = s (W H^T H + b (H^T 1)^T - X^T H)`` and
  ``db = s (W H^T 1 + B b - colsum(X))`` with ``s = 2 / (B n_genes)``. ``W^T W`` is a BLAS
  ``ssyrk`` (half a GEMM), ``W H^T H`` a GEMM: together 1.5 GEMMs of (n_genes, hidden, hidden)
  where the dense step needs three, and the (B, n_genes) reconstruction is never stored; the
  terms with X are sparse products.

The loss and gradients equal the dense formulation up to float32 rounding (the expansion
subtracts terms of the size of ``|X|^2``; tests compare both). A CSR batch is a :class:`CSR`
(``indptr`` int32 (B + 1), ``indices`` int32 (cap), ``data`` float32 (cap); entries past
``indptr[B]`` are padding with value 0) and the number of genes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..kernels import xla_ffi


class CSR(NamedTuple):
    """A CSR batch on the device (see the module docstring)."""

    indptr: jax.Array
    indices: jax.Array
    data: jax.Array


def _valid(X: CSR) -> jax.Array:
    """float32 (cap,): 1 for stored entries, 0 for the padding past ``indptr[-1]``."""
    return (jnp.arange(X.data.shape[0]) < X.indptr[-1]).astype(jnp.float32)


def column_sums(X: CSR, n_cols: int) -> jax.Array:
    """(n_cols,) float32 column sums of X."""
    return jax.ops.segment_sum(X.data * _valid(X), X.indices, num_segments=n_cols)


def dropout(X: CSR, rate: float, rng: jax.Array) -> CSR:
    """Inverted dropout of the stored entries (zeros stay zero, as dense dropout leaves them):
    each kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``."""
    if rate == 0:
        return X
    keep = jax.random.bernoulli(rng, 1.0 - rate, X.data.shape)
    return X._replace(data=jnp.where(keep, X.data / (1.0 - rate), 0.0))


@jax.custom_vjp
def csr_matmul(X: CSR, B: jax.Array) -> jax.Array:
    """(n, K) float32 ``X @ B`` for a CSR X (n, G) and B (G, K) float32; gradient for B only."""
    return xla_ffi.csr_matmul(X.indptr, X.indices, X.data, B)


def _csr_matmul_fwd(X: CSR, B: jax.Array) -> tuple[jax.Array, tuple[CSR, int]]:
    return csr_matmul(X, B), (X, B.shape[0])


def _csr_matmul_bwd(res: tuple[CSR, int], g: jax.Array) -> tuple[Any, jax.Array]:
    X, n_rows = res
    return _no_grad(X), xla_ffi.csr_t_matmul(X.indptr, X.indices, X.data, g, n_rows)


def _no_grad(X: CSR) -> CSR:
    return CSR(*(np.zeros(a.shape, jax.dtypes.float0) if a.dtype != jnp.float32
                 else jnp.zeros_like(a) for a in X))


csr_matmul.defvjp(_csr_matmul_fwd, _csr_matmul_bwd)


@jax.custom_vjp
def reconstruction_mse(H: jax.Array, W: jax.Array, b: jax.Array, X: CSR) -> jax.Array:
    """``mean((H @ W.T + b - X) ** 2)`` for H (B, K), a gene-major output kernel W (G, K), b (G,)
    float32 and a CSR X (B, G), computed without the (B, G) reconstruction (module docstring)."""
    return _mse_fwd(H, W, b, X)[0]


def _mse_fwd(H, W, b, X):
    n, G = H.shape[0], W.shape[0]
    P = xla_ffi.csr_matmul(X.indptr, X.indices, X.data, W)  # X W (n, K)
    M = xla_ffi.gram(W)  # W^T W (K, K), BLAS ssyrk
    GH = H.T @ H
    hsum = H.sum(axis=0)
    hW = W @ hsum  # (G,): sum over cells of the reconstruction without bias
    cs = column_sums(X, G)
    recon_sq = jnp.sum(GH * M) + 2.0 * jnp.dot(hW, b) + n * jnp.dot(b, b)
    cross = jnp.sum(H * P) + jnp.dot(b, cs)
    x_sq = jnp.sum(jnp.square(X.data) * _valid(X))
    mse = (recon_sq - 2.0 * cross + x_sq) / (n * G)
    return mse, (H, W, b, X, P, M, GH, hsum, hW, cs)


def _mse_bwd(res, g):
    H, W, b, X, P, M, GH, hsum, hW, cs = res
    n, G = H.shape[0], W.shape[0]
    s = 2.0 * g / (n * G)
    dH = s * (H @ M + (b @ W)[None, :] - P)
    XtH = xla_ffi.csr_t_matmul(X.indptr, X.indices, X.data, H, G)  # (G, K)
    dW = s * (W @ GH + b[:, None] * hsum[None, :] - XtH)
    db = s * (hW + n * b - cs)
    return dH, dW, db, _no_grad(X)


reconstruction_mse.defvjp(_mse_fwd, _mse_bwd)

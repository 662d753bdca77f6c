"""Differentiable products with a sparse expression batch, for training on the CPU.

A batch of expression profiles is ~90 % zeros, yet a dense training step multiplies it densely
twice in the first layer: ``X @ W1`` and the weight gradient ``X.T @ dH``, each
(B, n_genes) x (n_genes, hidden). Keeping the batch in CSR form, :func:`csr_matmul` is ``X @ B``
over the non-zeros, with ``dB = X.T @ dY`` as its gradient (both
:mod:`scatlas.models.xla_ffi` custom calls); inputs get no gradient. :func:`dropout` drops
stored entries. The reconstruction loss stays dense: its target is the batch written out by a
custom call (``xla_ffi.csr_to_dense``).

A CSR batch is a :class:`CSR` (``indptr`` int32 (B + 1), ``indices`` int32 (cap), ``data``
float32 (cap); entries past ``indptr[B]`` are padding with value 0) and the number of genes.

Tried and dropped: the reconstruction MSE from its expanded square
(``sum((H W^T + b)^2) = <H^T H, W^T W> + ...``, ``W^T W`` by BLAS ``ssyrk``), which never forms
the (B, n_genes) reconstruction. With the first layer sparse it was no faster than the dense
loss at 28,231 genes (1.47 vs 1.49 s a step) and slower below (2,000 genes: 0.314 vs 0.284 s;
10 % non-zero, batch 1,000, 2-core Zen 4, ad hoc alternating timing).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import xla_ffi


class CSR(NamedTuple):
    """A CSR batch on the device (see the module docstring)."""

    indptr: jax.Array
    indices: jax.Array
    data: jax.Array


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

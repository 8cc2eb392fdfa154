"""Blockwise Walsh–Hadamard rotation along the last (contraction) axis.

QuEST rotates activations and weights with the same orthogonal block-diagonal matrix
`blockdiag(H_b)`, `H_b` the Sylvester Hadamard matrix scaled by `1/sqrt(b)`, so that
`(x H)(W H)^T = x W^T` and both operands can be quantized in the rotated domain, where they are
close to Gaussian. Everything goes through `hadamard_transform`; it is a dense matmul for now (a
Pallas fast Walsh–Hadamard transform replaces its body later without changing callers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def hadamard_matrix(n: int) -> np.ndarray:
  """The `n x n` Sylvester Hadamard matrix divided by `sqrt(n)`: symmetric and orthogonal."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"Hadamard block size {n} must be a power of two (e.g. 32, 64, 128).")
  h = np.ones((1, 1), np.float64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / np.sqrt(n)).astype(np.float32)


def hadamard_transform(x: jax.Array, block: int) -> jax.Array:
  """`x @ blockdiag(H_block, ..., H_block)` along the last axis (its size a multiple of `block`).

  `H` is symmetric and orthogonal, so the transform is its own inverse and its VJP is itself.
  """
  k = x.shape[-1]
  if k % block:
    raise ValueError(f"Hadamard block {block} does not divide the contraction dimension {k}: "
                     f"choose a power-of-two block dividing {k}.")
  h = jnp.asarray(hadamard_matrix(block), x.dtype)
  x_NB = x.reshape(*x.shape[:-1], k // block, block)
  y = jnp.einsum("...nb,bc->...nc", x_NB, h, precision=jax.lax.Precision.HIGHEST)
  return y.reshape(x.shape)

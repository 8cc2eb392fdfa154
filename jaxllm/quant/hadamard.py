"""Blockwise Walsh–Hadamard rotation along the last (contraction) axis.

QuEST rotates activations and weights with the same orthogonal block-diagonal matrix
`blockdiag(H_b)`, `H_b` the Sylvester Hadamard matrix scaled by `1/sqrt(b)`, so that
`(x H)(W H)^T = x W^T` and both operands can be quantized in the rotated domain, where they are
close to Gaussian. Everything goes through `hadamard_transform`, the fast Walsh–Hadamard
transform of `pallas_kernels.hadamard` (O(b log b) per block instead of a dense b x b matmul);
`impl` chooses its XLA path ("xla", the default, any backend), the TPU Pallas kernel
("pallas"), the GPU Pallas kernel ("pallas_gpu"), or either kernel on CPU ("pallas_interpret",
"pallas_gpu_interpret"). `hadamard_matrix` is the dense matrix, for tests and references.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from pallas_kernels.hadamard import fwht, sylvester


@functools.cache
def hadamard_matrix(n: int) -> np.ndarray:
  """The `n x n` Sylvester Hadamard matrix divided by `sqrt(n)`: symmetric and orthogonal."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"Hadamard block size {n} must be a power of two (e.g. 32, 64, 128).")
  return (sylvester(n) / np.sqrt(n)).astype(np.float32)


def hadamard_transform(x: jax.Array, block: int, impl: str = "xla") -> jax.Array:
  """`x @ blockdiag(H_block, ..., H_block)` along the last axis (its size a multiple of `block`).

  `H` is symmetric and orthogonal, so the transform is its own inverse and its VJP is itself.
  `impl`: "xla" | "pallas" | "pallas_gpu" | "pallas_interpret" | "pallas_gpu_interpret" (see
  `pallas_kernels.hadamard.fwht`).
  """
  k = x.shape[-1]
  if k % block:
    raise ValueError(f"Hadamard block {block} does not divide the contraction dimension {k}: "
                     f"choose a power-of-two block dividing {k}.")
  return fwht(x, block, impl=impl)

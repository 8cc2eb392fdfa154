"""Normalised fast Walsh–Hadamard transform along the last axis: kernel, wrapper, reference.

`fwht(x, block)` computes `x @ blockdiag(H_b, ..., H_b)` over the last axis, `H_b` the Sylvester
Hadamard matrix of size `b` (a power of two up to 32768) divided by `sqrt(b)`; `block=None` takes
the whole axis. `H_b` is symmetric and orthogonal, so the transform is its own inverse and its
VJP is the transform of the cotangent (`custom_vjp` below).

The implementations, chosen explicitly by `impl` (never by a silent fallback):

- "xla": a Kronecker factorisation `H_b = H_f1 (x) H_f2 (x) ...` with factors of at most 64,
  applied as one small matmul per factor over a reshaped axis: `2 b log_64(b)` flops per row
  instead of the dense matmul's `2 b^2` (at b = 4096: 256 vs 8192 per element).
- "pallas": a TPU (Mosaic) kernel. The wrapper reshapes the input into rows of width
  `w = min(b, 128)`-aligned tiles; the kernel multiplies each 128-lane chunk by the +-1 matrix
  `kron(I, H_m)` on the MXU (m = min(b, 128), exact in any float dtype), then, for b > 128, runs
  the `log2(b / 128)` butterfly stages across chunks (adds and subtracts of 128-lane slices in
  VMEM), and scales by `1 / sqrt(b)` once. Rows are tiled `block_rows` (a multiple of 8) at a
  time with "parallel" grid semantics.
- "pallas_interpret": the same kernel in TPU interpret mode (CPU tests; race detection on).
- "pallas_gpu": the GPU (Triton) kernel of `pallas_kernels.hadamard_gpu` (blocks up to 16384;
  one pass over a row block, the +-1 factors applied as tensor-core dots); "pallas_gpu_interpret"
  runs it in interpret mode on CPU.

`fwht_reference` is the dense matmul `x @ blockdiag(H_b)` in float32 at HIGHEST precision.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import hadamard_gpu
from pallas_kernels.common import (GPU_IMPLS, IMPLS, check_backend, check_block_sizes,
                                   check_impl, interpret_params, out_struct)

MAX_SIZE = 32768
LANES = 128
__all__ = ["IMPLS", "BlockSizes", "check_impl", "fwht", "fwht_reference", "sylvester"]


@functools.cache
def sylvester(n: int) -> np.ndarray:
  """The unnormalised +-1 Sylvester Hadamard matrix of size n (a power of two)."""
  check_size(n)
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def check_size(n: int) -> None:
  if n < 1 or n & (n - 1) or n > MAX_SIZE:
    raise ValueError(f"Hadamard size {n} must be a power of two between 1 and {MAX_SIZE} "
                     "(e.g. 32, 128, 4096).")


def _block_of(x: jax.Array, block: int | None) -> int:
  length = x.shape[-1]
  b = length if block is None else block
  check_size(b)
  if length % b:
    raise ValueError(f"Hadamard block {b} does not divide the last axis ({length}): choose a "
                     f"power-of-two block dividing {length}.")
  return b


# --------------------------------------------------------------------------------- reference
def fwht_reference(x: jax.Array, block: int | None = None) -> jax.Array:
  """Dense `x @ blockdiag(H_b / sqrt(b))` in float32, HIGHEST precision (the test oracle)."""
  b = _block_of(x, block)
  h = jnp.asarray(sylvester(b) / np.sqrt(b), jnp.float32)
  x_NB = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // b, b)
  y = jnp.einsum("...nb,bc->...nc", x_NB, h, precision=jax.lax.Precision.HIGHEST)
  return y.reshape(x.shape).astype(x.dtype)


# ------------------------------------------------------------------------------------ XLA path
def kron_factors(n: int, largest: int = 64) -> list[int]:
  """Powers of two, each at most `largest`, as equal as possible, whose product is n."""
  if n == 1:
    return [1]
  k = int(math.log2(n))
  t = -(-k // int(math.log2(largest)))
  sizes = [k // t + (i < k % t) for i in range(t)]
  return [2 ** s for s in sizes]


def _fwht_xla(x: jax.Array, b: int) -> jax.Array:
  dtype = x.dtype
  factors = kron_factors(b)
  lead = x.shape[:-1]
  y = x.astype(jnp.float32).reshape(-1, x.shape[-1] // b, *factors)
  letters = "abcdefghijklmnop"[:len(factors)]
  for i, f in enumerate(factors):
    h = jnp.asarray(sylvester(f), jnp.float32)
    out = letters[:i] + "z" + letters[i + 1:]
    y = jnp.einsum(f"rn{letters},{letters[i]}z->rn{out}", y, h,
                   precision=jax.lax.Precision.HIGHEST)
  return (y.reshape(*lead, x.shape[-1]) * (1.0 / math.sqrt(b))).astype(dtype)


# ---------------------------------------------------------------------------------- the kernel
@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Rows per grid step (a multiple of 8). The row width is the whole transform size."""
  block_rows: int = 8

  def __post_init__(self):
    if self.block_rows < 8 or self.block_rows % 8:
      raise ValueError(f"block_rows={self.block_rows} must be a positive multiple of 8 "
                       "(the TPU sublane tile).")


def hadamard_into(x_ref, h, acc_ref, segment: int) -> None:
  """acc_ref <- x_ref's rows times blockdiag(H) unnormalised, in float32: `H_m` (h, [m, m] +-1,
  possibly kron(I, H_b)) on the MXU per m-lane chunk, then log2(segment) butterfly stages across
  the chunks of each aligned run of `segment` chunks. All slices are static and m-aligned (m =
  128, or the whole row), so Mosaic needs no relayouts."""
  m = h.shape[0]
  chunks = x_ref.shape[-1] // m
  for c in range(chunks):  # H_m per chunk on the MXU (+-1 entries: exact in bf16 and f32)
    sl = slice(c * m, (c + 1) * m)
    acc_ref[:, sl] = jnp.dot(x_ref[:, sl].astype(h.dtype), h, preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST)
  stride = 1
  while stride < segment:  # butterflies across chunks: (a, b) -> (a + b, a - b)
    for j in range(chunks):
      if not j & stride:
        lo, hi = slice(j * m, (j + 1) * m), slice((j + stride) * m, (j + stride + 1) * m)
        a, b = acc_ref[:, lo], acc_ref[:, hi]
        acc_ref[:, lo] = a + b
        acc_ref[:, hi] = a - b
    stride *= 2


def _fwht_kernel(x_ref, h_ref, o_ref, acc_ref, *, scale: float):
  """x_ref, o_ref: [block_rows, width]; h_ref: [m, m] +-1 (m = min(width, 128), or kron(I, H_b)
  when b < 128); acc_ref: float32 VMEM scratch [block_rows, width]."""
  hadamard_into(x_ref, h_ref[...], acc_ref, x_ref.shape[-1] // h_ref.shape[0])
  o_ref[...] = (acc_ref[...] * scale).astype(o_ref.dtype)


def _fwht_pallas(x: jax.Array, b: int, block_sizes: BlockSizes, interpret) -> jax.Array:
  shape = x.shape
  if b < LANES and shape[-1] % LANES == 0:  # several blocks share a 128-lane row
    width, h = LANES, np.kron(np.eye(LANES // b, dtype=np.float32), sylvester(b))
  else:
    width, h = b, sylvester(min(b, LANES))
  rows = x.size // width
  x_RW = x.reshape(rows, width)
  bm = block_sizes.block_rows
  padded = -(-rows // bm) * bm
  if padded != rows:
    x_RW = jnp.pad(x_RW, ((0, padded - rows), (0, 0)))
  h_dtype = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32
  out = pl.pallas_call(
      functools.partial(_fwht_kernel, scale=1.0 / math.sqrt(b)),
      out_shape=out_struct((padded, width), x.dtype, x_RW),
      grid=(padded // bm,),
      in_specs=[pl.BlockSpec((bm, width), lambda i: (i, 0)),
                pl.BlockSpec(h.shape, lambda i: (0, 0))],
      out_specs=pl.BlockSpec((bm, width), lambda i: (i, 0)),
      scratch_shapes=[pltpu.VMEM((bm, width), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      name=f"fwht_{b}",
  )(x_RW, jnp.asarray(h, h_dtype))
  return out[:rows].reshape(shape)


# ------------------------------------------------------------------------------------ wrapper
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _fwht(x, b, impl, block_sizes):
  if impl == "xla":
    return _fwht_xla(x, b)
  if impl in GPU_IMPLS:
    return hadamard_gpu.fwht_gpu(x, b, block_sizes, impl == "pallas_gpu_interpret")
  return _fwht_pallas(x, b, block_sizes or BlockSizes(),
                      interpret_params() if impl == "pallas_interpret" else False)


def _fwht_fwd(x, b, impl, block_sizes):
  return _fwht(x, b, impl, block_sizes), None


def _fwht_bwd(b, impl, block_sizes, _, g):
  return (_fwht(g, b, impl, block_sizes),)  # H symmetric and orthogonal: the VJP is H itself


_fwht.defvjp(_fwht_fwd, _fwht_bwd)


@functools.partial(jax.jit, static_argnames=("block", "impl", "block_sizes"))
def fwht(x: jax.Array, block: int | None = None, *, impl: str = "xla",
         block_sizes: BlockSizes | hadamard_gpu.BlockSizes | None = None) -> jax.Array:
  """Normalised Walsh–Hadamard transform of the last axis in blocks of `block` (None: all of it).

  Floating inputs only (float32 or bfloat16); the result has the input's dtype, computed in
  float32. `impl` is "xla", "pallas" (TPU), "pallas_gpu" (GPU, blocks up to 16384), or
  "pallas_interpret" / "pallas_gpu_interpret" (those kernels on CPU). `block_sizes`: the
  kernel's dataclass (`BlockSizes` for TPU, `hadamard_gpu.BlockSizes` for GPU); None: defaults.
  """
  check_impl(impl)
  check_backend(impl)
  check_block_sizes(block_sizes, impl, BlockSizes, hadamard_gpu.BlockSizes)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"fwht needs a floating input, got {x.dtype}.")
  return _fwht(x, _block_of(x, block), impl, block_sizes)

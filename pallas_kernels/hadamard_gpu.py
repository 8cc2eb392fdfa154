"""The fast Walsh–Hadamard transform as a GPU (Pallas Triton) kernel: one pass over a row block.

Called through `pallas_kernels.hadamard.fwht(x, block, impl="pallas_gpu")` (or
"pallas_gpu_interpret" on CPU), which holds the jitted wrapper, the custom VJP and the dense
reference this kernel is tested against. Every element is read from HBM once and written once;
all the arithmetic happens in registers and on the tensor cores:

- b <= 128: the rows of the `[rows, w]` view (w = max(b, 16); for b < 16 several blocks share a
  16-wide row) are multiplied by the +-1 matrix `kron(I, H_b)` [w, w] in one tensor-core dot per
  `block_rows` rows.
- 128 < b <= 16384: a row is the matrix `X [b1, b2]` (b = b1 b2, both powers of two in
  [16, 128]) and, Sylvester's `H_b = H_b1 (x) H_b2` being a Kronecker product,
  `row H_b = vec(H_b1 X H_b2)`: two dots per row and no data movement between them. A program
  handles `block_rows` rows one after another.

The +-1 matrices are built in registers from iotas (`H[i, j] = (-1)^parity(i & j)`), never read
from memory. They are exact in bf16, so every dot runs on bf16 operands with f32 accumulation:
float32 operands are split into three bf16 parts (`x = x1 + x2 + x3` to f32 rounding) and the dot
is the sum of three dots — f32 accuracy at tensor-core speed, and the same arithmetic in interpret
mode on CPU. bfloat16 inputs need one dot for the first factor (exact) and two parts for the f32
intermediate. The result is scaled by `1 / sqrt(b)` in f32 and stored in the input's dtype.
Sizes above 16384 have no GPU kernel (one row would not fit a program's registers): the wrapper
raises and names `impl="xla"`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import out_struct, round_up

MAX_GPU_SIZE = 16384
MIN_DOT = 16  # the smallest tensor-core dot dimension Triton accepts


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_rows: rows per program (None: by size). For b <= 128 the rows of one dot, a power of
  two >= 16; for b > 128 rows handled in a loop, any positive number (1: a program per row).
  num_warps, num_stages: Triton launch parameters."""
  block_rows: int | None = None
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
      raise ValueError(f"num_warps={self.num_warps} must be a power of two (e.g. 4, 8).")
    if self.block_rows is not None and self.block_rows < 1:
      raise ValueError(f"block_rows={self.block_rows} must be positive.")

  def rows_for(self, b: int) -> int:
    if b <= 128:
      br = 32 if self.block_rows is None else self.block_rows
      if br < MIN_DOT or br & (br - 1):
        raise ValueError(f"block_rows={br} must be a power of two >= {MIN_DOT} for Hadamard "
                         f"blocks of {b} <= 128 (the rows of one tensor-core dot).")
      return br
    return 1 if self.block_rows is None else self.block_rows


def split_factors(b: int) -> tuple[int, int]:
  """b = b1 * b2 for 128 < b <= 16384: powers of two in [16, 128], b2 >= b1."""
  k = int(math.log2(b))
  return 2 ** (k // 2), 2 ** (k - k // 2)


def pm1_matrix(w: int, b: int) -> jax.Array:
  """`kron(I_{w/b}, H_b)` [w, w] with +-1 entries (0 off the diagonal blocks), float32.

  `H_b[i, j] = (-1)^parity(i & j)`; the parity of the (at most 8-bit) index is folded with
  shifts and xors, plain integer ops on every backend (no popcount intrinsic)."""
  if w > 256:
    raise ValueError(f"pm1_matrix folds 8-bit indices; got a {w} x {w} matrix.")
  i = jax.lax.broadcasted_iota(jnp.int32, (w, w), 0)
  j = jax.lax.broadcasted_iota(jnp.int32, (w, w), 1)
  p = i & j & (b - 1)
  for shift in (4, 2, 1):
    p = p ^ (p >> shift)
  h = jnp.where((p & 1) == 1, -1.0, 1.0)
  if b < w:
    h = jnp.where((i ^ j) < b, h, 0.0)
  return h


def bf16_parts(x: jax.Array, n: int) -> list[jax.Array]:
  """x (float32) as n bfloat16 terms whose float32 sum is x (n = 3: to float32 rounding)."""
  parts, rest = [], x
  for _ in range(n):
    p = rest.astype(jnp.bfloat16)
    parts.append(p)
    rest = rest - p.astype(jnp.float32)
  return parts


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _right(x, h, parts):
  """x @ h in float32, h +-1 in bf16 (exact), x split into `parts` bf16 terms (1: x is bf16)."""
  xs = [x.astype(jnp.bfloat16)] if parts == 1 else bf16_parts(x.astype(jnp.float32), parts)
  return functools.reduce(jnp.add, [_dot(p, h) for p in xs])


def _left(h, x, parts):
  return functools.reduce(jnp.add, [_dot(h, p) for p in bf16_parts(x, parts)])


def _small_kernel(x_ref, o_ref, *, b: int, scale: float, parts: int):
  """x_ref, o_ref: [block_rows, w]; one dot with kron(I, H_b)."""
  w = x_ref.shape[-1]
  h = pm1_matrix(w, b).astype(jnp.bfloat16)
  o_ref[...] = (_right(x_ref[...], h, parts) * scale).astype(o_ref.dtype)


def _big_kernel(x_ref, o_ref, *, scale: float, parts: int):
  """x_ref, o_ref: [block_rows, b1, b2]; each row X -> H_b1 X H_b2."""
  rows, b1, b2 = x_ref.shape
  h1 = pm1_matrix(b1, b1).astype(jnp.bfloat16)
  h2 = pm1_matrix(b2, b2).astype(jnp.bfloat16)
  second = 2 if parts == 1 else 3  # the f32 intermediate: 2 bf16 terms suffice for bf16 output

  def row(r):
    t = _right(x_ref[r], h2, parts)  # [b1, b2] float32
    o_ref[r] = (_left(h1, t, second) * scale).astype(o_ref.dtype)

  if rows == 1:
    row(0)
  else:
    jax.lax.fori_loop(0, rows, lambda r, c: (row(r), c)[1], 0)


def fwht_gpu(x: jax.Array, b: int, block_sizes: BlockSizes | None, interpret: bool) -> jax.Array:
  """The normalised transform of x's last axis in blocks of b (validated by the caller)."""
  if b > MAX_GPU_SIZE:
    raise ValueError(f"The GPU Hadamard kernel handles blocks up to {MAX_GPU_SIZE}, got {b}: use "
                     "impl='xla' (quant.kernels='xla') for this size.")
  bs = block_sizes or BlockSizes()
  shape, dtype = x.shape, x.dtype
  parts = 1 if dtype == jnp.bfloat16 else 3
  br = bs.rows_for(b)
  params = plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)
  if b <= 128:
    w = max(b, MIN_DOT)
    x_RB = x.reshape(-1, b)
    if w != b:  # several blocks per 16-wide row; pad the block count to whole rows
      x_RB = jnp.pad(x_RB, ((0, round_up(x_RB.shape[0], w // b) - x_RB.shape[0]), (0, 0)))
    x_RW = x_RB.reshape(-1, w)
    rows = x_RW.shape[0]
    padded = round_up(rows, br)
    x_RW = jnp.pad(x_RW, ((0, padded - rows), (0, 0))) if padded != rows else x_RW
    out = pl.pallas_call(
        functools.partial(_small_kernel, b=b, scale=1.0 / math.sqrt(b), parts=parts),
        out_shape=out_struct((padded, w), dtype, x_RW),
        grid=(padded // br,),
        in_specs=[pl.BlockSpec((br, w), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((br, w), lambda i: (i, 0)),
        compiler_params=params, interpret=interpret, name=f"fwht_gpu_{b}",
    )(x_RW)
    return out.reshape(-1)[:x.size].reshape(shape)
  b1, b2 = split_factors(b)
  x_R12 = x.reshape(-1, b1, b2)
  rows = x_R12.shape[0]
  padded = round_up(rows, br)
  if padded != rows:
    x_R12 = jnp.pad(x_R12, ((0, padded - rows), (0, 0), (0, 0)))
  out = pl.pallas_call(
      functools.partial(_big_kernel, scale=1.0 / math.sqrt(b), parts=parts),
      out_shape=out_struct((padded, b1, b2), dtype, x_R12),
      grid=(padded // br,),
      in_specs=[pl.BlockSpec((br, b1, b2), lambda i: (i, 0, 0))],
      out_specs=pl.BlockSpec((br, b1, b2), lambda i: (i, 0, 0)),
      compiler_params=params, interpret=interpret, name=f"fwht_gpu_{b}",
  )(x_R12)
  return out[:rows].reshape(shape)

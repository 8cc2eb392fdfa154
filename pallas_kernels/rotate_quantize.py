"""Fused Hadamard rotation + QuEST activation quantization: kernel, wrapper and reference.

`rotate_quantize(x, block, levels, alpha)` is QuEST's integer activation path in one pass over
each row: rotate the last axis by `blockdiag(H_block) / sqrt(block)`, take the row's RMS
`sigma = sqrt(mean(y^2)) + 1e-8` (over the whole row), `s = alpha * sigma`, and round onto the
centred grid of `levels` points on [-s, s]:

    c = clip(round((y / s + 1) (levels - 1) / 2), 0, levels - 1)

returned in the integer form the int8 x low-bit matmul takes (`lowbit_matmul(x_int, ...,
x_scale=scale)`): `x_int = t c - (levels - 1) t / 2` (t = 2 for an even number of levels, whose
grid has half-integer points; 1 for odd) as int8 and `scale = s (2 / (levels - 1)) / t`, so that
`x_int * scale` is the quantized rotated row. That is `jaxllm.quant.policy.integer_activation`
of `hadamard_transform(x, block)` for a QuEST spec (`alpha` = its Gaussian-optimal alpha), which
the tests check. Without the fusion the rotated activations make a round trip through HBM in
float32 between the two steps; fused, the row is read once and only int8 codes and one scale
per row are written.

`impl`: "xla" (the fast transform's XLA path, then the grid; `rotate_quantize_reference` is the
dense rotation in float32 HIGHEST, then the grid), "pallas" (TPU: the FWHT kernel's MXU dots and
butterflies into a VMEM row, then the reduction and rounding in registers) or
"pallas_interpret" (that kernel in TPU interpret mode on CPU). There is no GPU kernel:
"pallas_gpu" raises and names what to use instead. The outputs are integers, so there is no VJP
(QAT uses the fake-quant path with its trust-mask gradient instead).
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

from pallas_kernels.common import (GPU_IMPLS, check_backend, check_impl, interpret_params,
                                   out_struct, round_up)
from pallas_kernels.hadamard import (LANES, _block_of, fwht, fwht_reference, hadamard_into,
                                     sylvester)

EPS = 1e-8  # added to the RMS, as jaxllm.quant.quantizers.quest_codes does


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Rows per grid step (a multiple of 32, the int8 sublane tile); the row is the whole axis."""
  block_rows: int = 32

  def __post_init__(self):
    if self.block_rows < 32 or self.block_rows % 32:
      raise ValueError(f"block_rows={self.block_rows} must be a positive multiple of 32 (the "
                       "TPU int8 tile).")


def _integer_form(levels: int) -> tuple[int, int]:
  """(t, offset): x_int = t c - offset; |x_int| <= 127 must hold."""
  t = 1 if levels % 2 else 2
  offset = (levels - 1) * t // 2
  if levels < 2 or offset > 127:
    raise ValueError(f"{levels} levels have no int8 form (at most 128 even or 255 odd levels).")
  return t, offset


def _grid(y, levels: int, alpha: float):
  """float32 rotated rows [R, K] -> (int8 codes [R, K], scale [R, 1])."""
  t, offset = _integer_form(levels)
  sigma = jnp.sqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True)) + EPS
  s = alpha * sigma
  c = jnp.clip(jnp.round((y / s + 1) * ((levels - 1) / 2)), 0, levels - 1)
  return (t * c - offset).astype(jnp.int8), s * ((2 / (levels - 1)) / t)


def rotate_quantize_reference(x, block: int | None, levels: int, alpha: float):
  """Dense rotation (`fwht_reference`, float32 HIGHEST) then the grid: the test oracle."""
  y = fwht_reference(x.astype(jnp.float32), block)
  codes, scale = _grid(y.reshape(-1, x.shape[-1]), levels, alpha)
  return codes.reshape(x.shape), scale.reshape(x.shape[:-1])


def _kernel(x_ref, h_ref, q_ref, s_ref, acc_ref, *, b: int, levels: int, alpha: float):
  """x_ref: [block_rows, K]; h_ref: [m, m]; q_ref: int8 [block_rows, K]; s_ref: [block_rows, 1];
  acc_ref: float32 VMEM [block_rows, K]."""
  m = h_ref.shape[0]
  hadamard_into(x_ref, h_ref[...], acc_ref, max(1, b // m))
  codes, scale = _grid(acc_ref[...] * (1.0 / math.sqrt(b)), levels, alpha)
  q_ref[...] = codes
  s_ref[...] = scale


def _rotate_quantize_pallas(x_MK, b, levels, alpha, block_sizes: BlockSizes, interpret):
  rows, k = x_MK.shape
  m = LANES if k % LANES == 0 else k  # 128-lane chunks, or the whole (narrow) row
  if m > 1024:
    raise ValueError(f"The fused kernel needs K % 128 == 0 for rows wider than 1024 (K = {k}); "
                     "use impl='xla'.")
  hb = min(b, m)
  h = np.kron(np.eye(m // hb, dtype=np.float32), sylvester(hb))
  bm = block_sizes.block_rows
  padded = round_up(rows, bm)
  if padded != rows:
    x_MK = jnp.pad(x_MK, ((0, padded - rows), (0, 0)))
  h_dtype = jnp.bfloat16 if x_MK.dtype == jnp.bfloat16 else jnp.float32
  codes, scale = pl.pallas_call(
      functools.partial(_kernel, b=b, levels=levels, alpha=alpha),
      out_shape=(out_struct((padded, k), jnp.int8, x_MK),
                 out_struct((padded, 1), jnp.float32, x_MK)),
      grid=(padded // bm,),
      in_specs=[pl.BlockSpec((bm, k), lambda i: (i, 0)),
                pl.BlockSpec((m, m), lambda i: (0, 0))],
      out_specs=(pl.BlockSpec((bm, k), lambda i: (i, 0)), pl.BlockSpec((bm, 1), lambda i: (i, 0))),
      scratch_shapes=[pltpu.VMEM((bm, k), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      name=f"rotate_quantize_{b}",
  )(x_MK, jnp.asarray(h, h_dtype))
  return codes[:rows], scale[:rows, 0]


@functools.partial(jax.jit, static_argnames=("block", "levels", "alpha", "impl", "block_sizes"))
def rotate_quantize(x: jax.Array, block: int | None, levels: int, alpha: float, *,
                    impl: str = "xla", block_sizes: BlockSizes | None = None):
  """(int8 codes [..., K], float32 scale [...]) of QuEST-quantized `fwht(x, block)` (see the
  module docstring). x: float32 or bfloat16."""
  check_impl(impl)
  check_backend(impl)
  if impl in GPU_IMPLS:
    raise ValueError("rotate_quantize has no GPU kernel: use impl='xla' (quant.kernels='xla'), "
                     "or the GPU transform, fwht(x, block, impl='pallas_gpu'), followed by the "
                     "XLA quantizer.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"rotate_quantize needs a floating input, got {x.dtype}.")
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError("block_sizes must be a pallas_kernels.rotate_quantize.BlockSizes.")
  b = _block_of(x, block)
  _integer_form(levels)
  if impl == "xla":  # the fast transform's XLA path, then the grid
    y = fwht(x.astype(jnp.float32), b, impl="xla").reshape(-1, x.shape[-1])
    codes, scale = _grid(y, levels, alpha)
    return codes.reshape(x.shape), scale.reshape(x.shape[:-1])
  codes, scale = _rotate_quantize_pallas(
      x.reshape(-1, x.shape[-1]), b, levels, float(alpha), block_sizes or BlockSizes(),
      interpret_params() if impl == "pallas_interpret" else False)
  return codes.reshape(x.shape), scale.reshape(x.shape[:-1])

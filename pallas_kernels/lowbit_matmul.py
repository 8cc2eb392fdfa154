"""Activations times packed low-bit weights: kernel, wrapper and pure-jnp reference.

The weights are `jaxllm.quant.packing`'s packed `kernel[K, N]`: uint8 codes `[U, N]` packed along
K (U = ceil(K / per), byte u holds rows `k = per * u + i`, i = 0 .. per - 1, little-endian; base 3
for ternary), and `value[k, n] = (codebook[code] - zero[g, n]) * scale[g, n]` with `g = k // G`.
Formats with a kernel: "1" (8 codes per byte), "ternary" (5), "2" (4), "4" (2), "8" (1). The
codebook must be affine in the code, `codebook[c] = a + b c` (every quantizer in jaxllm.quant is:
sign, SEQ, LSQ, QuEST's centered grid, BitNet's {-1, 0, 1}, min-max's integers).

The TPU (Mosaic) kernel never materialises the float weight in HBM: it reads code bytes, unpacks
each of the `per` codes with shifts and masks (ternary: the base-3 digits in exact float
arithmetic) into signed integers `c' = c - off`, and multiplies them on the MXU against the
matching activation columns. The wrapper permutes the activations once, `x_t[i, m, u] =
x[m, per u + i]`, so the i-th code of every byte meets a contiguous [bm, bku] activation tile.

- Per-output-channel scales (G = K): `y = P_n (x . c') + Q_n rowsum(x)` with `P = b s` and
  `Q = (a + b off - zero) s`; the dot accumulates in float32 — or in int32 when the activations
  are int8 (`x_scale` per token: QuEST's W4A4 and BitNet's W1.58A8 integer paths), scaled by
  `x_scale` at the end.
- Per-group scales: the kernel dequantises each tile, `w = P_u c' + Q_u`, expanding the group
  rows to the tile's rows with a one-hot matmul (no dynamic slicing), and accumulates in f32.

Grid (M / bm, N / bn, U / bku), semantics parallel / parallel / arbitrary, an f32 or int32 VMEM
accumulator; block shapes are multiples of (8, 128) (bytes: (32, 128)); inputs are zero-padded
to whole blocks (pick K, N multiples of the blocks to avoid the copy). `impl` picks "xla" (the
reference: unpack, decode, dot), "pallas" (TPU) or "pallas_interpret" (the TPU kernel on CPU,
race detection on), "pallas_gpu" (the GPU Triton kernel of `pallas_kernels.lowbit_matmul_gpu`:
a CUDA-core GEMV for M = 1, tensor-core dots otherwise) or "pallas_gpu_interpret" (that kernel
on CPU). The custom VJP differentiates x and the scales through the reference, whatever `impl`.
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

from pallas_kernels import lowbit_matmul_gpu
from pallas_kernels.common import (GPU_IMPLS, check_backend, check_block_sizes, check_impl,
                                   interpret_params, out_struct, pad2, round_up)

# format -> (codes per byte, bits per code; 0 = base 3)
KERNEL_FORMATS = {"1": (8, 1), "ternary": (5, 0), "2": (4, 2), "4": (2, 4), "8": (1, 8)}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of a packed weight: format, affine codebook, K and the group size."""
  fmt: str
  codebook: tuple[float, ...]
  k: int
  group_size: int

  def __post_init__(self):
    if self.fmt not in KERNEL_FORMATS:
      raise ValueError(f"No low-bit matmul kernel for format {self.fmt!r} (kernels: "
                       f"{sorted(KERNEL_FORMATS)}); use impl='xla' or pack as 4-bit.")
    if self.k % self.group_size:
      raise ValueError(f"group_size {self.group_size} does not divide K = {self.k}.")
    if len(self.codebook) > self.levels:
      raise ValueError(f"{len(self.codebook)} codebook entries do not fit format {self.fmt!r}.")
    self.affine  # noqa: B018 -- validates

  @property
  def per(self) -> int:
    return KERNEL_FORMATS[self.fmt][0]

  @property
  def bits(self) -> int:
    return KERNEL_FORMATS[self.fmt][1]

  @property
  def levels(self) -> int:
    return 3 if self.bits == 0 else 2 ** self.bits

  @property
  def offset(self) -> int:
    """Subtracted from codes so they are centred (|c'| <= 128 fits int8 and bf16 exactly)."""
    return self.levels // 2

  @property
  def units(self) -> int:
    return -(-self.k // self.per)

  @property
  def affine(self) -> tuple[float, float]:
    cb = np.asarray(self.codebook, np.float64)
    a, b = (cb[0], cb[1] - cb[0]) if len(cb) > 1 else (cb[0], 0.0)
    if not np.allclose(cb, a + b * np.arange(len(cb)), rtol=0, atol=1e-6 * max(1, abs(cb).max())):
      raise ValueError(f"The low-bit matmul kernel needs an affine codebook a + b * code; "
                       f"{self.codebook} is not (use impl='xla').")
    return float(a), float(b)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """bm: rows of x per step (multiple of 8); bn: output columns (multiple of 128); bku: code
  bytes along K per step (multiple of 128; K per step = bku * codes per byte)."""
  bm: int = 128
  bn: int = 256
  bku: int = 128

  def __post_init__(self):
    for name, v, m in (("bm", self.bm, 8), ("bn", self.bn, 128), ("bku", self.bku, 128)):
      if v < m or v % m:
        raise ValueError(f"BlockSizes.{name}={v} must be a positive multiple of {m} (TPU tiles).")

  @classmethod
  def for_shape(cls, m: int, n: int, units: int) -> "BlockSizes":
    """Defaults that shrink to the problem: bm up to 128, bn 256 or 128, bku 256 or 128."""
    return cls(bm=min(128, -(-m // 8) * 8), bn=256 if n >= 256 else 128,
               bku=256 if units >= 256 else 128)


# --------------------------------------------------------------------------------- reference
def unpack(codes_UN: jax.Array, layout: Layout) -> jax.Array:
  """uint8 [U, N] -> int32 codes [K, N]."""
  per, bits = layout.per, layout.bits
  c = codes_UN.astype(jnp.int32)[:, None, :]
  i = jnp.arange(per, dtype=jnp.int32)[None, :, None]
  digits = (c // 3 ** i) % 3 if bits == 0 else (c >> (bits * i)) & (2 ** bits - 1)
  return digits.reshape(-1, codes_UN.shape[-1])[:layout.k]


def dequantize(codes_UN, scale_GN, zero_GN, layout: Layout) -> jax.Array:
  """The float32 weight [K, N]."""
  cb = jnp.asarray(layout.codebook, jnp.float32)
  v = cb[unpack(codes_UN, layout)]
  g = layout.group_size
  v = v.reshape(-1, g, v.shape[-1])
  if zero_GN is not None:
    v = v - zero_GN.astype(jnp.float32)[:, None, :]
  return (v * scale_GN.astype(jnp.float32)[:, None, :]).reshape(layout.k, -1)


def lowbit_matmul_reference(x, codes_UN, scale_GN, zero_GN, x_scale, layout: Layout):
  """`(x * x_scale[..., None]) @ dequantize(...)` in float32 at HIGHEST precision."""
  x32 = x.astype(jnp.float32)
  if x_scale is not None:
    x32 = x32 * x_scale.astype(jnp.float32)[..., None]
  return jnp.matmul(x32, dequantize(codes_UN, scale_GN, zero_GN, layout),
                    precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------- the kernel
def _signed_codes(c_i32, layout: Layout):
  """int32 bytes [bku, bn] -> the `per` signed code tiles c' = c - off (int32)."""
  off = layout.offset
  if layout.bits:
    mask = 2 ** layout.bits - 1
    return [((c_i32 >> (layout.bits * i)) & mask) - off for i in range(layout.per)]
  # base 3: digits by exact float arithmetic (bytes <= 242; the fractions stay far from integers)
  cf = c_i32.astype(jnp.float32)
  out = []
  for i in range(layout.per):
    t = jnp.floor((cf + 0.5) * (1.0 / 3 ** i))
    out.append((t - 3.0 * jnp.floor((t + 0.5) * (1.0 / 3))).astype(jnp.int32) - off)
  return out


def _dot(a, b, acc_dtype):
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.dot(a, b, preferred_element_type=acc_dtype, precision=precision)


def _channel_kernel(x_ref, c_ref, p_ref, q_ref, rs_ref, xs_ref, o_ref, acc_ref, *, layout):
  """Per-channel scales: acc += x_t[i] . c'_i; at the last K step o = xs (P acc + Q rowsum)."""
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  codes = _signed_codes(c_ref[...].astype(jnp.int32), layout)
  op_dtype = x_ref.dtype
  acc = acc_ref[...]
  for i, c in enumerate(codes):
    acc = acc + _dot(x_ref[i], c.astype(op_dtype), acc_ref.dtype)
  acc_ref[...] = acc

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    y = p_ref[...] * acc_ref[...].astype(jnp.float32) + q_ref[...] * rs_ref[...]
    o_ref[...] = (y * xs_ref[...]).astype(o_ref.dtype)


def _group_kernel(x_ref, c_ref, p_ref, q_ref, o_ref, acc_ref, *, layout, bku):
  """Per-group scales: w_i = P_u c'_i + Q_u (group rows expanded by a one-hot matmul)."""
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  ng = p_ref.shape[0]
  gu = layout.group_size // layout.per  # bytes per group
  u = k * bku + jax.lax.broadcasted_iota(jnp.int32, (bku, ng), 0)
  lo = jax.lax.broadcasted_iota(jnp.int32, (bku, ng), 1) * gu
  onehot = ((u >= lo) & (u < lo + gu)).astype(jnp.float32)
  p_u = _dot(onehot, p_ref[...], jnp.float32)  # [bku, bn]
  q_u = _dot(onehot, q_ref[...], jnp.float32)
  codes = _signed_codes(c_ref[...].astype(jnp.int32), layout)
  acc = acc_ref[...]
  for i, c in enumerate(codes):
    w = (p_u * c.astype(jnp.float32) + q_u).astype(x_ref.dtype)
    acc = acc + _dot(x_ref[i], w, jnp.float32)
  acc_ref[...] = acc

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _lowbit_pallas(x_MK, codes_UN, scale_GN, zero_GN, x_scale_M, layout: Layout, out_dtype,
                   block_sizes: BlockSizes | None, interpret):
  m, n = x_MK.shape[0], codes_UN.shape[1]
  per, units = layout.per, layout.units
  bs = block_sizes or BlockSizes.for_shape(m, n, units)
  mp, np_, up = round_up(m, bs.bm), round_up(n, bs.bn), round_up(units, bs.bku)
  integer = x_scale_M is not None
  grouped = layout.group_size != layout.k

  a, b = layout.affine
  shift = a + b * layout.offset
  zero = 0.0 if zero_GN is None else zero_GN.astype(jnp.float32)
  scale = scale_GN.astype(jnp.float32)
  p_GN, q_GN = pad2(b * scale, scale.shape[0], np_), pad2((shift - zero) * scale,
                                                           scale.shape[0], np_)

  x_t = pad2(x_MK, mp, up * per).reshape(mp, up, per).transpose(2, 0, 1)  # [per, Mp, Up]
  codes = pad2(codes_UN, up, np_)
  x_spec = pl.BlockSpec((per, bs.bm, bs.bku), lambda i, j, k: (0, i, k))
  c_spec = pl.BlockSpec((bs.bku, bs.bn), lambda i, j, k: (k, j))
  o_spec = pl.BlockSpec((bs.bm, bs.bn), lambda i, j, k: (i, j))
  if grouped:
    if layout.group_size % per:
      raise ValueError(f"group_size {layout.group_size} must be a multiple of the {per} codes "
                       f"per byte of format {layout.fmt!r} for the kernel.")
    if integer:
      raise ValueError("Integer (int8) activations need per-channel weight scales "
                       "(group_size = K); per-group scales accumulate in float32.")
    kernel = functools.partial(_group_kernel, layout=layout, bku=bs.bku)
    g_spec = pl.BlockSpec((scale.shape[0], bs.bn), lambda i, j, k: (0, j))
    in_specs, args, acc_dtype = [x_spec, c_spec, g_spec, g_spec], [x_t, codes, p_GN, q_GN], jnp.float32
  else:
    rowsum = jnp.sum(x_MK.astype(jnp.int32 if integer else jnp.float32), axis=-1, keepdims=True)
    xs = (jnp.ones((m, 1), jnp.float32) if x_scale_M is None
          else x_scale_M.astype(jnp.float32).reshape(m, 1))
    row_spec = pl.BlockSpec((bs.bm, 1), lambda i, j, k: (i, 0))
    ch_spec = pl.BlockSpec((1, bs.bn), lambda i, j, k: (0, j))
    kernel = functools.partial(_channel_kernel, layout=layout)
    in_specs = [x_spec, c_spec, ch_spec, ch_spec, row_spec, row_spec]
    args = [x_t, codes, p_GN, q_GN, pad2(rowsum.astype(jnp.float32), mp, 1), pad2(xs, mp, 1)]
    acc_dtype = jnp.int32 if integer else jnp.float32

  out = pl.pallas_call(
      kernel,
      out_shape=out_struct((mp, np_), out_dtype, *args),
      grid=(mp // bs.bm, np_ // bs.bn, up // bs.bku),
      in_specs=in_specs,
      out_specs=o_spec,
      scratch_shapes=[pltpu.VMEM((bs.bm, bs.bn), acc_dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name=f"lowbit_matmul_{layout.fmt}",
  )(*args)
  return out[:m, :n]


# ------------------------------------------------------------------------------------ wrapper
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _lowbit(x_MK, codes_UN, scale_GN, zero_GN, x_scale_M, layout, impl, block_sizes, out_dtype):
  if impl == "xla":
    return lowbit_matmul_reference(x_MK, codes_UN, scale_GN, zero_GN, x_scale_M,
                                   layout).astype(out_dtype)
  if impl in GPU_IMPLS:
    return lowbit_matmul_gpu.lowbit_matmul_gpu(x_MK, codes_UN, scale_GN, zero_GN, x_scale_M,
                                               layout, out_dtype, block_sizes,
                                               impl == "pallas_gpu_interpret")
  return _lowbit_pallas(x_MK, codes_UN, scale_GN, zero_GN, x_scale_M, layout, out_dtype,
                        block_sizes, interpret_params() if impl == "pallas_interpret" else False)


def _lowbit_fwd(x_MK, codes_UN, scale_GN, zero_GN, x_scale_M, layout, impl, block_sizes,
                out_dtype):
  out = _lowbit(x_MK, codes_UN, scale_GN, zero_GN, x_scale_M, layout, impl, block_sizes,
                out_dtype)
  return out, (x_MK, codes_UN, scale_GN, zero_GN, x_scale_M)


def _lowbit_bwd(layout, impl, block_sizes, out_dtype, res, g):
  x_MK, codes_UN, scale_GN, zero_GN, x_scale_M = res
  floats = jnp.issubdtype(x_MK.dtype, jnp.floating)

  def ref(x, s):
    return lowbit_matmul_reference(x if floats else x_MK, codes_UN, s, zero_GN, x_scale_M, layout)

  _, vjp = jax.vjp(ref, x_MK.astype(jnp.float32) if floats else jnp.zeros(()), scale_GN)
  dx, ds = vjp(g.astype(jnp.float32))
  dx = dx.astype(x_MK.dtype) if floats else None
  return dx, None, ds.astype(scale_GN.dtype), None, None


_lowbit.defvjp(_lowbit_fwd, _lowbit_bwd)


@functools.partial(jax.jit, static_argnames=("layout", "impl", "block_sizes", "out_dtype"))
def lowbit_matmul(x, codes_UN, scale_GN, zero_GN=None, x_scale=None, *, layout: Layout,
                  impl: str = "xla",
                  block_sizes: BlockSizes | lowbit_matmul_gpu.BlockSizes | None = None,
                  out_dtype=None):
  """`x [..., K] @ W[K, N]` for a packed W (see the module docstring for the layout).

  x: float32 / bfloat16, or int8 with `x_scale [...]` (per token; x is `x_int * x_scale`).
  Returns [..., N] in `out_dtype` (default: x's dtype, float32 for int8 inputs).
  Differentiable in x (float) and `scale_GN`; codes and zero points are constants.
  `impl`: "xla", "pallas" (TPU), "pallas_gpu" (GPU, `lowbit_matmul_gpu`), or
  "pallas_interpret" / "pallas_gpu_interpret" (those kernels on CPU). `block_sizes`: the
  kernel's dataclass (`BlockSizes` for TPU, `lowbit_matmul_gpu.BlockSizes` for GPU); None:
  defaults for the shape.
  """
  check_impl(impl)
  check_backend(impl)
  check_block_sizes(block_sizes, impl, BlockSizes, lowbit_matmul_gpu.BlockSizes)
  k, n = layout.k, codes_UN.shape[-1]
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} features but the packed weight has K = {k}.")
  if codes_UN.shape[0] != layout.units or codes_UN.dtype != jnp.uint8:
    raise ValueError(f"codes must be uint8 [{layout.units}, N] for K = {k} in format "
                     f"{layout.fmt!r}; got {codes_UN.dtype} {codes_UN.shape}.")
  ng = k // layout.group_size
  if scale_GN.shape != (ng, n) or (zero_GN is not None and zero_GN.shape != (ng, n)):
    raise ValueError(f"scale (and zero) must be [{ng}, {n}] (groups of {layout.group_size}); "
                     f"got {scale_GN.shape}" + ("" if zero_GN is None else f", {zero_GN.shape}"))
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  if integer != (x_scale is not None) or (integer and x.dtype != jnp.int8):
    raise ValueError("Integer activations must be int8 and come with a per-token x_scale; "
                     f"float activations come without one (got {x.dtype}, x_scale "
                     f"{'given' if x_scale is not None else 'None'}).")
  if x_scale is not None and x_scale.shape != x.shape[:-1]:
    raise ValueError(f"x_scale must have shape {x.shape[:-1]} (one per token), got "
                     f"{x_scale.shape}.")
  out_dtype = out_dtype or (jnp.float32 if integer else x.dtype)
  lead = x.shape[:-1]
  m = math.prod(lead)
  out = _lowbit(x.reshape(m, k), codes_UN, scale_GN, zero_GN,
                None if x_scale is None else x_scale.reshape(m), layout, impl, block_sizes,
                jnp.dtype(out_dtype))
  return out.reshape(*lead, n)

"""Activations times packed low-bit weights as a GPU (Pallas Triton) kernel.

Called through `pallas_kernels.lowbit_matmul.lowbit_matmul(..., impl="pallas_gpu")` (or
"pallas_gpu_interpret" on CPU), which holds the jitted wrapper, the input checks, the custom VJP
and the reference this kernel is tested against; the packed layout and `Layout` are described
there. Formats: 1-bit, ternary, 2-bit, 4-bit and 8-bit codes; per-output-channel or per-group
scales, optional zero points; float32 / bfloat16 activations, or int8 activations with a
per-token scale (int32 accumulation).

Grid (M / bm, N / bn, split_k); each program loops over its share of K, `bku` code bytes (`bku *
per` rows of K) a step. A step loads a [bku, bn] tile of code bytes, unpacks the `per` codes of
each byte with shifts and masks (ternary: integer division by powers of 3) into values
`v = alpha c + beta` (see `_codes`: signed codes for the dots, `1 + c / 2^bits` floats built by
bit operations for the float GEMV), and multiplies each against the activation columns it meets
— read straight from x[M, K] with a stride of `per` (no permuted copy of x) — accumulating in
f32 (int32 for int8 activations). The weight is never dequantised in memory and the scales
(and alpha, beta) are applied per step or once at the end, never per element:

- Per-channel scales: `y = P_n (x . c') + Q_n rowsum(x)` with `P = b s`, `Q = (a + b off - z) s`
  for the affine codebook `a + b code` and zero point z; the row sums come from the same tiles.
- Per-group scales: a step never straddles a group (`bku` divides the group's bytes), so each
  step adds `P_g (x . c') + Q_g rowsum_step(x)` with the group's P, Q.

Two ways to multiply, picked by `bm`:

- bm = 1 (GEMV, the memory-bound M = 1 decode step): each program owns one row of x; products
  and sums on the CUDA cores, `sum_k x[k] c'[k, n]` (a multiply and a column reduction of the
  [bku, bn] tile).
- bm >= 16 (GEMM): tensor-core dots `x_tile [bm, bku] @ c' [bku, bn]`: bf16 x bf16 -> f32 (codes
  are exact in bf16; float32 activations are split into three bf16 terms, f32 accuracy), or
  int8 x int8 -> int32.

split_k > 1 splits K over programs (more programs for a small N at M = 1); the partial results,
each already scaled, are written in f32 and summed by XLA. Inputs are zero-padded to whole
blocks (pick K, N multiples of the blocks to avoid copying the weight); with split_k = 1 and no
padding the wrapper is one kernel launch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import next_pow2, out_struct, pad2, pow2_divisor, round_up
from pallas_kernels.hadamard_gpu import MIN_DOT, bf16_parts

if TYPE_CHECKING:
  from pallas_kernels.lowbit_matmul import Layout


def _pow2(v: int) -> bool:
  return v >= 1 and not v & (v - 1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """bm: rows of x per program, 1 (GEMV on CUDA cores) or a power of two >= 16 (tensor-core
  dots); bn: output columns per program; bku: code bytes along K per loop step (K per step =
  bku * codes per byte; shrunk to fit a scale group); split_k: programs along K; num_warps,
  num_stages: Triton launch parameters. bn and bku are powers of two >= 16."""
  bm: int = 16
  bn: int = 64
  bku: int = 64
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    if self.bm != 1 and (self.bm < MIN_DOT or not _pow2(self.bm)):
      raise ValueError(f"BlockSizes.bm={self.bm} must be 1 (GEMV) or a power of two >= "
                       f"{MIN_DOT} (tensor-core dot rows).")
    for name in ("bn", "bku"):
      v = getattr(self, name)
      if v < MIN_DOT or not _pow2(v):
        raise ValueError(f"BlockSizes.{name}={v} must be a power of two >= {MIN_DOT} "
                         "(Triton tensor sizes are powers of two).")
    if self.split_k < 1 or not _pow2(self.num_warps) or self.num_stages < 1:
      raise ValueError(f"split_k={self.split_k} and num_stages={self.num_stages} must be >= 1 "
                       f"and num_warps={self.num_warps} a power of two.")

  @classmethod
  def for_shape(cls, m: int, n: int, units: int) -> "BlockSizes":
    """Defaults: GEMV (bm = 1) for one row, else dots of up to 64 rows; bn 64, bku 128 / 64
    (shrunk to the problem); split_k so that there are about 128 programs or more."""
    bm = 1 if m == 1 else min(64, max(MIN_DOT, next_pow2(m)))
    bn = min(64, max(MIN_DOT, next_pow2(n)))
    bku = min(128 if bm == 1 else 64, max(MIN_DOT if bm == 1 else 2 * MIN_DOT,
                                          next_pow2(units)))
    programs = (m if bm == 1 else -(-m // bm)) * -(-n // bn)
    split = 1
    while programs * split < 128 and units >= 4 * bku * split * 2 and split < 8:
      split *= 2
    return cls(bm=bm, bn=bn, bku=bku, split_k=split)


ONE_F32 = 0x3F800000  # the bits of 1.0f


def _value_map(layout: Layout, mode: str) -> tuple[float, float]:
  """(alpha, beta) of the values v = alpha c + beta that `_codes` makes in `mode`."""
  return {"float": (2.0 ** -(layout.bits or 2), 1.0), "int": (1.0, 0.0),
          "dot": (1.0, float(-layout.offset))}[mode]


def _codes(c_i32, layout: Layout, mode: str) -> list[jax.Array]:
  """int32 bytes [bku, bn] -> the `per` value tiles v = alpha c + beta (`_value_map`).

  mode "dot": signed int32 codes c - off (alpha 1, beta -off; exact in bf16 and int8).
  mode "int": the raw codes (GEMV with int8 activations, int32 arithmetic).
  mode "float": float32 `1 + c / 2^w` (w = code bits; 2 for base-3 digits) made by writing the
    code into the top of 1.0's mantissa with a shift, a mask and an or, then a bitcast (alpha
    2^-w, beta 1): exact, and it spares the GEMV an int-to-float conversion per weight (a
    quarter-rate instruction on NVIDIA GPUs). The epilogue removes beta with the row sums; the
    difference loses about a bit to cancellation, not more (both sums are of the same size).
  """
  bits, per = layout.bits, layout.per
  if bits:
    mask = 2 ** bits - 1
    if mode == "float":  # (c >> bits i) & mask, shifted to the mantissa's top w bits
      fields = [((c_i32 << (23 - bits * (i + 1))) & (mask << (23 - bits))) | ONE_F32
                for i in range(per)]
    else:
      fields = [(c_i32 >> (bits * i)) & mask for i in range(per)]
  else:  # base 3
    fields = [jax.lax.rem(jax.lax.div(c_i32, 3 ** i), 3) for i in range(per)]
    if mode == "float":
      fields = [(d << 21) | ONE_F32 for d in fields]
  if mode == "float":
    return [jax.lax.bitcast_convert_type(f, jnp.float32) for f in fields]
  if mode == "int":
    return fields
  return [f - layout.offset for f in fields]


def _mma(x, c, integer: bool):
  """x [bm, bku] (f32 / bf16 / f16 / int8) @ c' [bku, bn] on the tensor cores, f32 or int32."""
  if integer:
    return jnp.dot(x, c.astype(jnp.int8), preferred_element_type=jnp.int32)
  if x.dtype == jnp.float32:
    cb = c.astype(jnp.bfloat16)
    return functools.reduce(jnp.add, [jnp.dot(p, cb, preferred_element_type=jnp.float32)
                                      for p in bf16_parts(x, 3)])
  return jnp.dot(x, c.astype(x.dtype), preferred_element_type=jnp.float32)


def _kernel(x_ref, c_ref, s_ref, *refs, layout: Layout, bku: int, steps: int, split_units: int,
            group_units: int | None, has_zero: bool, has_xs: bool):
  """x_ref: [Ks] (GEMV) or [bm, Ks] activations of this split (Ks = split_units * per);
  c_ref: [split_units, bn] uint8; s_ref (and z_ref): [groups, bn]; xs_ref: [1] or [bm, 1];
  o_ref: [bn] or [bm, bn] (a leading split axis squeezed)."""
  z_ref = refs[0] if has_zero else None
  xs_ref = refs[int(has_zero)] if has_xs else None
  o_ref = refs[-1]
  gemv = len(x_ref.shape) == 1
  integer = x_ref.dtype == jnp.int8
  per = layout.per
  a, b = layout.affine
  shift = a + b * layout.offset
  cdt = jnp.int32 if integer else jnp.float32
  bn = c_ref.shape[-1]
  rows = () if gemv else (x_ref.shape[0],)
  split_start = pl.program_id(2) * split_units  # (read outside the loop: interpret mode)

  mode = "dot" if not gemv else "int" if integer else "float"
  alpha, beta = _value_map(layout, mode)

  def affine(g):
    """(P', Q') with y = P' (x . v) + Q' rowsum(x) for this group's codes v = alpha c + beta:
    x . c' = (x . v - beta rowsum) / alpha - off rowsum, y = P (x . c') + Q rowsum."""
    s = s_ref[g, :].astype(jnp.float32)
    q = shift * s if z_ref is None else (shift - z_ref[g, :].astype(jnp.float32)) * s
    p = b * s
    return p * (1.0 / alpha), q - p * (beta / alpha + layout.offset)

  def body(t, carry):
    acc, rs = carry
    start = pl.multiple_of(t * bku, bku)
    c = c_ref[pl.ds(start, bku), :].astype(jnp.int32)
    part, rsum = None, None
    for i, ci in enumerate(_codes(c, layout, mode)):
      cols = pl.ds(per * start + i, bku, stride=per) if per > 1 else pl.ds(start, bku)
      if gemv:
        xi = x_ref[cols].astype(cdt)  # [bku]
        pi, ri = jnp.sum(xi[:, None] * ci, axis=0), jnp.sum(xi)
      else:
        xi = x_ref[:, cols]  # [bm, bku]
        pi, ri = _mma(xi, ci, integer), jnp.sum(xi.astype(cdt), axis=1)
      part = pi if part is None else part + pi
      rsum = ri if rsum is None else rsum + ri
    if group_units is None:
      return acc + part, rs + rsum
    p, q = affine((split_start + start) // group_units)
    if gemv:
      return acc + p * part.astype(jnp.float32) + q * rsum.astype(jnp.float32), rs
    return (acc + p[None, :] * part.astype(jnp.float32)
            + rsum.astype(jnp.float32)[:, None] * q[None, :], rs)

  acc_dtype = cdt if group_units is None else jnp.float32
  init = (jnp.zeros((*rows, bn), acc_dtype), jnp.zeros(rows, cdt))
  acc, rs = jax.lax.fori_loop(0, steps, body, init)
  if group_units is None:
    p, q = affine(0)
    acc = acc.astype(jnp.float32)
    rs = rs.astype(jnp.float32)
    y = p * acc + q * rs if gemv else p[None, :] * acc + rs[:, None] * q[None, :]
  else:
    y = acc
  if xs_ref is not None:
    y = y * xs_ref[...]
  o_ref[...] = y.astype(o_ref.dtype)


def lowbit_matmul_gpu(x_MK, codes_UN, scale_GN, zero_GN, x_scale_M, layout: Layout, out_dtype,
                      block_sizes: BlockSizes | None, interpret: bool) -> jax.Array:
  """[M, K] x packed [K, N] -> [M, N] in out_dtype (inputs validated by the caller)."""
  m, n = x_MK.shape[0], codes_UN.shape[1]
  per, units = layout.per, layout.units
  bs = block_sizes or BlockSizes.for_shape(m, n, units)
  gemv = bs.bm == 1
  grouped = layout.group_size != layout.k
  bku, group_units = bs.bku, None
  if grouped:
    if layout.group_size % per:
      raise ValueError(f"group_size {layout.group_size} must be a multiple of the {per} codes "
                       f"per byte of format {layout.fmt!r} for the kernel.")
    group_units = layout.group_size // per
    bku = min(bku, pow2_divisor(group_units))
    if not gemv and bku < MIN_DOT:
      raise ValueError(
          f"A scale group of {layout.group_size} weights is {group_units} bytes of format "
          f"{layout.fmt!r}; the GPU kernel's tensor-core path (bm >= 16) steps through K in "
          f"power-of-two byte counts >= {MIN_DOT} that divide a group. Use a group size that "
          f"is a multiple of {MIN_DOT * per}, block_sizes with bm=1 (GEMV), or impl='xla'.")
  integer = x_scale_M is not None
  if integer and not gemv and bku < 2 * MIN_DOT:
    raise ValueError(f"int8 tensor-core dots need at least {2 * MIN_DOT} code bytes per step; "
                     f"got bku={bku}" + (f" (a group is {group_units} bytes)" if grouped else "")
                     + ": raise BlockSizes.bku, use bm=1 (GEMV) or float activations.")
  split = bs.split_k
  up = round_up(units, split * bku)
  split_units = up // split
  mp = m if gemv else round_up(m, bs.bm)
  np_ = round_up(n, bs.bn)
  groups = -(-up // group_units) if grouped else 1

  args = [pad2(x_MK, mp, up * per), pad2(codes_UN, up, np_), pad2(scale_GN, groups, np_)]
  row = (None,) if gemv else (bs.bm,)
  specs = [pl.BlockSpec((*row, split_units * per), lambda i, j, s: (i, s)),
           pl.BlockSpec((split_units, bs.bn), lambda i, j, s: (s, j)),
           pl.BlockSpec((groups, bs.bn), lambda i, j, s: (0, j))]
  if zero_GN is not None:
    args.append(pad2(zero_GN, groups, np_))
    specs.append(specs[-1])
  if integer:
    args.append(pad2(x_scale_M.astype(jnp.float32).reshape(m, 1), mp, 1))
    specs.append(pl.BlockSpec((*row, 1), lambda i, j, s: (i, 0)))
  if split == 1:
    out_shape = out_struct((mp, np_), out_dtype, *args)
    out_spec = pl.BlockSpec((*row, bs.bn), lambda i, j, s: (i, j))
  else:
    out_shape = out_struct((split, mp, np_), jnp.float32, *args)
    out_spec = pl.BlockSpec((None, *row, bs.bn), lambda i, j, s: (s, i, j))
  kernel = functools.partial(
      _kernel, layout=layout, bku=bku, steps=split_units // bku, split_units=split_units,
      group_units=group_units, has_zero=zero_GN is not None, has_xs=integer)
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(mp // (1 if gemv else bs.bm), np_ // bs.bn, split),
      in_specs=specs,
      out_specs=out_spec,
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name=f"lowbit_matmul_gpu_{layout.fmt}",
  )(*args)
  if split > 1:
    out = jnp.sum(out, axis=0).astype(out_dtype)
  return out[:m, :n]

"""Fake-quantizers with custom VJPs: ParetoQ, QuEST, BitNet b1.58, min-max and abs-max.

Convention: every quantizer reduces over the LAST axis of its input. A weight `kernel[K, O]` is
quantized as `w[O, NG, G]` (per output row, `NG` groups of `G` along the contraction axis; one
group of `K` is "per row"); an activation `x[..., K]` per token (optionally grouped the same way).
Scales therefore have the input's shape with the last axis set to 1.

Every quantizer has one encoder, `*_codes`, returning `Codes(codes, scale, zero, codebook)`; the
fake-quant forward value is exactly `decode(codes)`, so packed inference (`jaxllm.quant.packing`)
reproduces the fake-quant model. Backward passes follow the authors' code:

- ParetoQ (facebookresearch/ParetoQ, models/utils_quant.py): `LsqBinaryTernaryExtension` for 1, 3
  and 4 bits and `StretchedElasticQuant` (SEQ) for ternary and 2 bits, learned scale `alpha` with
  the LSQ gradient scale `1/sqrt(numel(W) * Qp)` (`1/sqrt(numel(W))` for SEQ).
- QuEST (IST-DASLab/QuEST, base_linear.py): RMS-normalised centred grid with the Gaussian
  MSE-optimal scale and the trust-estimator mask on the gradient. The scale has no gradient.
- BitNet b1.58: absmean ternary weights, straight-through; abs-max int8 activations per token.
- min-max (asymmetric) and abs-max (symmetric) round-to-nearest baselines, straight-through.
- MatQuant: r-bit slices of one int8 min-max parent code, straight-through.

`bits` is 1, 1.58 (ternary), 2, ..., 8.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

TERNARY = 1.58
_EPS = 1e-5  # ParetoQ clamps alpha to at least this; BitNet adds it to gamma
SEQ_CLIP = 0.99  # ParetoQ's `clip_val = 1 - 1e-2`


def num_levels(bits: float) -> int:
  return 3 if bits == TERNARY else 2 ** int(bits)


class Codes(NamedTuple):
  """Integer codes in `[0, len(codebook))` and their affine map `(codebook[c] - zero) * scale`."""

  codes: jax.Array  # int32, the input's shape
  scale: jax.Array  # input's shape with the last axis 1
  zero: jax.Array | None  # min-max only, same shape as scale
  codebook: tuple[float, ...]  # static


def decode(c: Codes, dtype=jnp.float32) -> jax.Array:
  table = jnp.asarray(c.codebook, jnp.float32)
  v = table[c.codes]
  if c.zero is not None:
    v = v - c.zero
  return (v * c.scale).astype(dtype)


# ------------------------------------------------------------------------------ QuEST / Gaussian
# MSE-optimal half-range alpha (in units of sigma) of the grid linspace(-alpha, alpha, levels) for
# N(0, 1) (QuEST notebooks/mse_fitting.ipynb; reproduced by `optimal_gaussian_alpha` in the tests).
GAUSSIAN_ALPHA = {1: 0.79788, TERNARY: 1.22401, 2: 1.49353, 3: 2.05107, 4: 2.51393, 5: 2.91609,
                  6: 3.27660, 7: 3.60105}


def _phi(x):
  return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x):
  return 0.5 * math.erfc(-x / math.sqrt(2))


def gaussian_grid_mse(alpha: float, levels: int) -> float:
  """Closed-form E[(x - q(x))^2], x ~ N(0, 1), q = nearest point of linspace(-alpha, alpha, levels).

  Cell [a, b] with level l contributes int (x - l)^2 phi = [Phi - x phi]_a^b
  - 2 l [-phi]_a^b + l^2 [Phi]_a^b.
  """
  lv = np.linspace(-alpha, alpha, levels)
  edges = [-math.inf, *((lv[:-1] + lv[1:]) / 2), math.inf]
  total = 0.0
  for l, a, b in zip(lv, edges[:-1], edges[1:]):
    pa, pb = (_phi(a) if math.isfinite(a) else 0.0), (_phi(b) if math.isfinite(b) else 0.0)
    xa = a * pa if math.isfinite(a) else 0.0
    xb = b * pb if math.isfinite(b) else 0.0
    mass = _cdf(b) - _cdf(a)
    total += (mass - (xb - xa)) - 2 * l * (pa - pb) + l * l * mass
  return total


@functools.cache
def optimal_gaussian_alpha(bits: float) -> float:
  """argmin_alpha gaussian_grid_mse(alpha, levels(bits)) by golden-section search."""
  n = num_levels(bits)
  lo, hi = 0.05, 8.0
  g = (math.sqrt(5) - 1) / 2
  a, b = hi - g * (hi - lo), lo + g * (hi - lo)
  fa, fb = gaussian_grid_mse(a, n), gaussian_grid_mse(b, n)
  for _ in range(200):
    if fa < fb:
      hi, b, fb = b, a, fa
      a = hi - g * (hi - lo)
      fa = gaussian_grid_mse(a, n)
    else:
      lo, a, fa = a, b, fb
      b = lo + g * (hi - lo)
      fb = gaussian_grid_mse(b, n)
  return (lo + hi) / 2


def quest_alpha(bits: float) -> float:
  return GAUSSIAN_ALPHA[bits] if bits in GAUSSIAN_ALPHA else optimal_gaussian_alpha(bits)


def quest_codes(x: jax.Array, bits: float) -> Codes:
  """Centred grid of `levels` points on [-s, s], s = alpha_b * rms(x) over the last axis.

  Even level counts have no zero (QuEST's `round(clip(x, -s, s) / D + 1/2) * D - D/2`); ternary
  is {-a, 0, a} * sigma with a = 1.2240.
  """
  n = num_levels(bits)
  x = x.astype(jnp.float32)
  sigma = jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True)) + 1e-8
  s = quest_alpha(bits) * sigma
  codes = jnp.clip(jnp.round((x / s + 1) * ((n - 1) / 2)), 0, n - 1).astype(jnp.int32)
  codebook = tuple(float(2 * i / (n - 1) - 1) for i in range(n))
  return Codes(codes, s, None, codebook)


def quest_trust_mask(x: jax.Array, bits: float, trust_scale: float = 1.0) -> jax.Array:
  """1 where |q(x) - x| <= trust_scale * half a grid step (QuEST's trust estimator), else 0."""
  c = quest_codes(x, bits)
  half_step = c.scale / (num_levels(bits) - 1)
  return (jnp.abs(decode(c) - x) <= trust_scale * half_step).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def quest_quantize(x: jax.Array, bits: float, trust_scale: float | None = 1.0) -> jax.Array:
  """QuEST forward q(x); backward g * trust_mask (plain STE when `trust_scale` is None)."""
  return decode(quest_codes(x, bits), x.dtype)


def _quest_fwd(x, bits, trust_scale):
  mask = None if trust_scale is None else quest_trust_mask(x, bits, trust_scale)
  return decode(quest_codes(x, bits), x.dtype), mask


def _quest_bwd(bits, trust_scale, mask, g):
  return (g if mask is None else g * mask,)


quest_quantize.defvjp(_quest_fwd, _quest_bwd)


# ------------------------------------------------------------------------------------------ ParetoQ
def _paretoq_consts(bits: float):
  """(kind, Qn, Qp, n_levels, shift) as in ParetoQ's code (w_bits 0 == ternary)."""
  if bits == 1:
    return "binary", -1.0, 1.0, None, None
  if bits == TERNARY:
    n, shift = 1.5, 0.0
    return "seq", -(n - shift) / n, (n - shift) / n, n, shift
  if bits == 2:
    n, shift = 2.0, 0.5
    return "seq", -(n - shift) / n, (n - shift) / n, n, shift
  if bits in (3, 4):
    return "lsq", -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1, None, None
  raise ValueError(f"ParetoQ supports bits 1, {TERNARY} (ternary), 2, 3, 4; got {bits}.")


def paretoq_init_scale(w: jax.Array, bits: float) -> jax.Array:
  """The authors' init over the last axis: mean|W| (1 bit), max|W| (ternary, 2 bits),
  max|W| / (2^(b-1) - 1) (3, 4 bits)."""
  kind, *_ = _paretoq_consts(bits)
  a = jnp.abs(w.astype(jnp.float32))
  if kind == "binary":
    return jnp.mean(a, axis=-1, keepdims=True)
  if kind == "seq":
    return jnp.max(a, axis=-1, keepdims=True)
  return jnp.max(a, axis=-1, keepdims=True) / (2 ** (bits - 1) - 1)


def paretoq_codes(w: jax.Array, alpha: jax.Array, bits: float) -> Codes:
  kind, qn, qp, n, shift = _paretoq_consts(bits)
  alpha = jnp.maximum(alpha.astype(jnp.float32), _EPS)
  x = w.astype(jnp.float32) / alpha
  if kind == "binary":  # alpha * sign(W); sign(0) taken as +1 (measure zero)
    return Codes((x >= 0).astype(jnp.int32), alpha, None, (-1.0, 1.0))
  if kind == "seq":  # (round(clip(x, -c, c) * n - shift) + shift) / n
    k = jnp.round(jnp.clip(x, -SEQ_CLIP, SEQ_CLIP) * n - shift)
    kmin = round(-SEQ_CLIP * n - shift)
    levels = range(kmin, round(SEQ_CLIP * n - shift) + 1)
    return Codes((k - kmin).astype(jnp.int32), alpha, None,
                 tuple((j + shift) / n for j in levels))
  k = jnp.clip(jnp.round(x), qn, qp)
  return Codes((k - qn).astype(jnp.int32), alpha, None,
               tuple(float(j) for j in range(int(qn), int(qp) + 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def paretoq_quantize(w: jax.Array, alpha: jax.Array, bits: float, numel: int) -> jax.Array:
  """ParetoQ fake-quant of `w` with learned scale `alpha` (shape of `w`, last axis 1).

  `numel` is the element count of the whole weight matrix (the LSQ gradient scale uses it even
  when scales are per group).
  """
  return decode(paretoq_codes(w, alpha, bits), w.dtype)


def _paretoq_fwd(w, alpha, bits, numel):
  return paretoq_quantize(w, alpha, bits, numel), (w, alpha)


def _paretoq_bwd(bits, numel, res, g):
  w, alpha = res
  kind, qn, qp, n, shift = _paretoq_consts(bits)
  a = jnp.maximum(alpha.astype(jnp.float32), _EPS)
  x = w.astype(jnp.float32) / a
  g32 = g.astype(jnp.float32)
  if kind == "seq":
    lo, hi = x < -SEQ_CLIP, x > SEQ_CLIP
    gs = 1.0 / math.sqrt(numel)
    q = (jnp.round(jnp.clip(x, -SEQ_CLIP, SEQ_CLIP) * n - shift) + shift) / n
  else:
    lo, hi = x < qn, x > qp
    gs = 1.0 / math.sqrt(numel * qp)
    q = jnp.round(x)
  mid = ~(lo | hi)
  if kind == "binary":
    da = jnp.sign(w.astype(jnp.float32)) * g32
  else:
    da = jnp.where(lo, qn, jnp.where(hi, qp, q - x)) * g32
  grad_alpha = (jnp.sum(da, axis=-1, keepdims=True) * gs).astype(alpha.dtype)
  grad_w = jnp.where(mid, g, jnp.zeros_like(g)).astype(w.dtype)
  return grad_w, grad_alpha


paretoq_quantize.defvjp(_paretoq_fwd, _paretoq_bwd)


def paretoq_pass_mask(w: jax.Array, alpha: jax.Array, bits: float) -> jax.Array:
  """Where ParetoQ's weight gradient passes (|W/alpha| within the clip range)."""
  kind, qn, qp, *_ = _paretoq_consts(bits)
  x = w / jnp.maximum(alpha, _EPS)
  if kind == "seq":
    return (jnp.abs(x) <= SEQ_CLIP).astype(w.dtype)
  return ((x >= qn) & (x <= qp)).astype(w.dtype)


# --------------------------------------------------------------------- BitNet, min-max, abs-max
def _reduce_axes(x, per_tensor):
  return tuple(range(x.ndim)) if per_tensor else (-1,)


def bitnet_codes(w: jax.Array, per_tensor: bool = True) -> Codes:
  """BitNet b1.58: clamp(round(W / (gamma + eps)), -1, 1) * gamma, gamma = mean|W|."""
  w = w.astype(jnp.float32)
  gamma = jnp.mean(jnp.abs(w), axis=_reduce_axes(w, per_tensor), keepdims=True)
  gamma = jnp.broadcast_to(gamma, (*w.shape[:-1], 1))
  k = jnp.clip(jnp.round(w / (gamma + _EPS)), -1, 1)
  return Codes((k + 1).astype(jnp.int32), gamma, None, (-1.0, 0.0, 1.0))


def absmax_codes(x: jax.Array, bits: float, per_tensor: bool = False) -> Codes:
  """Symmetric round-to-nearest: scale = max|x| / (2^(b-1) - 1), 2^b - 1 levels (BitNet's int8
  activations with b = 8)."""
  qp = 2 ** (int(bits) - 1) - 1
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=_reduce_axes(x, per_tensor), keepdims=True)
  scale = jnp.broadcast_to(jnp.maximum(amax, 1e-8) / qp, (*x.shape[:-1], 1))
  k = jnp.clip(jnp.round(x / scale), -qp, qp)
  return Codes((k + qp).astype(jnp.int32), scale, None, tuple(float(j) for j in range(-qp, qp + 1)))


def minmax_codes(x: jax.Array, bits: float, per_tensor: bool = False) -> Codes:
  """Asymmetric round-to-nearest: scale = (max - min) / (2^b - 1), integer zero point."""
  top = 2 ** int(bits) - 1
  x = x.astype(jnp.float32)
  axes = _reduce_axes(x, per_tensor)
  lo = jnp.minimum(jnp.min(x, axis=axes, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(x, axis=axes, keepdims=True), 0.0)
  scale = jnp.broadcast_to(jnp.maximum(hi - lo, 1e-8) / top, (*x.shape[:-1], 1))
  zero = jnp.round(-jnp.broadcast_to(lo, scale.shape) / scale)
  k = jnp.clip(jnp.round(x / scale) + zero, 0, top)
  return Codes(k.astype(jnp.int32), scale, zero, tuple(float(j) for j in range(top + 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def ste_quantize(x: jax.Array, method: str, bits: float, per_tensor: bool = False) -> jax.Array:
  """Round-to-nearest fake-quant ("bitnet", "absmax", "minmax") with a straight-through
  (identity) gradient, as BitNet's `x + stop_gradient(q - x)`."""
  return decode(ste_codes(x, method, bits, per_tensor), x.dtype)


def matquant_codes(x: jax.Array, bits: int, parent_bits: int = 8,
                   per_tensor: bool = False) -> Codes:
  """MatQuant: the `bits`-wide slice of the `parent_bits` min-max code, dequantized with the
  parent's scale and zero point: S(q, r) = clamp(round(q / 2^(c-r)), 0, 2^r - 1) * 2^(c-r).

  Rounding is half-up (floor(v + 1/2)), which gives the reference's non-associativity example
  S(S(24, 4), 2) = 64 != S(24, 2) = 0 (half-to-even would give 0 for both).
  """
  parent = minmax_codes(x, parent_bits, per_tensor)
  step = 2 ** (parent_bits - int(bits))
  k = slice_codes(parent.codes, int(bits), parent_bits) // step
  return Codes(k, parent.scale, parent.zero,
               tuple(float(j * step) for j in range(2 ** int(bits))))


def slice_codes(q: jax.Array, bits: int, parent_bits: int = 8) -> jax.Array:
  """S(q, r) on integer parent codes (returns codes in the parent's units, multiples of 2^(c-r))."""
  step = 2 ** (parent_bits - bits)
  k = jnp.clip(jnp.floor(q.astype(jnp.float32) / step + 0.5), 0, 2 ** bits - 1)
  return (k * step).astype(jnp.int32)


def ste_codes(x, method, bits, per_tensor=False) -> Codes:
  if method == "matquant":
    return matquant_codes(x, bits, 8, per_tensor)
  if method == "bitnet":
    return bitnet_codes(x, per_tensor)
  if method == "absmax":
    return absmax_codes(x, bits, per_tensor)
  if method == "minmax":
    return minmax_codes(x, bits, per_tensor)
  raise ValueError(f"Unknown straight-through method {method!r}.")


ste_quantize.defvjp(lambda x, m, b, p: (ste_quantize(x, m, b, p), None),
                    lambda m, b, p, _, g: (g,))

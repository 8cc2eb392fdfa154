"""Adaptive-LayerNorm transformer blocks for next-scale prediction (VAR, Tian et al., 2024).

Follows FoundationVision/VAR models/basic_var.py: a condition vector (class embedding) sets
per-block gains, scales and shifts, (g1, g2, s1, s2, b1, b2) = Linear(SiLU(cond));
x += g1 * Attn(LN(x)(1 + s1) + b1); x += g2 * FFN(LN(x)(1 + s2) + b2), LN without affine.

`ScaleAttention` is its own attention: q and k are L2-normalised with a learnable per-head scale
(init 4, clamped at 100; without the norm VAR scales scores by 0.25 / sqrt(d_h)), biases on
q and v only, and optional 2-D rotary angles (VARSR's SA-RoPE,
`jaxllm.nn.rope2d`) applied after the normalisation. Without a cache it applies the block-causal
mask from level ids (a scale attends to itself and every coarser scale); with a `KVCache` the new
keys are appended and the queries see every filled slot, which is the same mask when one whole
scale is fed per call, as next-scale generation does.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.nn.attention import KVCache, MaskKind, attention_mask


def _dense(features: int, axes: tuple[str | None, str | None], std: float, name: str,
           use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, name=name,
                  kernel_init=nn.with_logical_partitioning(
                      nn.initializers.truncated_normal(std), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def rotate_half(x_BLNH: Float[Array, "B L N H"], angles_BLF: Float[Array, "B L F"]):
  """Rotates the halves (x1, x2) of each head by `angles` (F = H / 2), as `jaxllm.nn.rope`."""
  cos = jnp.cos(angles_BLF)[:, :, None, :]
  sin = jnp.sin(angles_BLF)[:, :, None, :]
  x1, x2 = jnp.split(x_BLNH, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class ScaleAttention(nn.Module):
  """Multi-head self-attention with L2-normalised q/k, a block-causal mask and a KV cache."""

  num_heads: int
  l2_norm: bool = True
  init_std: float = 0.02
  out_std: float = 0.02

  @nn.compact
  def __call__(self, x_BLD: Float[Array, "B L D"], level_BL: Int[Array, "B L"] | None = None,
               cache: KVCache | None = None, angles_BLF: Float[Array, "B L F"] | None = None):
    B, L, D = x_BLD.shape
    N = self.num_heads
    H = D // N
    qkv = _dense(3 * D, ("embed", "heads"), self.init_std, "qkv", use_bias=False)(x_BLD)
    q_bias = self.param("q_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("heads",)), (D,))
    v_bias = self.param("v_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("heads",)), (D,))
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q, v = q + q_bias[None, None, :], v + v_bias[None, None, :]
    q, k, v = (t.reshape(B, L, N, H) for t in (q, k, v))
    if self.l2_norm:
      log_scale = self.param("scale_mul", nn.initializers.constant(math.log(4.0)), (N,))
      scale_N = jnp.exp(jnp.minimum(log_scale, math.log(100.0)))
      q = q * jax.lax.rsqrt(jnp.maximum(jnp.sum(q * q, -1, keepdims=True), 1e-24))
      k = k * jax.lax.rsqrt(jnp.maximum(jnp.sum(k * k, -1, keepdims=True), 1e-24))
      q = q * scale_N[None, None, :, None]
      softmax_scale = 1.0
    else:  # VAR's scale without the L2 norm
      softmax_scale = 0.25 / math.sqrt(H)
    if angles_BLF is not None:
      q, k = rotate_half(q, angles_BLF), rotate_half(k, angles_BLF)

    if cache is None:
      if level_BL is None:
        raise ValueError("ScaleAttention without a cache needs level ids for the block-causal "
                         "mask.")
      k_all, v_all = k, v
      mask_BLS = attention_mask(MaskKind.BLOCK_CAUSAL, level_BL, level_BL, level_BL, level_BL)
      new_cache = None
    else:
      start = cache.length
      k_all = jax.lax.dynamic_update_slice(cache.k_BSKH, k.astype(cache.k_BSKH.dtype),
                                           (0, start, 0, 0))
      v_all = jax.lax.dynamic_update_slice(cache.v_BSKH, v.astype(cache.v_BSKH.dtype),
                                           (0, start, 0, 0))
      new_cache = KVCache(k_all, v_all, start + L)
      S = k_all.shape[1]
      mask_BLS = jnp.broadcast_to((jnp.arange(S) < new_cache.length)[None, None, :], (B, L, S))
    scores = jnp.einsum("blnh,bsnh->bnls", q, k_all.astype(q.dtype)) * softmax_scale
    scores = jnp.where(mask_BLS[:, None], scores, jnp.finfo(scores.dtype).min)
    out = jnp.einsum("bnls,bsnh->blnh", jax.nn.softmax(scores, axis=-1), v_all.astype(q.dtype))
    out = nn.with_logical_constraint(out.reshape(B, L, D), ("batch", "length", "act_heads"))
    return _dense(D, ("heads", "embed"), self.out_std, "proj")(out), new_cache


class AdaLNBlock(nn.Module):
  """VAR's AdaLNSelfAttn: AdaLN-modulated attention and GELU(tanh) FFN with gated residuals."""

  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  l2_norm: bool = True
  init_std: float = 0.02
  out_std: float = 0.02
  init_adaln: float = 0.5  # scales the scale/shift rows of the AdaLN projection at init
  init_adaln_gamma: float = 1e-5  # scales the gain rows (VAR: residual branches start ~off)

  @nn.compact
  def __call__(self, x_BLD: Float[Array, "B L D"], cond_BD: Float[Array, "B D"],
               level_BL=None, cache=None, angles_BLF=None):
    D = x_BLD.shape[-1]
    std = self.init_std

    def ada_init(key, shape, dtype=jnp.float32):
      w = jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * std
      row = jnp.concatenate([jnp.full((2 * D,), self.init_adaln_gamma),
                             jnp.full((4 * D,), self.init_adaln)]).astype(dtype)
      return w * row[None, :]

    ada = nn.Dense(6 * D, name="ada_lin", kernel_init=nn.with_logical_partitioning(
        ada_init, ("embed", "mlp")), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("mlp",)))(nn.silu(cond_BD))
    g1, g2, s1, s2, b1, b2 = (a[:, None, :] for a in jnp.split(ada, 6, axis=-1))
    ln = nn.LayerNorm(epsilon=self.norm_eps, use_bias=False, use_scale=False)
    h, cache = ScaleAttention(self.num_heads, self.l2_norm, std, self.out_std, name="attn")(
        ln(x_BLD) * (1 + s1) + b1, level_BL, cache, angles_BLF)
    x_BLD = x_BLD + h * g1
    hidden = round(D * self.mlp_ratio)
    h = _dense(hidden, ("embed", "mlp"), std, "fc1")(ln(x_BLD) * (1 + s2) + b2)
    h = _dense(D, ("mlp", "embed"), self.out_std, "fc2")(nn.gelu(h, approximate=True))
    x_BLD = x_BLD + h * g2
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed")), cache


class AdaLNBeforeHead(nn.Module):
  """LN(x)(1 + scale) + shift with (scale, shift) = Linear(SiLU(cond))."""

  norm_eps: float = 1e-6
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BLD: Float[Array, "B L D"], cond_BD: Float[Array, "B D"]):
    D = x_BLD.shape[-1]
    ada = _dense(2 * D, ("embed", "mlp"), self.init_std, "ada_lin")(nn.silu(cond_BD))
    scale, shift = (a[:, None, :] for a in jnp.split(ada, 2, axis=-1))
    ln = nn.LayerNorm(epsilon=self.norm_eps, use_bias=False, use_scale=False)
    return ln(x_BLD) * (1 + scale) + shift

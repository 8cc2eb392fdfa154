"""Multi-head latent attention (DeepSeek-V2/V3, arXiv 2405.04434 sec. 2.1, 2412.19437 sec. 2.1).

Queries and keys/values go through low-rank latents, each RMS-normalised:

    c_q = norm(W_dq h)  [q_lora_rank]        q = W_uq c_q -> per head [q_nope (dn) ; q_rope (dr)]
    [c_kv ; k_r] = W_dkv h  [kv_lora_rank + dr]   c_kv <- norm(c_kv)
    [k_nope ; v] = W_ukv c_kv  per head [dn ; dv]  k = [k_nope ; RoPE(k_r)]  (k_r shared by heads)

Scores are scaled by `softmax_scale` (1 / sqrt(dn + dr), times mscale^2 under YaRN, see
`yarn_softmax_scale`). The cache (`MLACache`) holds only c_kv and RoPE(k_r) per token, i.e.
(kv_lora_rank + dr) numbers per token per layer for all heads together.

Two equal ways to attend over that cache:
  naive    expand c_kv to per-head keys/values with W_ukv (the training path);
  absorbed fold W_uk into the query (q_lat = q_nope W_uk, one kv_lora_rank vector per head),
           score against c_kv directly, average c_kv with the probabilities, then apply W_uv:
           never materialises per-head keys or values (the decode path; DeepSeek's
           inference/model.py `attn_impl="absorb"`).

Parameter names follow Hugging Face `DeepseekV3Attention` (`q_a_proj`, `kv_a_proj_with_mqa`,
`kv_b_proj`, ...). Every projection is a 2-D bias-free `dense`, so quantization policies apply;
the absorbed path reads the `kv_b_proj` kernel directly (a policy that replaces that kernel
must also be applied on this path).
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxllm.nn.attention import MaskKind, attention_mask
from jaxllm.nn.linear import dense
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.rope import apply_rope


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_softmax_scale(qk_head_dim: int, factor: float = 1.0, mscale_all_dim: float = 0.0
                       ) -> float:
  """DeepSeek's softmax scale: qk_head_dim^-0.5, times yarn_mscale(factor, mscale_all_dim)^2 when
  YaRN scaling is on (DeepSeek-V3: factor 40, mscale_all_dim 1 -> x 1.874). This is what HF's
  `yarn_apply_mscale` and DeepSeek's inference/model.py do. (YaRN also rescales the RoPE
  frequencies; jaxllm's DeepSeek models support the default RoPE only so far.)"""
  scale = qk_head_dim ** -0.5
  if mscale_all_dim:
    scale *= yarn_mscale(factor, mscale_all_dim) ** 2
  return scale


@flax.struct.dataclass
class MLACache:
  """Compressed cache of one MLA layer: normalised latents and rotated shared RoPE keys."""

  latent_BSC: Float[Array, "B S C"]
  k_rope_BSR: Float[Array, "B S R"]
  length: Int[Array, ""]

  @classmethod
  def empty(cls, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
            dtype=jnp.float32) -> MLACache:
    return cls(jnp.zeros((batch, max_len, kv_lora_rank), dtype),
               jnp.zeros((batch, max_len, rope_dim), dtype), jnp.zeros((), jnp.int32))


class MLA(nn.Module):
  """Multi-head latent attention. `q_lora_rank=None` projects queries directly (V2-Lite)."""

  num_heads: int
  q_lora_rank: int | None
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  inv_freq: tuple[float, ...]  # qk_rope_head_dim // 2 RoPE frequencies
  softmax_scale: float
  norm_eps: float = 1e-6
  mask_kind: MaskKind = MaskKind.CAUSAL
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: Float[Array, "B L D"], positions_BL: Int[Array, "B L"],
               cache: MLACache | None = None, absorb: bool | None = None,
               ) -> tuple[Float[Array, "B L D"], MLACache | None]:
    """`absorb` defaults to True with a cache (decode) and False without (training)."""
    absorb = cache is not None if absorb is None else absorb
    B, L, d_model = x_BLD.shape
    N, dn, dr, dv, C = (self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim,
                        self.v_head_dim, self.kv_lora_rank)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.q_lora_rank is None:
      q_BLF = dense(N * (dn + dr), ("embed", "heads"), name="q_proj", **kw)(x_BLD)
    else:
      cq_BLQ = dense(self.q_lora_rank, ("embed", "q_lora"), name="q_a_proj", **kw)(x_BLD)
      cq_BLQ = RMSNorm(self.norm_eps, self.param_dtype, "q_lora", name="q_a_layernorm")(cq_BLQ)
      q_BLF = dense(N * (dn + dr), ("q_lora", "heads"), name="q_b_proj", **kw)(cq_BLQ)
    q_BLNH = q_BLF.reshape(B, L, N, dn + dr)
    q_nope_BLNK, q_rope_BLNR = q_BLNH[..., :dn], q_BLNH[..., dn:]
    inv_freq = np.asarray(self.inv_freq)
    q_rope_BLNR = apply_rope(q_rope_BLNR, positions_BL, inv_freq)

    ckv_BLE = dense(C + dr, ("embed", "kv_lora"), name="kv_a_proj_with_mqa", **kw)(x_BLD)
    latent_BLC = RMSNorm(self.norm_eps, self.param_dtype, "kv_lora",
                         name="kv_a_layernorm")(ckv_BLE[..., :C])
    k_rope_BLR = apply_rope(ckv_BLE[..., None, C:], positions_BL, inv_freq)[:, :, 0]

    if cache is None:
      latent_BSC, k_rope_BSR, k_pos_BS, new_cache = latent_BLC, k_rope_BLR, positions_BL, None
    else:
      start = cache.length
      latent_BSC = jax.lax.dynamic_update_slice(
          cache.latent_BSC, latent_BLC.astype(cache.latent_BSC.dtype), (0, start, 0))
      k_rope_BSR = jax.lax.dynamic_update_slice(
          cache.k_rope_BSR, k_rope_BLR.astype(cache.k_rope_BSR.dtype), (0, start, 0))
      new_cache = MLACache(latent_BSC, k_rope_BSR, start + L)
      S = latent_BSC.shape[1]
      k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=positions_BL.dtype), (B, S))
    mask_BLS = attention_mask(self.mask_kind, positions_BL, k_pos_BS)
    if cache is not None:  # unwritten slots (and rolled-back drafts) never attend
      mask_BLS &= (k_pos_BS < new_cache.length)[:, None, :]
    latent_BSC = latent_BSC.astype(self.dtype)
    k_rope_BSR = k_rope_BSR.astype(self.dtype)

    kv_b = dense(N * (dn + dv), ("kv_lora", "heads"), name="kv_b_proj", **kw)
    f32 = dict(preferred_element_type=jnp.float32)
    rope_scores_BNLS = jnp.einsum("blnr,bsr->bnls", q_rope_BLNR, k_rope_BSR, **f32)
    if absorb:
      if self.is_initializing():
        kv_b(latent_BLC)  # creates the kernel, which the absorbed path reads directly
      w_CNF = nn.unbox(kv_b.variables["params"]["kernel"]).astype(self.dtype).reshape(
          C, N, dn + dv)
      w_uk_CNK, w_uv_CNV = w_CNF[..., :dn], w_CNF[..., dn:]
      q_lat_BLNC = jnp.einsum("blnk,cnk->blnc", q_nope_BLNK, w_uk_CNK, **f32).astype(self.dtype)
      scores_BNLS = jnp.einsum("blnc,bsc->bnls", q_lat_BLNC, latent_BSC, **f32)
    else:
      kv_BSNF = kv_b(latent_BSC).reshape(B, -1, N, dn + dv)
      k_nope_BSNK, v_BSNV = kv_BSNF[..., :dn], kv_BSNF[..., dn:]
      scores_BNLS = jnp.einsum("blnk,bsnk->bnls", q_nope_BLNK, k_nope_BSNK, **f32)
    scores_BNLS = (scores_BNLS + rope_scores_BNLS) * np.float32(self.softmax_scale)
    scores_BNLS = jnp.where(mask_BLS[:, None], scores_BNLS, jnp.finfo(jnp.float32).min)
    probs_BNLS = jax.nn.softmax(scores_BNLS, axis=-1).astype(self.dtype)
    if absorb:
      o_lat_BLNC = jnp.einsum("bnls,bsc->blnc", probs_BNLS, latent_BSC)
      out_BLNV = jnp.einsum("blnc,cnv->blnv", o_lat_BLNC, w_uv_CNV)
    else:
      out_BLNV = jnp.einsum("bnls,bsnv->blnv", probs_BNLS, v_BSNV)
    out_BLF = nn.with_logical_constraint(out_BLNV.reshape(B, L, N * dv),
                                         ("batch", "length", "act_heads"))
    return dense(d_model, ("heads", "embed"), name="o_proj", **kw)(out_BLF), new_cache

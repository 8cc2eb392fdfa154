"""DeepSeek-V2/V3-style decoder: multi-head latent attention, DeepSeekMoE, sequential MTP.

Layers `0 .. first_k_dense - 1` use a dense SwiGLU, the rest DeepSeekMoE (`jaxllm.nn.moe`).
Attention is MLA (`jaxllm.nn.mla`); the KV cache is a list of compressed `MLACache`, and decoding
uses the absorbed path. `mtp_depth` sequential MTP layers (`jaxllm.models.mtp.MTPLayer`) share the
embedding and output head. The router bias lives in the `balance` collection.

    model = DeepSeek(tiny())
    variables = model.init(rng, tokens_BL)          # {"params": ..., "balance": ...}
    logits_BLV, _ = model.apply(variables, tokens_BL)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.models.mtp import MTPLayer
from jaxllm.nn.linear import dense
from jaxllm.nn.mla import MLA, MLACache, yarn_softmax_scale
from jaxllm.nn.mlp import SwiGLU
from jaxllm.nn.moe import IMPLS, MoE
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.rope import rope_frequencies

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class DeepSeekConfig:
  """Shape and numerics of a DeepSeek-V2/V3 decoder. Presets are the functions below."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  ffn_dim: int  # dense layers' SwiGLU width
  kv_lora_rank: int
  q_lora_rank: int | None  # None: direct query projection (V2-Lite)
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  n_routed_experts: int
  n_shared_experts: int
  moe_dim: int
  top_k: int
  first_k_dense: int = 1
  n_group: int = 1
  topk_group: int = 1
  route_scale: float = 1.0
  score_func: str = "sigmoid"
  norm_topk: bool = True
  seq_aux_alpha: float = 0.0
  moe_impl: str = "ragged"
  mtp_depth: int = 0
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  max_seq_len: int = 4096
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  init_std: float = 0.02

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "kv_lora_rank",
                 "qk_rope_head_dim", "v_head_dim", "top_k", "max_seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"DeepSeekConfig.{name}={getattr(self, name)} must be positive.")
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"DeepSeekConfig.qk_rope_head_dim={self.qk_rope_head_dim} must be even.")
    if self.n_layers > self.first_k_dense and not 0 < self.top_k <= self.n_routed_experts:
      raise ValueError(f"DeepSeekConfig.top_k={self.top_k} must be in [1, n_routed_experts="
                       f"{self.n_routed_experts}].")
    if self.moe_impl not in IMPLS:
      raise ValueError(f"DeepSeekConfig.moe_impl={self.moe_impl!r}; use one of {IMPLS}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"DeepSeekConfig.{name}={getattr(self, name)!r}; use one of "
                         f"{sorted(_DTYPES)}.")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def softmax_scale(self) -> float:
    return yarn_softmax_scale(self.qk_nope_head_dim + self.qk_rope_head_dim)

  def is_moe(self, layer: int) -> bool:
    return layer >= self.first_k_dense

  def _attn_params(self) -> int:
    d, N = self.d_model, self.n_heads
    dn, dr, dv, C, Q = (self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim,
                        self.kv_lora_rank, self.q_lora_rank)
    q = d * N * (dn + dr) if Q is None else d * Q + Q + Q * N * (dn + dr)
    return q + d * (C + dr) + C + C * N * (dn + dv) + N * dv * d

  def _ffn_params(self, layer: int, active: bool) -> int:
    d = self.d_model
    if not self.is_moe(layer):
      return 3 * d * self.ffn_dim
    routed = self.top_k if active else self.n_routed_experts
    return (d * self.n_routed_experts + 3 * d * self.moe_dim * routed
            + 3 * d * self.moe_dim * self.n_shared_experts)

  def num_params(self, *, active: bool = False, include_mtp: bool = False,
                 include_embedding: bool = True) -> int:
    """Exact parameter count (checked with `jax.eval_shape`); `active`: per token (top-k routed
    experts instead of all). The router bias is a `balance` variable, not a parameter."""
    d = self.d_model
    layer = lambda i: self._attn_params() + self._ffn_params(i, active) + 2 * d
    total = sum(layer(i) for i in range(self.n_layers)) + d
    if include_mtp:
      total += self.mtp_depth * (layer(self.n_layers) + 3 * d + 2 * d * d)
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return total + (emb if include_embedding else 0)


# --------------------------------------------------------------------------------------- presets
BYTE_VOCAB = 272


def tiny(vocab_size: int = BYTE_VOCAB, **kw) -> DeepSeekConfig:
  """Three layers (one dense, two MoE with 8 experts in 2 groups), MLA, one MTP depth."""
  return DeepSeekConfig(**{**dict(
      vocab_size=vocab_size, d_model=64, n_layers=3, n_heads=4, ffn_dim=128, kv_lora_rank=16,
      q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
      n_routed_experts=8, n_shared_experts=1, moe_dim=32, top_k=2, first_k_dense=1, n_group=2,
      topk_group=1, route_scale=2.5, mtp_depth=1, max_seq_len=256), **kw})


def deepseek_v3(**kw) -> DeepSeekConfig:
  """DeepSeek-V3 / R1 (configs/config_671B.json): 671B parameters, 37B active per token."""
  return DeepSeekConfig(**{**dict(
      vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, ffn_dim=18432,
      kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
      v_head_dim=128, n_routed_experts=256, n_shared_experts=1, moe_dim=2048, top_k=8,
      first_k_dense=3, n_group=8, topk_group=4, route_scale=2.5, mtp_depth=1,
      max_seq_len=4096, dtype="bfloat16"), **kw})


def deepseek_v2_lite(**kw) -> DeepSeekConfig:
  """DeepSeek-V2-Lite: 15.7B parameters, 2.4B active; no query compression, softmax router."""
  return DeepSeekConfig(**{**dict(
      vocab_size=102400, d_model=2048, n_layers=27, n_heads=16, ffn_dim=10944,
      kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
      v_head_dim=128, n_routed_experts=64, n_shared_experts=2, moe_dim=1408, top_k=6,
      first_k_dense=1, score_func="softmax", norm_topk=False, route_scale=1.0,
      max_seq_len=4096, dtype="bfloat16"), **kw})


PRESETS = {f.__name__: f for f in (tiny, deepseek_v3, deepseek_v2_lite)}


def preset(name: str, **overrides: Any) -> DeepSeekConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown DeepSeek preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)


# --------------------------------------------------------------------------------------- modules
class DeepSeekBlock(nn.Module):
  """Pre-norm block: x + MLA(norm(x)), then x + FFN(norm(x)) with FFN dense or MoE. Takes the
  config (unlike the leaf modules) because it builds two of them from a dozen of its fields."""

  config: DeepSeekConfig
  moe: bool

  @nn.compact
  def __call__(self, x_BLD, positions_BL, cache=None, absorb=None):
    cfg = self.config
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    inv_freq = tuple(float(f) for f in rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta))
    h_BLD = RMSNorm(cfg.norm_eps, cfg.weight_dtype, name="attn_norm")(x_BLD)
    h_BLD, cache = MLA(cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                       cfg.qk_rope_head_dim, cfg.v_head_dim, inv_freq, cfg.softmax_scale,
                       cfg.norm_eps, name="attn", **kw)(h_BLD, positions_BL, cache, absorb)
    x_BLD = x_BLD + h_BLD
    h_BLD = RMSNorm(cfg.norm_eps, cfg.weight_dtype, name="mlp_norm")(x_BLD)
    if self.moe:
      ffn = MoE(cfg.n_routed_experts, cfg.n_shared_experts, cfg.moe_dim, cfg.top_k,
                cfg.n_group, cfg.topk_group, cfg.route_scale, cfg.score_func, cfg.norm_topk,
                cfg.seq_aux_alpha, cfg.moe_impl, name="mlp", **kw)
    else:
      ffn = SwiGLU(cfg.ffn_dim, name="mlp", **kw)
    x_BLD = x_BLD + ffn(h_BLD)
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed")), cache


class DeepSeek(nn.Module):
  """Token ids -> next-token logits; `cache` is a list of per-layer `MLACache` (or None)."""

  config: DeepSeekConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("vocab", "embed")))
    block = nn.remat(DeepSeekBlock) if cfg.remat else DeepSeekBlock
    self.layers = [block(cfg, cfg.is_moe(i), name=f"layers_{i}") for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps, cfg.weight_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.compute_dtype,
                           param_dtype=cfg.weight_dtype, name="lm_head",
                           init=nn.initializers.normal(cfg.init_std))
    self.mtp = [MTPLayer(block(cfg, cfg.is_moe(cfg.n_layers)), cfg.d_model, cfg.norm_eps,
                         cfg.compute_dtype, cfg.weight_dtype, name=f"mtp_{k}")
                for k in range(cfg.mtp_depth)]

  def _positions(self, tokens_BL, cache):
    B, L = tokens_BL.shape
    start = 0 if cache is None else cache[0].length
    return jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))

  def trunk(self, tokens_BL: Int[Array, "B L"], positions_BL=None, cache=None, absorb=None):
    """Last layer's output before the final norm [B, L, D] (the MTP input) and the cache."""
    if positions_BL is None:
      positions_BL = self._positions(tokens_BL, cache)
    x_BLD = nn.with_logical_constraint(self.embed(tokens_BL), ("batch", "length", "act_embed"))
    x_BLD = self.perturb("embeddings", x_BLD)
    new_cache = []
    for i, layer in enumerate(self.layers):
      x_BLD, c = layer(x_BLD, positions_BL, None if cache is None else cache[i], absorb)
      new_cache.append(c)
    return x_BLD, (None if cache is None else new_cache)

  def hidden_states(self, tokens_BL, positions_BL=None, cache=None, absorb=None):
    h_BLD, cache = self.trunk(tokens_BL, positions_BL, cache, absorb)
    return self.final_norm(h_BLD), cache

  def logits(self, h_BLD: Float[Array, "B L D"]) -> Float[Array, "B L V"]:
    if self.config.tie_embeddings:
      return self.embed.attend(h_BLD)
    return self.lm_head(h_BLD)

  def __call__(self, tokens_BL: Int[Array, "B L"], positions_BL=None, cache=None, absorb=None
               ) -> tuple[Float[Array, "B L V"], list[MLACache] | None]:
    h_BLD, cache = self.trunk(tokens_BL, positions_BL, cache, absorb)
    if self.mtp and self.is_initializing():  # create the MTP parameters too
      self.mtp_logits(h_BLD, jnp.stack([tokens_BL] * len(self.mtp)), positions_BL)
    return self.logits(self.final_norm(h_BLD)), cache

  def mtp_logits(self, h_BLD: Float[Array, "B L D"], shifted_DBL: Int[Array, "D B L"],
                 positions_BL=None) -> Float[Array, "D B L V"]:
    """Sequential MTP: depth k (1-based) reads `shifted_DBL[k-1]` = tokens t + k and the previous
    depth's output (depth 1: the trunk's `h_BLD`), and predicts token t + k + 1."""
    if positions_BL is None:
      positions_BL = self._positions(h_BLD[..., 0], None)
    outs = []
    for k, layer in enumerate(self.mtp):
      h_BLD, _ = layer(h_BLD, self.embed(shifted_DBL[k]), positions_BL)
      outs.append(self.logits(layer.head_input(h_BLD)))
    return jnp.stack(outs)


def init_cache(config: DeepSeekConfig, batch: int, max_len: int | None = None,
               dtype=None) -> list[MLACache]:
  """An empty compressed cache: (kv_lora_rank + qk_rope_head_dim) numbers per token per layer."""
  max_len = max_len or config.max_seq_len
  return [MLACache.empty(batch, max_len, config.kv_lora_rank, config.qk_rope_head_dim,
                         dtype or config.compute_dtype) for _ in range(config.n_layers)]

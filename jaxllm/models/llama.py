"""Llama-family decoder (Llama 2/3, MobileLLM): RMSNorm, RoPE, SwiGLU, grouped-query attention.

Parameter paths mirror Hugging Face's `LlamaForCausalLM` (`layers_3/attn/q_proj/kernel`), every
parameter carries logical axis names (see `jaxllm.sharding.rules`), and KV-cache decoding is a
pure function of `(params, tokens, cache) -> (logits, cache)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.nn.attention import Attention, KVCache, MaskKind
from jaxllm.nn.linear import dense
from jaxllm.nn.mlp import SwiGLU
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.rope import Llama3RopeScaling, rope_frequencies

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a Llama-style decoder. Presets are the functions below."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_dim: int
  head_dim: int | None = None  # default d_model // n_heads
  rope_theta: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  mask_kind: str = "causal"
  dtype: str = "float32"  # compute dtype (activations, matmul inputs)
  param_dtype: str = "float32"  # master weights
  remat: bool = False
  init_std: float = 0.02

  def __post_init__(self):
    if isinstance(self.rope_scaling, dict):  # from a config file
      object.__setattr__(self, "rope_scaling", Llama3RopeScaling(**self.rope_scaling))
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                 "max_seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"LlamaConfig.{name}={getattr(self, name)} must be positive.")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
          f"LlamaConfig.n_heads={self.n_heads} does not divide d_model={self.d_model}: choose "
          f"n_heads dividing d_model (e.g. {_divisor_near(self.d_model, self.n_heads)}) or set "
          "head_dim explicitly.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"LlamaConfig.n_kv_heads={self.n_kv_heads} must divide "
                       f"n_heads={self.n_heads} (grouped-query attention shares each KV head "
                       "among a whole number of query heads).")
    if self.resolved_head_dim % 2:
      raise ValueError(f"LlamaConfig head_dim={self.resolved_head_dim} must be even for RoPE.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"LlamaConfig.{name}={getattr(self, name)!r}; use one of "
                         f"{sorted(_DTYPES)}.")
    MaskKind(self.mask_kind)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def num_params(self, *, include_embedding: bool = True) -> int:
    """Exact parameter count (checked against `jax.eval_shape` in the tests)."""
    d, h = self.d_model, self.resolved_head_dim
    attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
    layer = attn + 3 * d * self.ffn_dim + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.n_layers * layer + d + (emb if include_embedding else 0)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding matmul params + LM head) + attention."""
    matmul_params = self.num_params(include_embedding=False) + self.vocab_size * self.d_model
    attention = 12 * self.n_layers * self.n_heads * self.resolved_head_dim * seq_len
    if self.mask_kind == "causal":
      attention /= 2  # causal attention does half of the L x L work
    return 6 * matmul_params + attention


def _divisor_near(n: int, k: int) -> int:
  return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


# --------------------------------------------------------------------------------------- presets
BYTE_VOCAB = 272  # jaxllm.data.tokenizers.ByteTokenizer: 256 bytes + 16 special ids


def tiny(vocab_size: int = BYTE_VOCAB, **kw) -> LlamaConfig:
  """Two layers, GQA: unit tests."""
  return LlamaConfig(**{**dict(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4,
                               n_kv_heads=2, ffn_dim=128, max_seq_len=256), **kw})


def small(vocab_size: int = BYTE_VOCAB, **kw) -> LlamaConfig:
  """~3M parameters, trains on 2 CPU cores in minutes (the README's main job)."""
  return LlamaConfig(**{**dict(vocab_size=vocab_size, d_model=256, n_layers=4, n_heads=8,
                               n_kv_heads=4, ffn_dim=704, tie_embeddings=True,
                               max_seq_len=1024), **kw})


def bench_20m(vocab_size: int = BYTE_VOCAB, **kw) -> LlamaConfig:
  """The train-step benchmark's shape: d 512, 6 layers, 8 heads, FFN 1536 (~19M parameters)."""
  return LlamaConfig(**{**dict(vocab_size=vocab_size, d_model=512, n_layers=6, n_heads=8,
                               n_kv_heads=8, ffn_dim=1536, max_seq_len=1024), **kw})


def mobilellm_125m(vocab_size: int = 32000, **kw) -> LlamaConfig:
  """MobileLLM-125M (Liu et al., 2024): deep and thin, 30 layers of width 576, GQA, tied."""
  return LlamaConfig(**{**dict(vocab_size=vocab_size, d_model=576, n_layers=30, n_heads=9,
                               n_kv_heads=3, ffn_dim=1536, tie_embeddings=True,
                               max_seq_len=2048), **kw})


def mobilellm_350m(vocab_size: int = 32000, **kw) -> LlamaConfig:
  """MobileLLM-350M: 32 layers of width 960, 15 heads, 5 KV heads, tied embeddings."""
  return LlamaConfig(**{**dict(vocab_size=vocab_size, d_model=960, n_layers=32, n_heads=15,
                               n_kv_heads=5, ffn_dim=2560, tie_embeddings=True,
                               max_seq_len=2048), **kw})


def llama3_8b(**kw) -> LlamaConfig:
  """Llama-3.1-8B's shape (8.03e9 parameters), with the Llama-3 RoPE scaling."""
  return LlamaConfig(**{**dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                               n_kv_heads=8, ffn_dim=14336, rope_theta=500000.0,
                               rope_scaling=Llama3RopeScaling(), max_seq_len=131072,
                               dtype="bfloat16"), **kw})


PRESETS = {f.__name__: f for f in (tiny, small, bench_20m, mobilellm_125m, mobilellm_350m,
                                   llama3_8b)}


def preset(name: str, **overrides: Any) -> LlamaConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)


# --------------------------------------------------------------------------------------- modules
class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_dim: int
  inv_freq: tuple[float, ...]
  norm_eps: float
  mask_kind: MaskKind = MaskKind.CAUSAL
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, positions_BL, cache=None, block_ids_BL=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h_BLD = RMSNorm(self.norm_eps, self.param_dtype, name="attn_norm")(x_BLD)
    h_BLD, cache = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.inv_freq,
                             self.mask_kind, name="attn", **kw)(
                                 h_BLD, positions_BL, cache, block_ids_BL)
    x_BLD = x_BLD + h_BLD
    h_BLD = RMSNorm(self.norm_eps, self.param_dtype, name="mlp_norm")(x_BLD)
    x_BLD = x_BLD + SwiGLU(self.ffn_dim, name="mlp", **kw)(h_BLD)
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed")), cache


class Llama(nn.Module):
  """Token ids -> next-token logits. `cache` is a list of per-layer `KVCache` (or None)."""

  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("vocab", "embed")))
    inv_freq = tuple(float(f) for f in rope_frequencies(
        cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling))
    block = nn.remat(DecoderBlock) if cfg.remat else DecoderBlock
    self.layers = [
        block(cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.ffn_dim, inv_freq,
              cfg.norm_eps, MaskKind(cfg.mask_kind), cfg.compute_dtype, cfg.weight_dtype,
              name=f"layers_{i}") for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps, cfg.weight_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.compute_dtype,
                           param_dtype=cfg.weight_dtype, name="lm_head",
                           init=nn.initializers.normal(cfg.init_std))

  def hidden_states(self, tokens_BL: Int[Array, "B L"], positions_BL=None, cache=None,
                    block_ids_BL=None):
    """Final-norm hidden states [B, L, D] and the updated cache."""
    B, L = tokens_BL.shape
    if positions_BL is None:
      start = 0 if cache is None else cache[0].length
      positions_BL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
    # Gather rows from a table all-gathered over fsdp (as FSDP does for every weight before
    # use): a gather straight from the fsdp-sharded table makes the SPMD partitioner replicate.
    table_VD = nn.with_logical_constraint(self.embed.embedding, ("vocab", None))
    x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(self.config.compute_dtype)
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed"))
    x_BLD = self.perturb("embeddings", x_BLD)  # d loss / d embeddings, via `perturbations`
    new_cache = []
    for i, layer in enumerate(self.layers):
      x_BLD, layer_cache = layer(x_BLD, positions_BL, None if cache is None else cache[i],
                                 block_ids_BL)
      new_cache.append(layer_cache)
    return self.final_norm(x_BLD), (None if cache is None else new_cache)

  def logits(self, h_BLD: Float[Array, "B L D"]) -> Float[Array, "B L V"]:
    B, L, D = h_BLD.shape
    h_TD = h_BLD.reshape(B * L, D)  # a 2-D matmul, as in the blocks
    logits_TV = self.embed.attend(h_TD) if self.config.tie_embeddings else self.lm_head(h_TD)
    return logits_TV.reshape(B, L, -1)

  def __call__(self, tokens_BL: Int[Array, "B L"], positions_BL=None, cache=None,
               block_ids_BL=None) -> tuple[Float[Array, "B L V"], list[KVCache] | None]:
    h_BLD, cache = self.hidden_states(tokens_BL, positions_BL, cache, block_ids_BL)
    return self.logits(h_BLD), cache


def init_cache(config: LlamaConfig, batch: int, max_len: int | None = None,
               dtype=None) -> list[KVCache]:
  """An empty KV cache for `batch` sequences of up to `max_len` (default `max_seq_len`)."""
  max_len = max_len or config.max_seq_len
  return [KVCache.empty(batch, max_len, config.n_kv_heads, config.resolved_head_dim,
                        dtype or config.compute_dtype) for _ in range(config.n_layers)]

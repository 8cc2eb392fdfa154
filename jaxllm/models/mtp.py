"""Multi-token prediction: DeepSeek's sequential MTP layer and Meta's parallel heads.

DeepSeek-V3 (arXiv 2412.19437 sec. 2.2): depth k keeps the causal chain,

    h^k_t = Block_k( W_k [ RMSNorm(Emb(t_{t+k})) ; RMSNorm(h^{k-1}_t) ] ),  p^k = Head(norm_k(h^k))

with the embedding and output head shared with the main model (`MTPLayer`; the model that owns
it, `jaxllm.models.deepseek.DeepSeek`, supplies the block, embedding and head). The embedding
comes first in the concatenation, as in the released checkpoints (`eh_proj`).

Meta (Gloeckle et al., arXiv 2404.19737): `MultiTokenLlama` is a Llama whose last layer is
replaced by `n_future` parallel one-layer heads on the shared trunk; head i predicts token
t + 1 + i through the shared final norm and unembedding. With `n_future=1` it is exactly a Llama
of the same config (same parameter paths for the trunk). Head 0 is the next-token model, the
other heads are drafts for self-speculative decoding (`jaxllm.infer.speculative`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.models.llama import DecoderBlock, LlamaConfig
from jaxllm.nn.attention import KVCache, MaskKind
from jaxllm.nn.linear import dense
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.rope import rope_frequencies


class MTPLayer(nn.Module):
  """One DeepSeek MTP depth: `eh_proj([enorm(emb); hnorm(h)])` then `block`; returns the block's
  output (un-normalised; `shared_head_norm` is applied by `head_input`)."""

  block: nn.Module  # an unbound block module: (x, positions, cache) -> (x, cache)
  d_model: int
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.enorm = RMSNorm(self.norm_eps, self.param_dtype)
    self.hnorm = RMSNorm(self.norm_eps, self.param_dtype)
    self.shared_head_norm = RMSNorm(self.norm_eps, self.param_dtype)
    self.eh_proj = dense(self.d_model, ("mlp", "embed"), name="eh_proj", dtype=self.dtype,
                         param_dtype=self.param_dtype)

  def __call__(self, h_BLD: Float[Array, "B L D"], e_BLD: Float[Array, "B L D"],
               positions_BL: Int[Array, "B L"], cache=None):
    x_BLD = self.eh_proj(jnp.concatenate([self.enorm(e_BLD), self.hnorm(h_BLD)], axis=-1))
    return self.block(x_BLD, positions_BL, cache)

  def head_input(self, h_BLD):
    return self.shared_head_norm(h_BLD)


def decoder_block(config: LlamaConfig, **kw) -> nn.Module:
  """The (unbound) transformer layer used for every trunk layer and every head."""
  cfg = config
  inv_freq = tuple(float(f) for f in rope_frequencies(
      cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling))
  block = nn.remat(DecoderBlock) if cfg.remat else DecoderBlock
  return block(cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.ffn_dim, inv_freq,
               cfg.norm_eps, MaskKind(cfg.mask_kind), cfg.compute_dtype, cfg.weight_dtype, **kw)


class MultiTokenLlama(nn.Module):
  """A Llama trunk of `n_layers - 1` layers with `n_future` one-layer heads (Meta-style)."""

  config: LlamaConfig
  n_future: int

  def setup(self):
    cfg = self.config
    if cfg.n_layers < 2 or self.n_future < 1:
      raise ValueError(f"MultiTokenLlama needs n_layers >= 2 (got {cfg.n_layers}: the last one "
                       f"becomes the heads) and n_future >= 1 (got {self.n_future}).")
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("vocab", "embed")))
    make = lambda name: decoder_block(cfg, name=name)
    self.layers = [make(f"layers_{i}") for i in range(cfg.n_layers - 1)]
    self.heads = [make(f"heads_{i}") for i in range(self.n_future)]
    self.final_norm = RMSNorm(cfg.norm_eps, cfg.weight_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.compute_dtype,
                           param_dtype=cfg.weight_dtype, name="lm_head",
                           init=nn.initializers.normal(cfg.init_std))

  def trunk(self, tokens_BL: Int[Array, "B L"], positions_BL=None, cache=None):
    """Shared trunk output z [B, L, D] and its updated cache (a list over trunk layers)."""
    B, L = tokens_BL.shape
    if positions_BL is None:
      start = 0 if cache is None else cache[0].length
      positions_BL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
    x_BLD = nn.with_logical_constraint(self.embed(tokens_BL), ("batch", "length", "act_embed"))
    new_cache = []
    for i, layer in enumerate(self.layers):
      x_BLD, c = layer(x_BLD, positions_BL, None if cache is None else cache[i])
      new_cache.append(c)
    return x_BLD, (None if cache is None else new_cache)

  def head_logits(self, i: int, z_BLD: Float[Array, "B L D"], positions_BL=None, cache=None):
    """Head i's logits [B, L, V] (predicting token t + 1 + i) and its updated cache."""
    B, L, _ = z_BLD.shape
    if positions_BL is None:
      start = 0 if cache is None else cache.length
      positions_BL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
    h_BLD, cache = self.heads[i](z_BLD, positions_BL, cache)
    return self.unembed(h_BLD), cache

  def unembed(self, h_BLD: Float[Array, "... D"]) -> Float[Array, "... V"]:
    """Shared final norm and unembedding of a head's output (any leading shape)."""
    h_BLD = self.final_norm(h_BLD)
    return self.embed.attend(h_BLD) if self.config.tie_embeddings else self.lm_head(h_BLD)

  def __call__(self, tokens_BL: Int[Array, "B L"], cache=None):
    """All heads' logits [n_future, B, L, V] and the cache {"trunk": [...], "heads": [...]}."""
    z_BLD, trunk_cache = self.trunk(tokens_BL, cache=None if cache is None else cache["trunk"])
    start = 0 if cache is None else cache["trunk"][0].length
    B, L = tokens_BL.shape
    positions_BL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
    outs, head_caches = [], []
    for i in range(self.n_future):
      logits, c = self.head_logits(i, z_BLD, positions_BL,
                                   None if cache is None else cache["heads"][i])
      outs.append(logits)
      head_caches.append(c)
    new_cache = None if cache is None else {"trunk": trunk_cache, "heads": head_caches}
    return jnp.stack(outs), new_cache


def init_multi_token_cache(config: LlamaConfig, n_future: int, batch: int,
                           max_len: int | None = None) -> dict[str, list[KVCache]]:
  max_len = max_len or config.max_seq_len
  make = lambda: KVCache.empty(batch, max_len, config.n_kv_heads, config.resolved_head_dim,
                               config.compute_dtype)
  return {"trunk": [make() for _ in range(config.n_layers - 1)],
          "heads": [make() for _ in range(n_future)]}

"""Parameter, FLOP and KV-cache accounting for `LlamaConfig` models.

Conventions follow the scaling book (chapter 4): a matmul [B, D] @ [D, F] costs 2BDF FLOPs; a
training step costs 3x the forward (forward + two backward matmuls per forward matmul), so
training FLOPs ~ 6 x params x tokens; attention adds 4 B T^2 N H forward FLOPs per layer (QK^T
and AV) when the whole T x T score matrix is computed, half that if causality is exploited.
"""

from __future__ import annotations

import dataclasses

from jaxllm.models.llama import LlamaConfig
from jaxllm.scaling.chips import Chip


def llama3_70b(**overrides) -> LlamaConfig:
  """LLaMA-3-70B's shape (L80 D8192 F28672 N64 K8 H128 V128256), for accounting only.

  Not a library preset: at 70e9 parameters it is only ever used abstractly here.
  """
  return LlamaConfig(**{**dict(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64,
                               n_kv_heads=8, ffn_dim=28672, head_dim=128, rope_theta=500000.0,
                               max_seq_len=8192, dtype="bfloat16"), **overrides})


@dataclasses.dataclass(frozen=True)
class ParamBreakdown:
  """Parameter counts by kind; `total` equals `LlamaConfig.num_params()`."""

  embedding: int  # input embedding + (untied) LM head
  attention: int  # q, k, v, o projections of all layers: 2 D H (N + K) per layer
  mlp: int  # gate, up, down of all layers: 3 D F per layer
  norms: int

  @property
  def total(self) -> int:
    return self.embedding + self.attention + self.mlp + self.norms


def param_breakdown(cfg: LlamaConfig) -> ParamBreakdown:
  """Parameters by kind, consistent with `cfg.num_params()`."""
  d, h, L = cfg.d_model, cfg.resolved_head_dim, cfg.n_layers
  out = ParamBreakdown(
      embedding=cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2),
      attention=L * 2 * d * h * (cfg.n_heads + cfg.n_kv_heads),
      mlp=L * 3 * d * cfg.ffn_dim,
      norms=(2 * L + 1) * d)
  assert out.total == cfg.num_params(), (out, cfg.num_params())
  return out


def matmul_params(cfg: LlamaConfig) -> int:
  """Parameters that take part in a matmul per token: all but the embedding lookup and norms
  (the LM head counts, tied or not)."""
  return cfg.num_params(include_embedding=False) - (2 * cfg.n_layers + 1) * cfg.d_model + (
      cfg.vocab_size * cfg.d_model)


def attention_flops(cfg: LlamaConfig, batch: int, seq_len: int, causal: bool = False) -> float:
  """Forward FLOPs of the score and value matmuls (QK^T, AV) over all layers: 4 B T^2 N H L.

  `causal=True` halves it (what a kernel that skips masked blocks does); plain XLA attention
  computes the full T x T matrix and masks it, so `causal=False` is what `cost_analysis` sees.
  """
  full = 4.0 * batch * seq_len**2 * cfg.n_heads * cfg.resolved_head_dim * cfg.n_layers
  return full / 2 if causal else full


def forward_flops(cfg: LlamaConfig, batch: int, seq_len: int, causal: bool = False) -> float:
  """Matmul FLOPs of one forward pass over [batch, seq_len] tokens (elementwise work ignored)."""
  return 2.0 * matmul_params(cfg) * batch * seq_len + attention_flops(cfg, batch, seq_len,
                                                                         causal)


def training_flops(cfg: LlamaConfig, tokens: float, seq_len: int | None = None) -> float:
  """FLOPs to train on `tokens` tokens: `tokens x cfg.flops_per_token(seq_len)`, i.e. ~6 N D
  plus causal attention. `seq_len=None` drops attention (the book's 6 N D)."""
  if seq_len is None:
    return 6.0 * cfg.num_params() * tokens
  return tokens * cfg.flops_per_token(seq_len)


def training_days(total_flops: float, n_chips: int, chip: Chip, mfu: float = 0.4) -> float:
  """Wall-clock days at `mfu` of the chips' bf16 peak."""
  return total_flops / (n_chips * chip.bf16_flops * mfu) / 86400


def kv_cache_bytes(cfg: LlamaConfig, seq_len: int, batch: int = 1,
                   bytes_per_elem: float = 2) -> float:
  """KV cache of `batch` sequences of `seq_len` tokens: 2 (K and V) x L x K x H x S x B elems."""
  return (2.0 * cfg.n_layers * cfg.n_kv_heads * cfg.resolved_head_dim * seq_len * batch
          * bytes_per_elem)


def mla_kv_cache_bytes(n_layers: int, kv_lora_rank: int, rope_head_dim: int, seq_len: int,
                       batch: int = 1, bytes_per_elem: float = 2) -> float:
  """Multi-head latent attention (DeepSeek-V2/V3) caches one compressed latent of
  `kv_lora_rank` plus one shared RoPE key of `rope_head_dim` per token and layer."""
  return n_layers * (kv_lora_rank + rope_head_dim) * seq_len * batch * bytes_per_elem


def param_bytes(cfg: LlamaConfig, bytes_per_param: float = 2) -> float:
  """Bytes of the weights at `bytes_per_param` (2 bf16, 1 int8, 0.5 int4, 0.25 2-bit)."""
  return cfg.num_params() * bytes_per_param

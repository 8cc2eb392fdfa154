"""Inference bounds: prefill is compute-bound, decode is bound by reading weights and KV cache.

One decode step over a batch of B sequences with S cached tokens each reads all weights once
and every sequence's cache, and does ~2 P FLOPs per sequence:

  T_step ~ B x KV(S) / W_hbm + max(2 B P / C, P_bytes / W_hbm)

so decode stays memory-bound until B exceeds the chip's critical intensity (~240 on v5e with
bf16 weights, ~120 with int8 weights and bf16 FLOPs).
"""

from __future__ import annotations

import dataclasses
import math

from jaxllm.models.llama import LlamaConfig
from jaxllm.scaling.accounting import forward_flops, kv_cache_bytes, matmul_params
from jaxllm.scaling.chips import Chip


@dataclasses.dataclass(frozen=True)
class DecodeStep:
  """Lower bounds (seconds) of one decode step; `time` assumes perfect overlap."""

  t_kv: float  # reading the KV cache
  t_weights: float  # reading the weights
  t_math: float

  @property
  def time(self) -> float:
    return self.t_kv + max(self.t_math, self.t_weights)

  @property
  def bound(self) -> str:
    return "compute" if self.t_math > self.t_weights + self.t_kv else "memory"


def decode_step(cfg: LlamaConfig, chip: Chip, batch: int, seq_len: int, n_chips: int = 1,
                weight_bytes: float = 2, kv_bytes: float = 2) -> DecodeStep:
  """One token for each of `batch` sequences holding `seq_len` cached tokens, on `n_chips`
  chips that split weights, cache and FLOPs evenly (communication ignored)."""
  p = cfg.num_params()
  hbm = chip.hbm_bw * n_chips
  return DecodeStep(
      t_kv=kv_cache_bytes(cfg, seq_len, batch, kv_bytes) / hbm,
      t_weights=p * weight_bytes / hbm,
      t_math=2 * matmul_params(cfg) * batch / (chip.bf16_flops * n_chips))


def prefill_time(cfg: LlamaConfig, chip: Chip, batch: int, seq_len: int,
                 n_chips: int = 1) -> float:
  """Compute-bound prefill time (causal attention)."""
  return forward_flops(cfg, batch, seq_len, causal=True) / (chip.bf16_flops * n_chips)


def critical_decode_batch(chip: Chip, weight_bytes: float = 2) -> float:
  """Batch above which reading weights stops dominating (KV reads ignored): C w / (2 W_hbm)."""
  return chip.critical_intensity * weight_bytes / 2


def min_chips(cfg: LlamaConfig, chip: Chip, weight_bytes: float = 2, kv_tokens: int = 0,
              kv_bytes: float = 2, slices=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> int:
  """Smallest slice (from `slices`) whose HBM holds the weights plus `kv_tokens` of cache."""
  need = cfg.num_params() * weight_bytes + kv_cache_bytes(cfg, kv_tokens, 1, kv_bytes)
  for n in slices:
    if n * chip.hbm_bytes >= need:
      return n
  raise ValueError(f"{need / 1e9:.0f} GB does not fit on {max(slices)} {chip.name} chips.")


def max_kv_tokens(cfg: LlamaConfig, chip: Chip, n_chips: int, weight_bytes: float = 2,
                  kv_bytes: float = 2) -> int:
  """Tokens of KV cache that fit in the HBM left after the weights."""
  free = n_chips * chip.hbm_bytes - cfg.num_params() * weight_bytes
  return max(math.floor(free / kv_cache_bytes(cfg, 1, 1, kv_bytes)), 0)

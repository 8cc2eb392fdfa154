"""LLaDA masked-diffusion LMs: the library's Llama decoder with the causal mask removed.

LLaDA's mask predictor is "a Transformer Encoder": exactly the Llama decoder's parameters with
bidirectional self-attention, a reserved [MASK] token id, and no timestep input (the masking ratio
is inferred from the input). So a LLaDA model here *is* `jaxllm.models.llama.Llama` with
`mask_kind="bidirectional"`; parameter paths, logical axis names and hence sharding are the
Llama's. This file holds the presets (SMDM's small models, LLaDA-8B's shape) and a constructor
that refuses a causal config.

Objective: `jaxllm.objectives.masked_diffusion`; sampler: `jaxllm.infer.diffusion`; likelihood:
`jaxllm.eval.likelihood`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxllm.models.llama import BYTE_VOCAB, Llama, LlamaConfig

LLADA_MASK_ID = 126336  # LLaDA-8B's reserved [MASK] id; ByteTokenizer uses 259 (`tok.mask_id`)


def bidirectional(config: LlamaConfig) -> LlamaConfig:
  """The same shape with the causal mask removed (a mask predictor for masked diffusion)."""
  return dataclasses.replace(config, mask_kind="bidirectional")


def make_model(config: LlamaConfig) -> Llama:
  """A LLaDA mask predictor. `model.apply({"params": p}, tokens_BL) -> (logits_BLV, None)`."""
  if config.mask_kind != "bidirectional":
    raise ValueError(f"LLaDA needs LlamaConfig.mask_kind='bidirectional', got "
                     f"{config.mask_kind!r}; build the config with `llada.preset(...)` or "
                     "`llada.bidirectional(config)`.")
  return Llama(config)


def _cfg(**kw) -> LlamaConfig:
  return LlamaConfig(**{**kw, "mask_kind": "bidirectional"})


# --------------------------------------------------------------------------------------- presets
def tiny(vocab_size: int = BYTE_VOCAB, **kw) -> LlamaConfig:
  """Two layers, full multi-head attention: unit tests."""
  return _cfg(**{**dict(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                        ffn_dim=128, max_seq_len=256), **kw})


def small(vocab_size: int = BYTE_VOCAB, **kw) -> LlamaConfig:
  """~3M parameters (the Llama `small` shape, bidirectional): 2-core CPU experiments."""
  return _cfg(**{**dict(vocab_size=vocab_size, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8,
                        ffn_dim=704, tie_embeddings=True, max_seq_len=1024), **kw})


# SMDM (Nie et al., "Scaling up masked diffusion models on text"): Llama blocks, full MHA,
# FFN 4 d, sequence 2048, vocabulary 32000 (lit_gpt config names Diff_LLaMA_<N>M).
def smdm_6m(vocab_size: int = 32000, **kw) -> LlamaConfig:
  return _cfg(**{**dict(vocab_size=vocab_size, d_model=256, n_layers=6, n_heads=4, n_kv_heads=4,
                        ffn_dim=1024, max_seq_len=2048), **kw})


def smdm_19m(vocab_size: int = 32000, **kw) -> LlamaConfig:
  return _cfg(**{**dict(vocab_size=vocab_size, d_model=384, n_layers=8, n_heads=6, n_kv_heads=6,
                        ffn_dim=1536, max_seq_len=2048), **kw})


def smdm_34m(vocab_size: int = 32000, **kw) -> LlamaConfig:
  return _cfg(**{**dict(vocab_size=vocab_size, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                        ffn_dim=2048, max_seq_len=2048), **kw})


def smdm_85m(vocab_size: int = 32000, **kw) -> LlamaConfig:
  return _cfg(**{**dict(vocab_size=vocab_size, d_model=640, n_layers=13, n_heads=10,
                        n_kv_heads=10, ffn_dim=2560, max_seq_len=2048), **kw})


def llada_8b(**kw) -> LlamaConfig:
  """LLaDA-8B's shape: 32 layers, d 4096, 32 heads (full MHA), FFN 12288, vocabulary 126464."""
  return _cfg(**{**dict(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                        ffn_dim=12288, rope_theta=500000.0, max_seq_len=4096,
                        dtype="bfloat16"), **kw})


PRESETS = {f.__name__: f for f in (tiny, small, smdm_6m, smdm_19m, smdm_34m, smdm_85m,
                                   llada_8b)}


def preset(name: str, **overrides: Any) -> LlamaConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown LLaDA preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)

"""Hugging Face DeepSeek-V3-layout checkpoints -> jaxllm DeepSeek variables (safetensors, no torch).

Reads what `DeepseekV3ForCausalLM.save_pretrained` writes and what deepseek-ai publishes (bf16
conversions; the FP8 release must be dequantized first): per-expert
`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight` (stacked here into [E, in, out]) or the
fused in-memory `experts.gate_up_proj` / `experts.down_proj`, the router `mlp.gate.weight` and
its `e_score_correction_bias` (into the `balance` collection), and the MTP layers stored after the
last decoder layer (`model.layers.{n_layers + k}.{enorm,hnorm,eh_proj,shared_head.norm}` plus a
full decoder layer; their `embed_tokens` and `shared_head.head` duplicate the main model's and
are not read).

RoPE: checkpoints with `rope_interleave` (DeepSeek's own pairwise layout, the HF default) get the
RoPE output rows of `q_b_proj` / `q_proj` and `kv_a_proj_with_mqa` permuted to
[even ; odd], which turns the pairwise rotation into jaxllm's rotate-half one exactly (HF's
`apply_rotary_pos_emb_interleave` outputs that order). Only the default RoPE type is supported;
YaRN checkpoints raise (see `jaxllm.nn.mla.yarn_softmax_scale` for the scale they would need).

    cfg, variables = load_hf_deepseek("path/to/DeepSeek-V3-bf16")
    logits, _ = DeepSeek(cfg).apply(variables, tokens_BL)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxllm.models.deepseek import DeepSeekConfig

_NP = {"float32": np.float32, "bfloat16": np.dtype(jnp.bfloat16), "float16": np.float16}


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> DeepSeekConfig:
  """A `DeepSeekConfig` from a HF `deepseek_v3` config.json dict (MTP depth set by the loader)."""
  hf = dict(hf_config)
  if hf.get("model_type") != "deepseek_v3":
    raise ValueError(f"HF config has model_type={hf.get('model_type')!r}; jaxllm.hub.deepseek "
                     "reads 'deepseek_v3' checkpoints (DeepseekV3ForCausalLM).")
  if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias"):
    raise ValueError("HF config needs hidden_act='silu' and attention_bias=false.")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"HF config has rope_type={rope_type!r}; jaxllm's DeepSeek supports the "
                     "default RoPE only (YaRN frequencies are not implemented; its softmax scale "
                     "is jaxllm.nn.mla.yarn_softmax_scale).")
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
      kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank"),
      qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
      v_head_dim=hf["v_head_dim"], n_routed_experts=hf["n_routed_experts"],
      n_shared_experts=hf.get("n_shared_experts") or 0, moe_dim=hf["moe_intermediate_size"],
      top_k=hf["num_experts_per_tok"], first_k_dense=hf.get("first_k_dense_replace") or 0,
      n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
      route_scale=float(hf.get("routed_scaling_factor", 1.0)),
      norm_topk=bool(hf.get("norm_topk_prob", True)), mtp_depth=0,
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=int(hf.get("max_position_embeddings", 4096)),
      init_std=float(hf.get("initializer_range", 0.02)))
  return DeepSeekConfig(**{**fields, **overrides})


def _deinterleave(rows: int) -> np.ndarray:
  return np.concatenate([np.arange(0, rows, 2), np.arange(1, rows, 2)])


def load_hf_deepseek(path: str | os.PathLike, *, dtype: str = "float32", load_mtp: bool = True,
                     **overrides: Any) -> tuple[DeepSeekConfig, dict]:
  """(config, {"params": ..., "balance": ...}) from a HF DeepSeek-V3-layout directory."""
  root = Path(path)
  with open(root / "config.json") as f:
    hf = json.load(f)
  with contextlib.ExitStack() as stack:
    handles = {}
    for file in sorted(root.glob("*.safetensors")):
      h = stack.enter_context(safe_open(str(file), "np"))
      handles.update(dict.fromkeys(h.keys(), h))
    if any(k.endswith("weight_scale_inv") for k in handles):
      raise ValueError(f"{root} holds FP8 weights (weight_scale_inv); dequantize them to bf16 "
                       "first (DeepSeek's inference/fp8_cast_bf16.py).")
    n = hf["num_hidden_layers"]
    depth = 0
    while load_mtp and f"model.layers.{n + depth}.eh_proj.weight" in handles:
      depth += 1
    cfg = config_from_hf(hf, mtp_depth=depth, dtype=dtype, param_dtype=dtype, **overrides)
    np_dtype = _NP[dtype]
    used = set()

    def get(name):
      used.add(name)
      x = handles[name].get_tensor(name)
      return x.astype(np_dtype)

    interleave = bool(hf.get("rope_interleave", True))
    dn, dr, N = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.n_heads
    perm = _deinterleave(dr)

    def q_kernel(name):
      w = get(name)  # [N * (dn + dr), in]
      if interleave:
        w = w.reshape(N, dn + dr, -1)
        w = np.concatenate([w[:, :dn], w[:, dn:][:, perm]], axis=1).reshape(N * (dn + dr), -1)
      return w.T

    def block(prefix, moe):
      attn = {"kv_b_proj": {"kernel": get(f"{prefix}.self_attn.kv_b_proj.weight").T},
              "o_proj": {"kernel": get(f"{prefix}.self_attn.o_proj.weight").T},
              "kv_a_layernorm": {"scale": get(f"{prefix}.self_attn.kv_a_layernorm.weight")}}
      w = get(f"{prefix}.self_attn.kv_a_proj_with_mqa.weight")
      if interleave:
        w = np.concatenate([w[:cfg.kv_lora_rank], w[cfg.kv_lora_rank:][perm]], axis=0)
      attn["kv_a_proj_with_mqa"] = {"kernel": w.T}
      if cfg.q_lora_rank is None:
        attn["q_proj"] = {"kernel": q_kernel(f"{prefix}.self_attn.q_proj.weight")}
      else:
        attn["q_a_proj"] = {"kernel": get(f"{prefix}.self_attn.q_a_proj.weight").T}
        attn["q_a_layernorm"] = {"scale": get(f"{prefix}.self_attn.q_a_layernorm.weight")}
        attn["q_b_proj"] = {"kernel": q_kernel(f"{prefix}.self_attn.q_b_proj.weight")}
      swiglu = lambda p: {k: {"kernel": get(f"{p}.{k}.weight").T}
                          for k in ("gate_proj", "up_proj", "down_proj")}
      bal = None
      if moe:
        m = f"{prefix}.mlp"
        mlp = {"gate": {"kernel": get(f"{m}.gate.weight").T}}
        bal = {"e_score_correction_bias": get(f"{m}.gate.e_score_correction_bias").astype(
            np.float32)}
        if f"{m}.experts.gate_up_proj" in handles:  # fused layout: [E, 2F, D], [E, D, F]
          gu = get(f"{m}.experts.gate_up_proj")
          mlp["experts_gate_proj"] = gu[:, :cfg.moe_dim].transpose(0, 2, 1)
          mlp["experts_up_proj"] = gu[:, cfg.moe_dim:].transpose(0, 2, 1)
          mlp["experts_down_proj"] = get(f"{m}.experts.down_proj").transpose(0, 2, 1)
        else:
          for k in ("gate_proj", "up_proj", "down_proj"):
            mlp[f"experts_{k}"] = np.stack([get(f"{m}.experts.{e}.{k}.weight").T
                                            for e in range(cfg.n_routed_experts)])
        if cfg.n_shared_experts:
          mlp["shared_experts"] = swiglu(f"{m}.shared_experts")
      else:
        mlp = swiglu(f"{prefix}.mlp")
      params = {"attn_norm": {"scale": get(f"{prefix}.input_layernorm.weight")},
                "attn": attn,
                "mlp_norm": {"scale": get(f"{prefix}.post_attention_layernorm.weight")},
                "mlp": mlp}
      return params, bal

    params, balance = {}, {}
    params["embed"] = {"embedding": get("model.embed_tokens.weight")}
    params["final_norm"] = {"scale": get("model.norm.weight")}
    if not cfg.tie_embeddings:
      params["lm_head"] = {"kernel": get("lm_head.weight").T}
    for i in range(n):
      params[f"layers_{i}"], bal = block(f"model.layers.{i}", cfg.is_moe(i))
      if bal is not None:
        balance[f"layers_{i}"] = {"mlp": bal}
    for k in range(depth):
      p = f"model.layers.{n + k}"
      blk, bal = block(p, cfg.is_moe(n))
      params[f"mtp_{k}"] = {
          "block": blk, "eh_proj": {"kernel": get(f"{p}.eh_proj.weight").T},
          "enorm": {"scale": get(f"{p}.enorm.weight")},
          "hnorm": {"scale": get(f"{p}.hnorm.weight")},
          "shared_head_norm": {"scale": get(f"{p}.shared_head.norm.weight")}}
      if bal is not None:
        balance[f"mtp_{k}"] = {"block": {"mlp": bal}}
    ignored = {k for k in handles if k.startswith(tuple(
        f"model.layers.{n + j}.{s}" for j in range(depth)
        for s in ("embed_tokens", "shared_head.head")))}
    unused = set(handles) - used - ignored
    unused = {k for k in unused if not (load_mtp is False and _layer_index(k, n))}
    if unused:
      raise ValueError(f"{root}: tensors not understood by jaxllm's DeepSeek import: "
                       f"{sorted(unused)[:8]} ...")
  return cfg, {"params": params, "balance": balance}


def _layer_index(key: str, n: int) -> bool:
  parts = key.split(".")
  return len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= n

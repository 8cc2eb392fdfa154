"""Parity with Hugging Face `DeepseekV3ForCausalLM` (torch, CPU, fp32) and the V3-layout import.

Tiny random HF models (MLA with and without query compression, interleaved and rotate-half RoPE,
group-limited sigmoid routing with a non-zero correction bias) are saved with `save_pretrained`
(per-expert DeepSeek-V3 layout), read with `load_hf_deepseek`, and run on the same tokens.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxllm.hub.deepseek import load_hf_deepseek
from jaxllm.models import deepseek as ds

ATOL = 1e-4
BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
            routed_scaling_factor=2.5, rms_norm_eps=1e-6, max_position_embeddings=256,
            attn_implementation="eager")
CASES = {
    "q_lora_interleaved": dict(q_lora_rank=24, rope_interleave=True),
    "direct_q_rotate_half": dict(q_lora_rank=None, rope_interleave=False),
}


def _random_hf_model(seed: int, **kw):
  torch.manual_seed(seed)
  model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**BASE, **kw}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 1.2 / math.sqrt(p.shape[-1]))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.normal_(0.0, 0.1)  # steers selection, so parity checks it is used (and only there)
  return model.eval()


def _case(name, tmp_path_factory):
  model = _random_hf_model(sorted(CASES).index(name), **CASES[name])
  hf_dir = tmp_path_factory.mktemp(name)
  model.save_pretrained(hf_dir)
  tokens_BL = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 24))
  with torch.no_grad():
    hf_logits = model(torch.from_numpy(tokens_BL)).logits.numpy()
  return dict(name=name, model=model, dir=hf_dir, tokens=tokens_BL, hf=hf_logits)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def interleaved_case(tmp_path_factory):
  return _case("q_lora_interleaved", tmp_path_factory)


def test_logits_match_hf(case):
  cfg, variables = load_hf_deepseek(case["dir"])
  assert cfg.mtp_depth == 0 and cfg.n_group == 4 and cfg.first_k_dense == 1
  logits, _ = jax.jit(ds.DeepSeek(cfg).apply)(variables, jnp.asarray(case["tokens"]))
  diff = float(np.max(np.abs(np.asarray(logits) - case["hf"])))
  print(f"\n{case['name']}: max |logits - HF| = {diff:.2e} (max |logit| "
        f"{np.abs(case['hf']).max():.1f})")
  assert diff <= ATOL
  # the correction bias matters at these scales: dropping it moves the logits
  no_bias = jax.tree.map(jnp.zeros_like, variables["balance"])
  moved, _ = jax.jit(ds.DeepSeek(cfg).apply)({**variables, "balance": no_bias},
                                             jnp.asarray(case["tokens"]))
  assert float(np.max(np.abs(np.asarray(moved) - case["hf"]))) > 100 * ATOL
  # absorbed MLA decode over the compressed cache gives the same next-token logits
  cache = ds.init_cache(cfg, 2, 32)
  step = jax.jit(lambda t, c: ds.DeepSeek(cfg).apply(variables, t, cache=c))
  _, cache = step(jnp.asarray(case["tokens"][:, :-1]), cache)
  last, _ = step(jnp.asarray(case["tokens"][:, -1:]), cache)
  np.testing.assert_allclose(np.asarray(last[:, 0]), case["hf"][:, -1], atol=ATOL, rtol=0)


def test_import_covers_every_parameter_and_mtp_layer(interleaved_case, tmp_path):
  """A V3-layout checkpoint with an MTP layer (model.layers.{n}.*, as deepseek-ai ships it)
  loads into exactly the tree the model initialises, MTP included."""
  case = interleaved_case
  tensors = load_file(case["dir"] / "model.safetensors")
  n, d = BASE["num_hidden_layers"], BASE["hidden_size"]
  rng = np.random.default_rng(1)
  for key in [k for k in tensors if k.startswith(f"model.layers.{n - 1}.")]:
    tensors[key.replace(f"layers.{n - 1}.", f"layers.{n}.")] = tensors[key]
  for name, shape in [("enorm.weight", (d,)), ("hnorm.weight", (d,)),
                      ("eh_proj.weight", (d, 2 * d)), ("shared_head.norm.weight", (d,)),
                      ("shared_head.head.weight", (BASE["vocab_size"], d)),
                      ("embed_tokens.weight", (BASE["vocab_size"], d))]:
    tensors[f"model.layers.{n}.{name}"] = rng.normal(size=shape).astype(np.float32)
  (tmp_path / "config.json").write_bytes((case["dir"] / "config.json").read_bytes())
  save_file(tensors, tmp_path / "model.safetensors")
  cfg, variables = load_hf_deepseek(tmp_path)
  assert cfg.mtp_depth == 1
  abstract = jax.eval_shape(ds.DeepSeek(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  for col in ("params", "balance"):
    want = jax.tree.map(lambda x: x.shape, nn.unbox(abstract[col]))
    got = jax.tree.map(lambda x: x.shape, variables[col])
    assert got == want
  np.testing.assert_array_equal(variables["params"]["mtp_0"]["eh_proj"]["kernel"],
                                tensors[f"model.layers.{n}.eh_proj.weight"].T)
  # the main model's logits are unchanged by the extra layer
  logits, _ = jax.jit(ds.DeepSeek(cfg).apply)(variables, jnp.asarray(case["tokens"]))
  assert float(np.max(np.abs(np.asarray(logits) - case["hf"]))) <= ATOL


@pytest.mark.parametrize("name,total,active", [
    ("deepseek_v3", 671.0e9, 37.6e9), ("deepseek_v2_lite", 15.7e9, 2.66e9)])
def test_preset_parameter_counts(name, total, active):
  """Full-size presets via `jax.eval_shape` only: V3 671B total / 37B active (DeepSeek's numbers;
  the active count includes both vocabulary matrices), V2-Lite 15.7B / 2.4B without the input
  embedding. The MTP module of V3 adds its published ~14B (11.5B unique: embedding and head are
  shared)."""
  cfg = ds.preset(name)
  shapes = jax.eval_shape(ds.DeepSeek(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  counted = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  assert counted == cfg.num_params(include_mtp=True)
  assert cfg.num_params() == pytest.approx(total, rel=2e-3)
  assert cfg.num_params(active=True) == pytest.approx(active, rel=5e-3)
  if name == "deepseek_v3":
    mtp = cfg.num_params(include_mtp=True) - cfg.num_params()
    assert mtp == pytest.approx(11.5e9, rel=0.02)


def test_config_errors_name_the_fix():
  from jaxllm.hub.deepseek import config_from_hf
  hf = transformers.DeepseekV3Config(**{k: v for k, v in BASE.items()
                                        if k != "attn_implementation"}).to_dict()
  cfg = config_from_hf(hf)
  assert (cfg.n_routed_experts, cfg.top_k, cfg.route_scale) == (8, 2, 2.5)
  yarn = {**hf, "rope_parameters": {"rope_type": "yarn", "factor": 40.0, "rope_theta": 1e4}}
  with pytest.raises(ValueError, match="default RoPE only.*yarn_softmax_scale"):
    config_from_hf(yarn)
  with pytest.raises(ValueError, match="model_type='llama'"):
    config_from_hf({**hf, "model_type": "llama"})

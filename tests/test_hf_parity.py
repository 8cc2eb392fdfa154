"""Parity with Hugging Face `LlamaForCausalLM` (torch, CPU, fp32) and the safetensors hub I/O.

Tiny random HF models are saved with `save_pretrained`, read with `load_hf_llama`, and both run on
the same token ids; exports written by `save_hf_llama` are read back by transformers and by jaxllm.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxllm.hub import config_from_hf, config_to_hf, load_hf_llama, save_hf_llama
from jaxllm.hub import llama as hllama
from jaxllm.models import llama
from jaxllm.nn.rope import Llama3RopeScaling, rope_frequencies

ATOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            rms_norm_eps=1e-5, max_position_embeddings=1024, attn_implementation="eager")
# Llama-3 scaling that puts head_dim 16 / theta 1e4 frequencies in all three bands: wavelengths
# 6.3, 20 (< 256 / 8: kept), 63, 199 (between: smoothed), 628 ... 19869 (> 256: divided by 8).
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
                   original_max_position_embeddings=256)
CASES = {
    "gqa_untied": (dict(num_attention_heads=4, num_key_value_heads=2), 24),
    "mha_tied_headdim": (dict(num_attention_heads=4, num_key_value_heads=4, head_dim=24,
                              tie_word_embeddings=True), 24),
    "mqa_llama3_rope": (dict(num_attention_heads=4, num_key_value_heads=1,
                             rope_parameters=dict(rope_theta=10000.0, **LLAMA3_ROPE)), 320),
}


def _random_hf_model(seed: int, **kw) -> transformers.LlamaForCausalLM:
  """A seeded HF model with O(1) logits (HF's 0.02-std init would make parity near-trivial)."""
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **kw}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 1.5 / math.sqrt(p.shape[-1]))
  return model.eval()


def _hf_logits(model: transformers.LlamaForCausalLM, tokens_BL: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens_BL)).logits.numpy()


def _jax_logits(cfg: llama.LlamaConfig, params: dict, tokens_BL: np.ndarray) -> np.ndarray:
  apply = jax.jit(llama.Llama(cfg).apply)
  return np.asarray(apply({"params": params}, jnp.asarray(tokens_BL))[0])


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """name -> dict(model, dir, tokens, hf_logits, cfg, params), each built once per module."""
  built = {}

  def get(name: str) -> dict:
    if name not in built:
      kw, seq_len = CASES[name]
      model = _random_hf_model(sorted(CASES).index(name), **kw)
      hf_dir = tmp_path_factory.mktemp(name) / "hf"
      model.save_pretrained(hf_dir)
      assert (hf_dir / "model.safetensors").is_file()
      tokens_BL = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, seq_len))
      cfg, params = load_hf_llama(hf_dir)
      built[name] = dict(name=name, model=model, dir=hf_dir, tokens=tokens_BL,
                         hf_logits=_hf_logits(model, tokens_BL), cfg=cfg, params=params)
    return built[name]

  return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_hf(cases, name):
  case = cases(name)
  logits = _jax_logits(case["cfg"], case["params"], case["tokens"])
  diff = float(np.max(np.abs(logits - case["hf_logits"])))
  print(f"\n{name}: max |logits - HF| = {diff:.2e} (max |logit| {np.abs(logits).max():.1f})")
  assert logits.shape == case["hf_logits"].shape
  assert diff <= ATOL


def test_llama3_scaling_matters_at_this_length(cases):
  """Dropping the Llama-3 scaling moves logits far beyond ATOL, so the parity above tests it."""
  case = cases("mqa_llama3_rope")
  assert case["cfg"].rope_scaling == Llama3RopeScaling(8.0, 1.0, 8.0, 256)
  unscaled = dataclasses.replace(case["cfg"], rope_scaling=None)
  logits = _jax_logits(unscaled, case["params"], case["tokens"])
  assert np.max(np.abs(logits - case["hf_logits"])) > 100 * ATOL


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_round_trip(cases, name, tmp_path):
  case = cases(name)
  cfg, params = case["cfg"], case["params"]
  save_hf_llama(cfg, params, tmp_path)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["tie_word_embeddings"] is cfg.tie_embeddings
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
  original = case["model"].state_dict()
  assert reloaded.state_dict().keys() == original.keys()
  for key, tensor in reloaded.state_dict().items():
    assert torch.equal(tensor, original[key]), key
  np.testing.assert_array_equal(_hf_logits(reloaded, case["tokens"]), case["hf_logits"])

  cfg2, params2 = load_hf_llama(tmp_path)
  assert cfg2 == cfg
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_checkpoints(cases, tmp_path):
  """HF's sharded layout loads, and jaxllm's sharded export loads in transformers."""
  case = cases("gqa_untied")
  case["model"].save_pretrained(tmp_path / "hf", max_shard_size="100KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
  cfg, params = load_hf_llama(tmp_path / "hf")
  assert cfg == case["cfg"]
  jax.tree.map(np.testing.assert_array_equal, params, case["params"])

  save_hf_llama(cfg, params, tmp_path / "jx", max_shard_bytes=100_000)
  assert len(list((tmp_path / "jx").glob("model-*-of-*.safetensors"))) > 1
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "jx",
                                                           attn_implementation="eager")
  np.testing.assert_array_equal(_hf_logits(reloaded, case["tokens"]), case["hf_logits"])
  cfg2, params2 = load_hf_llama(tmp_path / "jx")
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("preset", ["tiny", "llama3_8b"])
def test_name_table_covers_every_model_parameter(preset):
  """The HF name table and the model's own parameters (from eval_shape) match one to one."""
  from jaxllm.models.llama import Llama, preset as make_preset
  cfg = make_preset(preset, n_layers=2)
  variables = jax.eval_shape(Llama(cfg).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 1), jnp.int32))
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(variables["params"]))[0]
  model = {tuple(k.key for k in path): tuple(x.shape) for path, x in leaves}
  table = {t.path: t.shape for t in hllama._layout(cfg)}
  assert table == model


# ----------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("head_dim,theta,scaling", [
    (16, 10000.0, None),
    (16, 10000.0, LLAMA3_ROPE),
    (128, 500000.0, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192)),
])
def test_rope_frequencies_match_transformers(head_dim, theta, scaling):
  rope = dict(rope_theta=theta, **(scaling or {"rope_type": "default"}))
  hf_config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                                       head_dim=head_dim, rope_parameters=rope,
                                       max_position_embeddings=131072)
  if scaling is None:
    hf_inv_freq, _ = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
        .compute_default_rope_parameters(hf_config)
  else:
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
  cfg = config_from_hf(hf_config.to_dict())
  ours = rope_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
  np.testing.assert_allclose(ours, hf_inv_freq.double().numpy(), rtol=1e-6)

  if scaling is not None:  # every band is exercised: kept, smoothed, divided by the factor
    base = rope_frequencies(head_dim, theta)
    ratio = ours / base
    assert np.any(ratio == 1.0)
    assert np.any(np.isclose(ratio, 1 / scaling["factor"]))
    assert np.any((ratio < 1.0) & (ratio > 1 / scaling["factor"] + 1e-9))


# --------------------------------------------------------------------------------------- config
def test_config_layouts_agree():
  """transformers 4.x (rope_theta + rope_scaling) and 5.x (rope_parameters) layouts."""
  common = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False)
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=8192)
  old = dict(common, rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **scaling),
             torch_dtype="bfloat16")
  older = dict(common, rope_theta=500000.0, rope_scaling=dict(type="llama3", **scaling))
  new = dict(common, dtype="bfloat16",
             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **scaling))
  expected = llama.llama3_8b(dtype="float32", norm_eps=1e-5)
  for hf in (old, older, new):
    assert config_from_hf(hf) == expected
  assert config_from_hf(new, dtype="bfloat16", remat=True) == dataclasses.replace(
      expected, dtype="bfloat16", remat=True)


@pytest.mark.parametrize("name", ["tiny", "small", "mobilellm_125m", "llama3_8b"])
def test_config_round_trip_through_transformers(name):
  cfg = llama.preset(name)
  hf = transformers.LlamaConfig(**config_to_hf(cfg))
  assert config_from_hf(hf.to_dict(), dtype=cfg.dtype) == cfg


@pytest.mark.parametrize("change,match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "yarn"),
    (dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0)), "linear"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), "low_freq_factor"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="mistral"), "model_type"),
    (dict(hidden_size=None), "hidden_size"),
])
def test_unsupported_configs_raise(change, match):
  hf = {**config_to_hf(llama.tiny()), **change}
  with pytest.raises(ValueError, match=match):
    config_from_hf(hf)


def test_export_rejects_non_causal():
  with pytest.raises(ValueError, match="mask_kind"):
    config_to_hf(llama.tiny(mask_kind="bidirectional"))


# ---------------------------------------------------------------------------- loader and errors
@pytest.fixture(scope="module")
def tiny_model():
  cfg = llama.tiny(vocab_size=64, n_layers=1)
  params = nn.unbox(llama.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return cfg, jax.tree.map(np.asarray, params["params"])


@pytest.fixture
def saved(tiny_model, tmp_path):
  """(cfg, params, directory) of a freshly exported tiny checkpoint that a test may damage."""
  cfg, params = tiny_model
  save_hf_llama(cfg, params, tmp_path / "ckpt")
  return cfg, params, tmp_path / "ckpt"


def _rewrite(path: Path, edit) -> None:
  tensors = load_file(path / "model.safetensors")
  edit(tensors)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_bfloat16_export_keeps_dtype(saved, tmp_path):
  cfg, params, _ = saved
  save_hf_llama(cfg, params, tmp_path / "bf16", dtype="bfloat16")
  with open(tmp_path / "bf16" / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  cfg2, params2 = load_hf_llama(tmp_path / "bf16", dtype=None)
  assert cfg2 == dataclasses.replace(cfg, param_dtype="bfloat16")
  expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  jax.tree.map(np.testing.assert_array_equal, params2, expected)
  assert {x.dtype for x in jax.tree.leaves(params2)} == {np.dtype(jnp.bfloat16)}
  _, params32 = load_hf_llama(tmp_path / "bf16")
  assert {x.dtype for x in jax.tree.leaves(params32)} == {np.dtype(np.float32)}


def test_missing_files_raise(saved, tmp_path):
  _, _, path = saved
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf_llama(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf_llama(tmp_path / "empty")
  (path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_hf_llama(path)


def test_missing_tensor_raises(saved):
  _, _, path = saved
  _rewrite(path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
  with pytest.raises(KeyError, match="model.layers.0.mlp.up_proj.weight"):
    load_hf_llama(path)


def test_unexpected_tensor_raises(saved):
  _, _, path = saved
  _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, "f4")}))
  with pytest.raises(ValueError, match=r"q_proj\.bias.*model\.safetensors"):
    load_hf_llama(path)


def test_shape_mismatch_raises(saved):
  _, _, path = saved
  with open(path / "config.json") as f:
    hf = json.load(f)
  with open(path / "config.json", "w") as f:
    json.dump({**hf, "intermediate_size": 96}, f)
  with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight in model\.safetensors.*\(96, 64\)"):
    load_hf_llama(path)


def test_tied_checkpoint_with_lm_head_copy(saved):
  """Some tied checkpoints still store lm_head.weight: accepted when equal to the embedding."""
  cfg, params, path = saved
  hf = config_to_hf(dataclasses.replace(cfg, tie_embeddings=True))
  with open(path / "config.json", "w") as f:
    json.dump(hf, f)
  embed = params["embed"]["embedding"]
  _rewrite(path, lambda t: t.update({"lm_head.weight": embed.copy()}))
  tied_cfg, tied = load_hf_llama(path)
  assert tied_cfg.tie_embeddings and "lm_head" not in tied
  _rewrite(path, lambda t: t.update({"lm_head.weight": embed + 1}))
  with pytest.raises(ValueError, match="tie_word_embeddings"):
    load_hf_llama(path)


def test_save_rejects_mismatched_params(saved, tmp_path):
  cfg, params, _ = saved
  with pytest.raises(KeyError, match="layers_1"):
    save_hf_llama(dataclasses.replace(cfg, n_layers=2), params, tmp_path / "x")
  with pytest.raises(ValueError, match="shape"):
    save_hf_llama(dataclasses.replace(cfg, ffn_dim=96), params, tmp_path / "x")
  with pytest.raises(ValueError, match=r"variables\['params'\]"):
    save_hf_llama(cfg, {"params": params}, tmp_path / "x")

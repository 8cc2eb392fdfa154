"""The Llama decoder in pure JAX: KV-cache decoding, causality, presets, config errors, bf16."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxllm.models import llama

B, L = 2, 12


def _init(cfg: llama.LlamaConfig, seed: int = 0) -> dict:
  tokens_BL = jnp.zeros((1, 4), jnp.int32)
  return nn.unbox(jax.jit(llama.Llama(cfg).init)(jax.random.key(seed), tokens_BL))["params"]


def _tokens(cfg: llama.LlamaConfig, shape=(B, L), seed: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


@pytest.fixture(scope="module")
def tiny():
  cfg = llama.tiny()
  return cfg, _init(cfg), _tokens(cfg)


# ----------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("chunks,use_jit", [
    ((8, 1, 1, 1, 1), False),  # eager: slow per call, so fewer steps
    ((5, 1, 1, 1, 1, 1, 1, 1), True),
    ((4, 3, 5), True),
], ids=["token_by_token_eager", "token_by_token_jit", "chunked_jit"])
def test_cached_decoding_matches_full_forward(tiny, chunks, use_jit):
  """Prefill then decode (one token or a chunk at a time) reproduces one full forward."""
  cfg, params, tokens_BL = tiny
  assert sum(chunks) == L
  model = llama.Llama(cfg)

  def apply(tokens, cache=None):
    return model.apply({"params": params}, tokens, cache=cache)

  step = jax.jit(apply) if use_jit else apply
  full_BLV, no_cache = step(tokens_BL)
  assert no_cache is None
  cache = llama.init_cache(cfg, B, max_len=16)
  pieces, start = [], 0
  for n in chunks:
    logits_BnV, cache = step(tokens_BL[:, start:start + n], cache)
    pieces.append(logits_BnV)
    start += n
  assert all(int(c.length) == L for c in cache)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full_BLV, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- causality
def _embedding_jacobian_norms(cfg: llama.LlamaConfig, params: dict,
                              tokens_BL: jax.Array) -> np.ndarray:
  """[t, s]: total |d logits[:, t] . w / d embeddings[:, s]|, via Flax perturbations."""
  model = llama.Llama(cfg)
  w_V = jax.random.normal(jax.random.key(2), (cfg.vocab_size,))
  zeros_BLD = jnp.zeros(tokens_BL.shape + (cfg.d_model,), jnp.float32)

  def per_position(perturb_BLD):
    variables = {"params": params, "perturbations": {"embeddings": perturb_BLD}}
    logits_BLV, _ = model.apply(variables, tokens_BL)
    return jnp.einsum("blv,v->l", logits_BLV, w_V)

  jac_LBLD = jax.jit(jax.jacrev(per_position))(zeros_BLD)
  return np.asarray(jnp.abs(jac_LBLD).sum(axis=(1, 3)))


def test_causal_mask_blocks_gradients_from_the_future(tiny):
  cfg, params, tokens_BL = tiny
  norms_LL = _embedding_jacobian_norms(cfg, params, tokens_BL)
  future = np.triu(np.ones((L, L), bool), k=1)
  assert np.all(norms_LL[future] == 0.0)  # exactly: masked probabilities are exactly zero
  assert np.all(norms_LL[~future] > 0.0)


def test_bidirectional_mask_sees_the_future(tiny):
  _, params, tokens_BL = tiny
  norms_LL = _embedding_jacobian_norms(llama.tiny(mask_kind="bidirectional"), params, tokens_BL)
  assert np.all(norms_LL > 0.0)


# ------------------------------------------------------------------------------------- presets
KNOWN_COUNTS = {  # (expected, tolerance): published sizes
    "llama3_8b": (8_030_261_248, 0),
    "mobilellm_125m": (124.6e6, 0.05e6),
    "mobilellm_350m": (345e6, 0.5e6),
}


@pytest.mark.parametrize("name", sorted(llama.PRESETS))
def test_preset_shapes_counts_and_logical_axes(name):
  cfg = llama.preset(name)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  boxed = jax.eval_shape(llama.Llama(cfg).init, jax.random.key(0), tokens)["params"]
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  leaves = jax.tree.leaves(boxed, is_leaf=is_box)
  assert leaves and all(is_box(x) for x in leaves), "every parameter needs logical axis names"
  for x in leaves:
    assert len(x.names) == x.value.ndim and all(isinstance(n, str) for n in x.names), x.names
    assert x.value.dtype == jnp.float32
  for spec in jax.tree.leaves(nn.get_partition_spec(boxed),
                              is_leaf=lambda x: isinstance(x, PartitionSpec)):
    assert None not in spec

  count = sum(math.prod(x.value.shape) for x in leaves)
  assert count == cfg.num_params()
  if name in KNOWN_COUNTS:
    expected, tol = KNOWN_COUNTS[name]
    assert abs(count - expected) <= tol, f"{name}: {count:,} parameters"


# ------------------------------------------------------------------------------- config errors
def test_heads_must_divide_d_model():
  with pytest.raises(ValueError, match="n_heads") as err:
    llama.tiny(n_heads=5)
  assert "d_model" in str(err.value)


def test_kv_heads_must_divide_heads():
  with pytest.raises(ValueError, match="n_kv_heads"):
    llama.tiny(n_kv_heads=3)


def test_unknown_preset_lists_presets():
  with pytest.raises(ValueError, match="llama9_1t") as err:
    llama.preset("llama9_1t")
  assert all(name in str(err.value) for name in llama.PRESETS)


# ----------------------------------------------------------------------------------- bfloat16
def test_bfloat16_compute_close_to_float32(tiny):
  cfg, params, tokens_BL = tiny
  cfg16 = llama.tiny(dtype="bfloat16")
  shapes16 = jax.eval_shape(llama.Llama(cfg16).init, jax.random.key(0), tokens_BL)["params"]
  assert {x.dtype for x in jax.tree.leaves(shapes16)} == {jnp.dtype(jnp.float32)}  # master weights
  ref_BLV, _ = jax.jit(llama.Llama(cfg).apply)({"params": params}, tokens_BL)
  out_BLV, _ = jax.jit(llama.Llama(cfg16).apply)({"params": params}, tokens_BL)
  assert out_BLV.dtype == jnp.bfloat16
  scale = float(jnp.abs(ref_BLV).max())
  err = float(jnp.abs(out_BLV.astype(jnp.float32) - ref_BLV).max())
  assert err <= 0.03 * scale, (err, scale)

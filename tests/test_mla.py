"""Multi-head latent attention: absorbed == naive, compressed cache size, cached decoding."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import deepseek as ds
from jaxllm.nn.mla import MLA, MLACache, yarn_softmax_scale
from jaxllm.nn.rope import rope_frequencies

B, L, D = 2, 10, 32


def _o1(params, seed=0):
  """O(1) activations: kernels ~ N(0, 1/fan_in), so score differences are not trivially tiny."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [jax.random.normal(k, x.shape) / np.sqrt(x.shape[-2]) if x.ndim >= 2 else
         1.0 + 0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(tree, out)


def _mla(q_lora_rank=16):
  inv_freq = tuple(float(f) for f in rope_frequencies(8, 10000.0))
  return MLA(num_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=12, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=10, inv_freq=inv_freq,
             softmax_scale=yarn_softmax_scale(24))


@pytest.mark.parametrize("q_lora_rank", [16, None], ids=["q_lora", "direct_q"])
def test_absorbed_equals_naive(q_lora_rank):
  mla = _mla(q_lora_rank)
  x_BLD = jax.random.normal(jax.random.key(1), (B, L, D))
  pos_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
  params = _o1(nn.unbox(mla.init(jax.random.key(0), x_BLD, pos_BL, None, True))["params"])
  apply = jax.jit(mla.apply, static_argnums=(4,))
  naive, _ = apply({"params": params}, x_BLD, pos_BL, None, False)
  absorbed, _ = apply({"params": params}, x_BLD, pos_BL, None, True)
  assert float(jnp.max(jnp.abs(naive))) > 0.1
  np.testing.assert_allclose(absorbed, naive, atol=1e-5, rtol=0)

  # prefill 6 then decode one token at a time, absorbed, against the naive full forward
  cache = MLACache.empty(B, 16, 12, 8)
  pieces = []
  for s, e in [(0, 6)] + [(i, i + 1) for i in range(6, L)]:
    out, cache = apply({"params": params}, x_BLD[:, s:e], pos_BL[:, s:e], cache, True)
    pieces.append(out)
  assert int(cache.length) == L
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), naive, atol=1e-5, rtol=0)


def test_cache_bytes_per_token():
  for cfg, dtype in [(ds.tiny(), jnp.float32), (ds.deepseek_v3(), jnp.bfloat16)]:
    cache = jax.eval_shape(functools.partial(ds.init_cache, cfg, 1, 64, dtype))
    per_token = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)
                    if x.ndim == 3) / 64
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * jnp.dtype(dtype).itemsize
    assert per_token == expected
  # DeepSeek-V3: 576 numbers per token per layer vs 2 x 128 heads x 128 for MHA (1.76%)
  cfg = ds.deepseek_v3()
  assert (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (2 * cfg.n_heads * 128) == pytest.approx(
      0.0176, abs=1e-4)


def test_model_cached_decoding_matches_full_forward():
  cfg = ds.tiny(mtp_depth=0, d_model=32, n_layers=2, moe_impl="dense")
  model = ds.DeepSeek(cfg)
  tokens_BL = jax.random.randint(jax.random.key(2), (B, L), 0, cfg.vocab_size)
  variables = model.init(jax.random.key(0), tokens_BL)
  variables = {"params": _o1(nn.unbox(variables["params"])), "balance": variables["balance"]}
  apply = jax.jit(lambda t, c: model.apply(variables, t, cache=c))
  full, _ = jax.jit(lambda t: model.apply(variables, t))(tokens_BL)
  cache = ds.init_cache(cfg, B, 16)
  pieces = []
  for s, e in [(0, 6)] + [(i, i + 1) for i in range(6, L)]:
    out, cache = apply(tokens_BL[:, s:e], cache)
    pieces.append(out)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-4, rtol=1e-5)


def test_yarn_scale_documented_value():
  # DeepSeek-V3 long-context config: factor 40, mscale_all_dim 1 -> (0.1 ln 40 + 1)^2 / sqrt(192)
  assert yarn_softmax_scale(192, 40.0, 1.0) == pytest.approx(
      (0.1 * np.log(40) + 1) ** 2 / np.sqrt(192))
  assert yarn_softmax_scale(192) == pytest.approx(192 ** -0.5)
  assert dataclasses.replace(ds.tiny()).softmax_scale == pytest.approx(24 ** -0.5)

"""Multi-token prediction: memory-efficient backward, DeepSeek MTP loss, self-speculative decoding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.infer import speculative
from jaxllm.models import deepseek as ds
from jaxllm.models import llama
from jaxllm.models.mtp import MultiTokenLlama
from jaxllm.objectives import multi_token as mt

PAD = 258


def _mtl(n_future, **kw):
  cfg = llama.tiny(**{"n_layers": 2, "d_model": 32, "ffn_dim": 64, **kw})
  model = MultiTokenLlama(cfg, n_future)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  return model, params


def test_memory_efficient_grads_equal_summed_loss():
  model, params = _mtl(4)
  tokens = np.random.RandomState(0).randint(0, 256, (2, 17)).astype(np.int32)
  tokens[1, 12:] = PAD
  batch = {"tokens": jnp.asarray(tokens)}
  ref_fn = jax.jit(jax.value_and_grad(mt.multi_token_loss_fn(model, PAD), has_aux=True)).lower(
      params, batch, None).compile()
  seq_fn = jax.jit(mt.multi_token_value_and_grad(model, PAD)).lower(params, batch, None).compile()
  (ref_loss, ref_w), ref_g = ref_fn(params, batch, None)
  (loss, w), g = seq_fn(params, batch, None)
  # one head's logits alive at a time (n = 4, V = 8192, B L = 2048: 939 -> 202 MiB in XLA:CPU)
  temp = lambda f: f.memory_analysis().temp_size_in_bytes
  assert temp(seq_fn) < temp(ref_fn)
  assert float(w) == float(ref_w) == 2 * 16 - 5
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  # the per-token gradients (what the train step applies: summed grads / weight)
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))) / float(w), g, ref_g)
  assert max(jax.tree.leaves(diffs)) <= 1e-6, diffs
  assert float(jnp.max(jnp.abs(ref_g["layers_0"]["attn"]["q_proj"]["kernel"]))) > 1e-4


def test_train_step_drives_the_memory_efficient_backward():
  """`make_train_step(..., value_and_grad=multi_token_value_and_grad(...))`: the same update as
  autodiff of the summed loss, with less temporary memory in the compiled step."""
  from jaxllm.train.step import TrainState, make_train_step
  model, params = _mtl(4, vocab_size=2048)
  tokens = np.random.RandomState(1).randint(0, 256, (4, 33)).astype(np.int32)
  batch = {"tokens": jnp.asarray(tokens)}
  tx = optax.sgd(0.1)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jax.random.key_data(jax.random.key(0)))
  loss_fn = mt.multi_token_loss_fn(model, PAD)
  steps = {name: jax.jit(make_train_step(loss_fn, tx, value_and_grad=vg)).lower(
      state, batch).compile()
      for name, vg in [("autodiff", None), ("sequential", mt.multi_token_value_and_grad(model,
                                                                                         PAD))]}
  (ref, ref_m), (new, new_m) = (steps[k](state, batch) for k in ("autodiff", "sequential"))
  np.testing.assert_allclose(new_m["loss"], ref_m["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), new.params,
               ref.params)
  temp = {k: f.memory_analysis().temp_size_in_bytes for k, f in steps.items()}
  assert temp["sequential"] < temp["autodiff"], temp


def test_one_head_is_a_llama():
  """n_future = 1: the same function as a Llama with the last layer as the head."""
  model, params = _mtl(1)
  tokens_BL = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)
  logits_NBLV, _ = model.apply({"params": params}, tokens_BL)
  lp = {("layers_1" if k == "heads_0" else k): v for k, v in params.items()}
  ref, _ = llama.Llama(model.config).apply({"params": lp}, tokens_BL)
  np.testing.assert_allclose(logits_NBLV[0], ref, atol=1e-5, rtol=0)


def test_future_targets():
  t = jnp.arange(6)[None]
  np.testing.assert_array_equal(mt.future_targets(t, 3, -1)[:, 0], [[1, 2, 3, 4, 5],
                                                                    [2, 3, 4, 5, -1],
                                                                    [3, 4, 5, -1, -1]])


def test_speculative_equals_greedy():
  """Random prompts, an untrained model with 4 heads and a model whose drafts are right: the
  output is greedy's exactly; tokens per forward lie in [1, n] and rise with good drafts."""
  model, params = _mtl(4)
  prompts = [jax.random.randint(jax.random.key(s), (1, 7), 0, 256) for s in range(3)]
  rep = speculative.benchmark(model, params, prompts, max_new_tokens=24)
  assert rep.identical
  assert 1.0 <= rep.tokens_per_forward <= 4.0
  # a zero final-norm scale makes every head predict token 0 everywhere: all drafts are right
  same = {**params, "final_norm": {"scale": jnp.zeros_like(params["final_norm"]["scale"])}}
  rep2 = speculative.benchmark(model, same, prompts[:1], max_new_tokens=24)
  assert rep2.identical
  assert rep2.tokens_per_forward == 4.0


def _deepseek(**kw):
  cfg = ds.tiny(**{"d_model": 32, "n_heads": 2, "moe_dim": 16, "ffn_dim": 48, "n_layers": 2,
                   "moe_impl": "dense", **kw})
  model = ds.DeepSeek(cfg)
  v = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return model, v["params"], v["balance"]


def test_deepseek_mtp_loss_and_train_step():
  """loss = main CE + (lambda / D) sum_k CE_k (+ the small balance loss); the MTP layer trains; the
  router bias moves outside the gradient. One compiled step serves all checks."""
  model, params, balance = _deepseek(seq_aux_alpha=1e-4)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 17)), jnp.int32)
  tx = optax.adam(3e-3)
  step = jax.jit(mt.deepseek_train_step(model, tx, PAD, 0.3, bias_gamma=1e-3))
  opt_state, p, b = tx.init(params), params, balance
  metrics = []
  for _ in range(4):
    p, opt_state, b, m = step(p, opt_state, b, {"tokens": tokens})
    metrics.append(jax.device_get(m))
  first = metrics[0]
  assert first["mtp_loss"].shape == (1,)
  expect = float(first["main_loss"] + 0.3 * first["mtp_loss"][0])
  assert expect < float(first["loss"]) < expect + 1e-3  # + alpha-scaled balance loss
  assert metrics[-1]["loss"] < first["loss"]
  assert float(first["maxvio_max"]) >= float(first["maxvio_mean"]) >= 0
  assert not np.allclose(p["mtp_0"]["eh_proj"]["kernel"], params["mtp_0"]["eh_proj"]["kernel"])
  moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), b, balance)
  assert max(jax.tree.leaves(moved)) > 0


def test_deepseek_mtp_speculative_equals_greedy():
  model, params, balance = _deepseek()
  variables = {"params": jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, params),
               "balance": balance}
  for seed in range(2):
    prompt = jax.random.randint(jax.random.key(seed), (1, 6), 0, 256)
    greedy = speculative.deepseek_greedy_decode(model, variables, prompt, max_new_tokens=16)
    spec, forwards = speculative.deepseek_mtp_speculative_decode(model, variables, prompt,
                                                                 max_new_tokens=16)
    np.testing.assert_array_equal(spec, greedy)
    assert 8 <= int(forwards) <= 16
  # zero output norms: main model and MTP both always predict token 0, every draft is accepted
  p = dict(variables["params"])
  p["final_norm"] = {"scale": jnp.zeros_like(p["final_norm"]["scale"])}
  p["mtp_0"] = {**p["mtp_0"], "shared_head_norm": {"scale": jnp.zeros_like(
      p["mtp_0"]["shared_head_norm"]["scale"])}}
  spec, forwards = speculative.deepseek_mtp_speculative_decode(
      model, {**variables, "params": p}, prompt, max_new_tokens=16)
  np.testing.assert_array_equal(spec, np.zeros(16))
  assert int(forwards) == 8

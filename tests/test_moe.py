"""DeepSeekMoE: routing rules, dense == ragged, expert parallelism on 8 devices, balancing."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxllm.nn import moe

E, K, D, F = 8, 2, 16, 24


def _layer(impl="ragged", **kw):
  return moe.MoE(n_routed=E, n_shared=1, moe_dim=F, top_k=K, n_group=2, topk_group=1,
                 route_scale=2.5, impl=impl, **kw)


def _variables(layer, x_BLD, seed=0):
  v = nn.unbox(layer.init(jax.random.key(seed), x_BLD))
  params = jax.tree.map(lambda p: p * 10.0 if p.ndim == 3 else p, v["params"])  # O(1) experts
  bias = {"e_score_correction_bias": 0.05 * jax.random.normal(jax.random.key(7), (E,))}
  return {"params": params, "balance": bias}


def test_routing_rules():
  logits_TE = jax.random.normal(jax.random.key(0), (64, E)) * 2
  bias_E = jnp.zeros(E).at[3].set(10.0)
  gates, idx, scores = moe.route(logits_TE, bias_E, top_k=K, n_group=2, topk_group=1,
                                 route_scale=2.5)
  idx = np.asarray(idx)
  assert (idx == 3).any(axis=1).all()  # the bias forces expert 3 into every selection ...
  assert (idx // 4 == 0).all()  # ... and with it group 0, the only eligible group
  # gates come from the un-biased affinities, normalised over the selection, times 2.5
  sel = np.take_along_axis(np.asarray(scores), idx, axis=1)
  np.testing.assert_allclose(gates, 2.5 * sel / sel.sum(1, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gates).sum(1), 2.5, rtol=1e-6)


def test_dense_equals_ragged_forward_and_grads():
  x_BLD = jax.random.normal(jax.random.key(1), (2, 6, D))
  variables = _variables(_layer("dense"), x_BLD)

  def loss(params, impl):
    y = _layer(impl).apply({**variables, "params": params}, x_BLD)
    return jnp.sum(jnp.sin(y))

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref, ref_g = grad_fn(variables["params"], "dense")
  val, g = grad_fn(variables["params"], "ragged")
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g, ref_g)


@pytest.mark.parametrize("impl", ["ep_allgather", "ep_all_to_all"])
def test_expert_parallel_equals_single_device(impl):
  """8 simulated devices, mesh (data 2, expert 4; Auto axes as `jaxllm.sharding.make_mesh`):
  loss and gradients equal the one-device run."""
  x_BLD = jax.random.normal(jax.random.key(1), (8, 4, D))
  variables = _variables(_layer("ragged"), x_BLD)

  def loss(params, x, impl):
    y = _layer(impl).apply({**variables, "params": params}, x)
    return jnp.sum(jnp.sin(y))

  ref, ref_g = jax.jit(jax.value_and_grad(loss), static_argnums=2)(
      variables["params"], x_BLD, "ragged")
  mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    x = jax.device_put(x_BLD, jax.NamedSharding(mesh, jax.P(("data", "expert"))))
    val, g = jax.jit(jax.value_and_grad(loss), static_argnums=2)(variables["params"], x, impl)
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g, ref_g)


def test_ep_needs_expert_axis():
  x_BLD = jnp.ones((8, 4, D))
  variables = _variables(_layer("ragged"), x_BLD)
  with pytest.raises(ValueError, match="'expert' axis"):
    _layer("ep_allgather").apply(variables, x_BLD)


def test_bias_update_lowers_maxvio_on_skewed_router():
  """16 experts, top-2, router skewed towards a few experts: MaxVio falls below 0.2 within a few
  hundred aux-loss-free bias updates and stays high without them."""
  n_exp, d = 16, 32
  w_DE = jax.random.normal(jax.random.key(0), (d, n_exp)) / np.sqrt(d)
  skew_E = jnp.linspace(2.0, -2.0, n_exp)  # expert 0 strongly preferred

  @jax.jit
  def step(bias_E, key):
    x_TD = jax.random.normal(key, (4096, d))
    _, idx, _ = moe.route(x_TD @ w_DE + skew_E[None, :], bias_E, top_k=2)
    load_E = moe.expert_load(idx, n_exp)
    new = moe.update_balance_bias({"e_score_correction_bias": bias_E}, {"load": (load_E,)}, 3e-3)
    return new["e_score_correction_bias"], moe.max_violation(load_E)

  bias_E = jnp.zeros(n_exp)
  vios = []
  for key in jax.random.split(jax.random.key(1), 300):
    bias_E, vio = step(bias_E, key)
    vios.append(float(vio))
  assert vios[0] > 1.0
  assert np.mean(vios[-20:]) < 0.2, vios[-20:]


def test_model_collections_and_balance_loss():
  """The layer sows loads into `moe_stats` and the sequence-wise loss into `moe_losses`; the bias
  update reads them; the balance loss of a uniform router equals alpha."""
  x_BLD = jax.random.normal(jax.random.key(1), (2, 6, D))
  layer = _layer("ragged", seq_aux_alpha=1e-2)
  variables = _variables(layer, x_BLD)
  _, state = layer.apply(variables, x_BLD, mutable=["moe_stats", "moe_losses"])
  load_E = state["moe_stats"]["load"][0]
  assert float(load_E.sum()) == 2 * 6 * K
  assert float(state["moe_losses"]["seq_balance"][0]) > 0
  new = moe.update_balance_bias(variables["balance"], state["moe_stats"], 1e-3)
  delta = new["e_score_correction_bias"] - variables["balance"]["e_score_correction_bias"]
  np.testing.assert_allclose(delta, 1e-3 * np.sign(load_E.mean() - load_E), atol=1e-7)
  # uniform affinities and loads: sum_i f_i P_i = sum_i 1 * 1/E = 1
  idx_BLK = jnp.tile(jnp.arange(E).reshape(1, E // K, K), (1, 3, 1))
  uniform = moe.sequence_balance_loss(jnp.ones((1, 3 * E // K, E)), idx_BLK, 0.5)
  np.testing.assert_allclose(uniform, 0.5, rtol=1e-6)


def test_router_bias_is_required_at_apply():
  """Without the `balance` collection the layer used to route with a silent zero bias; now it
  refuses, naming the collection to pass."""
  x_BLD = jax.random.normal(jax.random.key(1), (2, 6, D))
  layer = _layer("dense")
  variables = _variables(layer, x_BLD)
  with pytest.raises(ValueError, match="balance"):
    layer.apply({"params": variables["params"]}, x_BLD)
  assert layer.apply(variables, x_BLD).shape == x_BLD.shape


def test_eval_fn_scores_a_deepseek_model_with_its_router_bias():
  """`jaxllm.eval.lm.make_eval_fn` takes the whole variables dict, so a DeepSeek model is
  scored with its trained router bias (which changes the routing, hence the loss)."""
  from jaxllm.eval import lm as lm_eval
  from jaxllm.models import deepseek as ds
  from jaxllm.objectives.next_token import next_token_nll
  cfg = ds.tiny(d_model=32, n_heads=2, moe_dim=16, ffn_dim=48, n_layers=2, moe_impl="dense",
                mtp_depth=0)
  model = ds.DeepSeek(cfg)
  v = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  bias = jax.tree.map(lambda b: 3.0 * jax.random.normal(jax.random.key(3), b.shape), v["balance"])
  variables = {"params": v["params"], "balance": bias}
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 13)), jnp.int32)
  fn = jax.jit(lm_eval.make_eval_fn(model, 258, np.ones(259)))
  nll, count, n_bytes = fn(variables, {"tokens": tokens})
  logits, _ = model.apply(variables, tokens[:, :-1])
  ref, ref_count = next_token_nll(logits, tokens[:, 1:], 258)
  np.testing.assert_allclose(nll, ref, rtol=1e-6)
  assert float(count) == float(ref_count) == float(n_bytes) == 24
  zero = fn({**variables, "balance": jax.tree.map(jnp.zeros_like, bias)}, {"tokens": tokens})[0]
  assert abs(float(zero) - float(nll)) > 1e-4  # the bias matters, so it must be the trained one

"""Optax transforms: scale-parameter optimizer, trust-mask masking, FP -> QAT switch."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm import quant
from jaxllm.quant import policy as pol
from jaxllm.quant import quantizers as q
from jaxllm.quant import transforms as qt

X = jax.random.normal(jax.random.key(0), (8, 32))


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, use_bias=False, name="out")(nn.relu(
        nn.Dense(32, use_bias=False, name="fc")(x)))


def _setup(policy):
  model = policy.apply(MLP())
  params = jax.jit(model.init)(jax.random.key(1), X)["params"]
  loss = lambda p: jnp.mean(model.apply({"params": p}, X) ** 2)
  return model, params, loss


def test_docstring_examples():
  assert doctest.testmod(qt).failed == 0


def test_scales_get_their_own_optimizer_and_no_weight_decay():
  policy = quant.Policy((quant.Rule("fc", quant.paretoq(2)),), qat_gate=True)
  _, params, loss = _setup(policy)
  tx = qt.with_scale_optimizer(optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1)),
                               optax.sgd(1.0))
  grads = jax.jit(jax.grad(loss))(params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  fc = "fc"
  np.testing.assert_allclose(updates[fc][pol.QUANT_SCALE], -grads[fc][pol.QUANT_SCALE], rtol=1e-6)
  np.testing.assert_allclose(updates[fc]["kernel"],
                             -0.1 * (grads[fc]["kernel"] + 0.5 * params[fc]["kernel"]), rtol=1e-5)
  assert float(updates[fc][pol.QAT_GATE]) == 0.0
  assert qt.scale_param_labels(params)[fc] == {"kernel": "weight", pol.QUANT_SCALE: "scale",
                                               pol.QAT_GATE: "gate"}


def test_trust_mask_zeroes_masked_entries():
  policy = quant.Policy((quant.Rule("fc", quant.quest(2, None)),))
  _, params, _ = _setup(policy)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(qt.scale_by_trust_mask(policy).update)(ones, optax.EmptyState(), params)
  m = q.quest_trust_mask(params["fc"]["kernel"].T, 2).T
  assert 0 < float(m.mean()) < 1
  np.testing.assert_array_equal(updates["fc"]["kernel"], m)
  np.testing.assert_array_equal(updates["out"]["kernel"], 1.0)  # not a QuEST layer


def test_trust_mask_transform_equals_masked_vjp_with_hadamard():
  rule = lambda ts: quant.Policy((quant.Rule("fc", quant.quest(2, 16, trust_scale=ts)),))
  _, params, loss_trust = _setup(rule(1.0))
  _, _, loss_ste = _setup(rule(None))
  g_trust, g_ste = jax.jit(jax.grad(loss_trust))(params), jax.jit(jax.grad(loss_ste))(params)
  assert not np.allclose(g_trust["fc"]["kernel"], g_ste["fc"]["kernel"])
  tx = qt.trust_masked(optax.sgd(1.0), rule(1.0))
  u, _ = jax.jit(tx.update)(g_ste, tx.init(params), params)
  np.testing.assert_allclose(-u["fc"]["kernel"], g_trust["fc"]["kernel"], atol=1e-6)


def test_qat_switch_from_full_precision():
  policy = quant.Policy((quant.Rule("fc", quant.paretoq(2)),), qat_gate=True)
  _, params, loss = _setup(policy)
  fp_loss = lambda p: jnp.mean(MLP().apply({"params": {k: {"kernel": v["kernel"]}
                                                        for k, v in p.items()}}, X) ** 2)
  tx = optax.chain(qt.with_scale_optimizer(optax.sgd(0.1), optax.sgd(0.01)),
                   qt.qat_switch(10, policy, qat_fraction=0.8))  # switch at update 2
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    l, g = jax.value_and_grad(loss)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, l

  alpha0 = params["fc"][pol.QUANT_SCALE]
  for i in range(4):
    before = params
    params, state, l = step(params, state)
    fc = params["fc"]
    if i < 2:  # full precision: the gate is closed, scales frozen, loss is the FP loss
      assert float(fc[pol.QAT_GATE]) == 0.0
      np.testing.assert_array_equal(fc[pol.QUANT_SCALE], alpha0)
      np.testing.assert_allclose(l, fp_loss(before), rtol=1e-6)
    elif i == 2:  # the switch: gate opens, scales re-initialised from the new weights
      assert float(fc[pol.QAT_GATE]) == 1.0
      np.testing.assert_allclose(fc[pol.QUANT_SCALE],
                                 pol.init_alpha(fc["kernel"].T, quant.paretoq(2)), rtol=1e-6)
    else:  # QAT: scales train
      assert float(fc[pol.QAT_GATE]) == 1.0
      assert not np.allclose(fc[pol.QUANT_SCALE], before["fc"][pol.QUANT_SCALE])
      assert abs(float(l) - float(fp_loss(before))) > 1e-7



def test_gated_model_trains_like_the_fp_model_until_the_switch():
  """The ParetoQ experiment's fairness: before the switch, a `qat_gate` model under the full QAT
  chain (clipping, AdamW with the decay mask, the scale optimizer, the switch) takes the same
  steps on the same batches as the plain FP model under the same chain."""
  from jaxllm.models import llama
  from jaxllm.train.optim import decay_mask
  from jaxllm.train.step import TrainState, lm_loss_fn, make_train_step

  model = llama.Llama(llama.tiny(n_layers=1))
  policy = quant.Policy((quant.Rule(r"layers_\d+/(attn|mlp)/.*", quant.paretoq(2)),),
                        qat_gate=True)
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 1, 8, 1e-3)
  chain = qt.with_scale_optimizer(
      optax.chain(optax.clip_by_global_norm(1.0),
                  optax.adamw(sched, weight_decay=0.1, mask=decay_mask)), optax.adam(sched))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (3, 4, 17)), jnp.int32)

  def run(m, tx):
    params = nn.unbox(jax.jit(m.init)(jax.random.key(0), tokens[0, :, :-1]))["params"]
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    step = jax.jit(make_train_step(lm_loss_fn(m, 258), tx))
    losses = []
    for batch in tokens:
      state, metrics = step(state, {"tokens": batch})
      losses.append(float(metrics["loss"]))
    return state.params, losses

  fp_params, fp_losses = run(model, chain)
  q_params, q_losses = run(policy.apply(model),
                           optax.chain(chain, qt.qat_switch(8, policy, qat_fraction=0.5)))
  np.testing.assert_allclose(q_losses, fp_losses, rtol=1e-6)
  q_params = _drop(q_params, (pol.QUANT_SCALE, pol.QAT_GATE))
  assert jax.tree.structure(q_params) == jax.tree.structure(fp_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               q_params, fp_params)
  assert not np.allclose(fp_losses[0], fp_losses[2])  # the steps did train


def _drop(tree, names):
  if isinstance(tree, dict):
    return {k: _drop(v, names) for k, v in tree.items() if k not in names}
  return tree

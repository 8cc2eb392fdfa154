"""Policies: rules over module paths applied to unchanged models; errors; sharded == single."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import quant
from jaxllm.models import llama
from jaxllm.quant import policy as pol
from jaxllm.quant import transforms
from jaxllm.sharding import MeshConfig, make_mesh
from jaxllm.train.step import ShardedTrainer, lm_loss_fn

PAD = 258
TOKENS = np.random.RandomState(0).randint(0, 256, (8, 17)).astype(np.int32)


def _tiny():
  return llama.Llama(llama.tiny())


def test_excluded_and_unmatched_layers_are_bit_identical():
  model = _tiny()
  policy = quant.Policy((quant.Rule(r"layers_1/mlp/.*", quant.quest(2, 64), quant.quest(2, 64)),))
  x = jnp.asarray(TOKENS)
  fp = jax.jit(model.init)(jax.random.key(0), x)
  qv = jax.jit(policy.apply(model).init)(jax.random.key(0), x)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), fp, qv))
  params = nn.unbox(fp)
  kw = {"capture_intermediates": True, "mutable": ["intermediates"]}
  _, fp_int = jax.jit(lambda p, x: model.apply(p, x, **kw))(params, x)
  _, q_int = jax.jit(lambda p, x: policy.apply(model).apply(p, x, **kw))(params, x)
  same = lambda *ks: all(jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(jnp.array_equal(a, b)), _get(fp_int, ks), _get(q_int, ks))))
  assert same("layers_0", "__call__")
  assert same("layers_1", "attn", "__call__")
  assert not same("layers_1", "mlp", "down_proj", "__call__")
  # lm_head is excluded by default: a plain Dense of its (quantized-model) input
  h = _get(q_int, ("final_norm", "__call__"))
  lm = params["params"]["lm_head"]["kernel"]
  h = h.reshape(-1, h.shape[-1])  # the model folds [B, L] into one axis before the head
  np.testing.assert_array_equal(_get(q_int, ("lm_head", "__call__")).reshape(h.shape[0], -1),
                                nn.Dense(lm.shape[1], use_bias=False).apply(
                                    {"params": {"kernel": lm}}, h))
  assert policy.match("lm_head") is None and quant.uniform(quant.paretoq(2)).match("lm_head") is None


def _get(tree, keys):
  tree = tree["intermediates"]
  for k in keys:
    tree = tree[k]
  return tree[0] if isinstance(tree, tuple) else tree


class UserMLP(nn.Module):
  """A user's own model: nested Dense layers with biases, no logical axis names."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="fc1")(x))
    return nn.Dense(4, name="head")(nn.Dense(32, name="fc2")(h))


def test_users_own_model_is_quantized_and_trains_scales():
  policy = quant.Policy((quant.Rule("fc.*", quant.paretoq(2, group_size=8),
                                    quant.absmax(8)),), exclude=("head",))
  qm = policy.apply(UserMLP())
  x = jax.random.normal(jax.random.key(0), (5, 16))
  params = jax.jit(qm.init)(jax.random.key(1), x)["params"]
  assert params["fc1"][pol.QUANT_SCALE].shape == (2, 32)  # [K // group, out]
  assert pol.QUANT_SCALE not in params["head"]
  grads = jax.jit(jax.grad(lambda p: jnp.sum(qm.apply({"params": p}, x) ** 2)))(params)
  assert float(jnp.abs(grads["fc1"][pol.QUANT_SCALE]).sum()) > 0
  np.testing.assert_array_equal(grads["fc2"]["bias"] != 0, True)
  def bare(p, x):
    with policy.intercept():  # the bare context manager gives the same result
      return UserMLP().apply({"params": p}, x)

  np.testing.assert_array_equal(jax.jit(bare)(params, x),
                                jax.jit(lambda p, x: qm.apply({"params": p}, x))(params, x))


def test_bad_input_errors_name_rule_and_fix():
  model, x = _tiny(), jnp.asarray(TOKENS)

  def init(policy):  # errors are raised while tracing
    return jax.eval_shape(lambda: policy.apply(model).init(jax.random.key(0), x))

  with pytest.raises(ValueError, match=r"rule 0 \(pattern '\.\*'\).*paretoq does not support bits=5"):
    quant.uniform(quant.paretoq(5))
  with pytest.raises(ValueError, match=r"rule 0.*weights only.*quest\(bits\)"):
    quant.uniform(None, quant.paretoq(2))
  with pytest.raises(ValueError, match=r"rule 1 \(pattern 'layer_0/\.\*'\) matched no nn.Dense.*"
                                       r"layers_0/attn/q_proj.*Fix the pattern"):
    init(quant.Policy((quant.Rule(".*mlp.*", quant.paretoq(2)),
                       quant.Rule("layer_0/.*", quant.paretoq(4)))))
  with pytest.raises(ValueError, match=r"rule 0.*'layers_0/mlp/down_proj'.*group_size=48 does "
                                       r"not divide.*128.*choose a divisor"):
    init(quant.uniform(quant.paretoq(4, group_size=48), pattern=".*down_proj"))
  with pytest.raises(ValueError, match=r"rule 0.*Hadamard block 128 does not divide.*64"):
    init(quant.uniform(quant.quest(4)))
  with pytest.raises(ValueError, match=r"matched no nn.Dense.*taken by an earlier rule or by "
                                       r"Policy.exclude"):
    init(quant.uniform(quant.paretoq(2), pattern="lm_head"))


MIXED = quant.Policy((
    quant.Rule(r"layers_\d+/attn/.*", quant.paretoq(2)),
    quant.Rule(r"layers_\d+/mlp/.*", quant.quest(4, 64), quant.quest(4, 64)),
))


def _loss_and_grads(mesh_cfg, devices=None):
  model = MIXED.apply(llama.Llama(llama.tiny(n_layers=1)))
  tx = transforms.with_scale_optimizer(optax.adamw(1e-2, weight_decay=0.1), optax.adam(1e-3))
  trainer = ShardedTrainer(model, tx, make_mesh(mesh_cfg, devices), lm_loss_fn(model, PAD),
                           {"tokens": jax.ShapeDtypeStruct(TOKENS.shape, jnp.int32)})
  loss_fn = lm_loss_fn(model, PAD)

  def fn(params, batch):
    (s, w), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.key(0))
    return s / w, jax.tree.map(lambda v: v / w, g)

  state = trainer.init(0)
  return jax.device_get(trainer.evaluate(fn, state.params,
                                         trainer.shard_batch({"tokens": TOKENS}))), state


def test_quantized_model_sharded_equals_single_device():
  (ref_loss, ref_grads), _ = _loss_and_grads(MeshConfig(data=1), jax.devices()[:1])
  (loss, grads), state = _loss_and_grads(MeshConfig(data=2, fsdp=2, tensor=2))
  assert abs(float(loss) - float(ref_loss)) <= 1e-5
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), grads, ref_grads)
  assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs
  assert float(jnp.abs(grads["layers_0"]["attn"]["q_proj"][pol.QUANT_SCALE]).sum()) > 0
  alpha = state.params["layers_0"]["attn"]["q_proj"][pol.QUANT_SCALE]
  assert alpha.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")

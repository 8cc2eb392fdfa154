"""Sharded runs on 8 simulated CPU devices equal the single-device run (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.models import llama
from jaxllm.sharding import MeshConfig, make_mesh
from jaxllm.train.step import ShardedTrainer, lm_loss_fn

PAD = 258
MESHES = [MeshConfig(data=8), MeshConfig(data=1, fsdp=8), MeshConfig(data=2, fsdp=2, tensor=2),
          MeshConfig(data=1, fsdp=4, tensor=2)]


def _setup(mesh_cfg, devices=None, grad_accum=1, **model_kw):
  cfg = llama.tiny(**{"n_heads": 4, "n_kv_heads": 2, **model_kw})
  model = llama.Llama(cfg)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  tokens = np.random.RandomState(0).randint(0, 256, (8, 33)).astype(np.int32)
  tokens[3, 20:] = PAD  # padding must be ignored identically everywhere
  trainer = ShardedTrainer(model, tx, make_mesh(mesh_cfg, devices), lm_loss_fn(model, PAD),
                           {"tokens": jax.ShapeDtypeStruct(tokens.shape, jnp.int32)},
                           grad_accum=grad_accum)
  return trainer, tokens


def _loss_and_grads(trainer, tokens):
  loss_fn = lm_loss_fn(trainer.model, PAD)

  def fn(params, batch):
    (s, w), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.key(0))
    return s / w, jax.tree.map(lambda x: x / w, g)

  state = trainer.init(0)
  return jax.device_get(trainer.evaluate(fn, state.params, trainer.shard_batch(
      {"tokens": tokens}))), state


def _train(trainer, tokens, steps=3):
  state = trainer.init(0)
  losses = []
  for _ in range(steps):
    state, m = trainer.train_step(state, trainer.shard_batch({"tokens": tokens}))
    losses.append(float(m["loss"]))
  return np.array(losses), jax.device_get(state.params)


@pytest.fixture(scope="module")
def single_device():
  trainer, tokens = _setup(MeshConfig(data=1), jax.devices()[:1])
  (loss, grads), _ = _loss_and_grads(trainer, tokens)
  return loss, grads, _train(trainer, tokens)


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: f"d{m.data}f{m.fsdp}t{m.tensor}")
def test_sharded_equals_single_device(mesh_cfg, single_device):
  ref_loss, ref_grads, (ref_losses, ref_params) = single_device
  trainer, tokens = _setup(mesh_cfg)
  (loss, grads), state = _loss_and_grads(trainer, tokens)
  assert abs(float(loss) - float(ref_loss)) <= 1e-5
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), grads, ref_grads)
  assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs
  # parameters really are distributed as the rules say
  q = state.params["layers_0"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(q.addressable_shards) == 8
  if mesh_cfg.fsdp * mesh_cfg.tensor > 1:
    assert q.addressable_shards[0].data.size < q.size
  losses, params = _train(trainer, tokens)
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  _assert_params_close(params, ref_params)


def _assert_params_close(params, ref_params):
  # Adam divides by sqrt(v): float32 reduction-order noise in near-zero gradients becomes a
  # visible fraction of one lr=1e-2 step, so parameters agree to 5e-4 (5% of a step), while
  # losses and gradients agree to 1e-5.
  pdiff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
  assert max(jax.tree.leaves(pdiff)) <= 5e-4, pdiff


def test_gradient_accumulation_equals_full_batch(single_device):
  _, _, (ref_losses, ref_params) = single_device
  trainer, tokens = _setup(MeshConfig(data=2, fsdp=2, tensor=2), grad_accum=2)
  losses, params = _train(trainer, tokens)
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  _assert_params_close(params, ref_params)


def test_indivisible_parameter_names_parameter_and_fix():
  with pytest.raises(ValueError, match=r"mlp.*proj.*dimension of 100.*'tensor'.*size 8"):
    _setup(MeshConfig(data=1, fsdp=1, tensor=8), ffn_dim=100)


def test_mesh_config_errors():
  with pytest.raises(ValueError, match="needs 6 devices but 8"):
    make_mesh(MeshConfig(data=3, fsdp=2, tensor=1))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    make_mesh(MeshConfig(data=-1, fsdp=-1))

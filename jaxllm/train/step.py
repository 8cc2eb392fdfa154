"""Train state, its sharded initialisation, and the jitted train and eval steps.

The step is model-agnostic: it takes a `loss_fn(params, batch, rng) -> (loss_sum, weight)`
returning a *summed* loss and the number of items it sums over, so gradient accumulation over
micro-batches gives exactly the full-batch mean (sum of sums / sum of weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxllm.objectives.next_token import next_token_nll, split_tokens
from jaxllm.sharding import rules as rules_lib

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, jax.Array]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key data, so checkpoints hold plain arrays


def lm_loss_fn(model: nn.Module, pad_id: int) -> LossFn:
  """Next-token loss of a model whose `apply` returns `(logits, cache)`."""

  def loss_fn(params, batch, rng):
    del rng  # deterministic model (no dropout)
    inputs_BL, targets_BL = split_tokens(batch["tokens"])
    logits_BLV, _ = model.apply({"params": params}, inputs_BL)
    return next_token_nll(logits_BLV, targets_BL, pad_id)

  return loss_fn


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    grad_accum: int = 1, value_and_grad: Callable | None = None,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """One optimizer update on a batch, split into `grad_accum` sequential micro-batches.

  `value_and_grad`, if given, replaces `jax.value_and_grad(loss_fn, has_aux=True)`: a function
  (params, batch, rng) -> ((loss_sum, weight), grads) with the same values, computed another way
  (e.g. `jaxllm.objectives.multi_token.multi_token_value_and_grad`, the memory-efficient
  multi-token backward)."""
  # loss_fn returns (loss_sum, weight): differentiate the sum, carry the weight as aux.
  grad_fn = value_and_grad or jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    if grad_accum == 1:
      (loss_sum, weight), grads = grad_fn(state.params, batch, step_rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, inputs):
        mb, r = inputs
        (ls, w), g = grad_fn(state.params, mb, r)
        acc_g, acc_l, acc_w = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + ls, acc_w + w), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss_sum, weight), _ = jax.lax.scan(
          accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
          (micro, jax.random.split(step_rng, grad_accum)))
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / weight, "grad_norm": optax.tree.norm(grads),
               "tokens": weight}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(rng))
    return new_state, metrics

  return train_step


class ShardedTrainer:
  """Builds the state abstractly, derives its shardings from the logical rules, and jits
  `init`, `train_step` and `eval_step` with explicit in/out shardings and buffer donation."""

  def __init__(self, model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
               loss_fn: LossFn, example_batch: dict[str, jax.ShapeDtypeStruct],
               grad_accum: int = 1, rules=rules_lib.LOGICAL_RULES):
    self.model, self.optimizer, self.mesh, self.rules = model, optimizer, mesh, rules
    example_inputs = split_tokens(
        jnp.zeros(example_batch["tokens"].shape, example_batch["tokens"].dtype))[0][:1]

    def boxed_state(seed):
      init_rng, state_rng = jax.random.split(jax.random.key(seed))
      params = model.init(init_rng, example_inputs)["params"]
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=optimizer.init(params), rng=jax.random.key_data(state_rng))

    # Initialisation is traced without the mesh in scope: Flax would otherwise constrain each
    # DenseGeneral kernel while it still has its flattened 2-D init shape. `out_shardings`
    # places the parameters instead.
    with nn.logical_axis_rules(rules):
      abstract = jax.eval_shape(boxed_state, 0)
      rules_lib.check_divisible(abstract.params, mesh, rules)
      self.state_shardings = rules_lib.logical_shardings(abstract, mesh, rules)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract), self.state_shardings)
    self.batch_sharding = rules_lib.batch_sharding(mesh, rules)
    repl = rules_lib.replicated(mesh)
    self._init = jax.jit(lambda seed: nn.unbox(boxed_state(seed)),
                         out_shardings=self.state_shardings)
    self._step = jax.jit(make_train_step(loss_fn, optimizer, grad_accum),
                         in_shardings=(self.state_shardings, self.batch_sharding),
                         out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    self._eval_fns: dict[Any, Callable] = {}

  def context(self):
    """Mesh and logical rules in scope, so activation constraints resolve while tracing."""
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def init(self, seed: int) -> TrainState:
    with nn.logical_axis_rules(self.rules):
      return self._init(seed)

  def train_step(self, state: TrainState, batch: dict[str, jax.Array]):
    with self.context():
      return self._step(state, batch)

  def evaluate(self, fn: Callable[[Any, dict], Any], params, batch: dict[str, jax.Array]):
    """Runs `fn(params, batch)` jitted with the state's parameter and batch shardings; the
    (small) outputs are replicated. Compiled once per `fn`."""
    if fn not in self._eval_fns:
      self._eval_fns[fn] = jax.jit(
          fn, in_shardings=(self.state_shardings.params, self.batch_sharding),
          out_shardings=rules_lib.replicated(self.mesh))
    with self.context():
      return self._eval_fns[fn](params, batch)

  def shard_batch(self, local_batch: dict[str, Any]) -> dict[str, jax.Array]:
    """A process-local numpy batch -> one global array sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}

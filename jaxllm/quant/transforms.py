"""Optax transforms for quantization-aware training; all compose with `optax.chain`.

- `scale_by_trust_mask(policy)` / `trust_masked(inner, policy)`: QuEST's trust-estimator mask on
  the weight updates of QuEST-quantized layers (in the Hadamard domain when the rule rotates).
- `scale_by_qat_switch(switch_step, policy)` / `qat_switch(total_steps, policy, qat_fraction)`:
  ParetoQ's recipe of full-precision training followed by QAT: the `qat_gate` parameters of a
  `Policy(qat_gate=True)` model are flipped to 1 at the switch step, and the ParetoQ scales are
  re-initialised from the weights at that moment (the authors start QAT from a trained FP model
  and initialise the scales from it). Before the switch, scales and gates do not move.
- `scale_param_labels` / `with_scale_optimizer(weights_tx, scales_tx)`: ParetoQ scales get their own
  optimizer (own learning rate, no weight decay) and gates none.

Parameters are recognised by leaf name (`quant_alpha`, `qat_gate`, see `jaxllm.quant.policy`) and
their module path (the '/'-joined keys above the leaf), so these work on any params tree that a
policy produced.
"""

from __future__ import annotations

import functools

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxllm.quant import policy as pol
from jaxllm.quant import quantizers as q
from jaxllm.quant.hadamard import hadamard_transform


def _leaf_name(path) -> str:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(names[-1]) if names else ""


def scale_param_labels(params) -> Any:
  """'scale' for ParetoQ scales, 'gate' for QAT gates, 'weight' for everything else."""

  def label(path, _):
    name = _leaf_name(path)
    return {pol.QUANT_SCALE: "scale", pol.QAT_GATE: "gate"}.get(name, "weight")

  return jax.tree_util.tree_map_with_path(label, params)


class ScaleOptimizerState(NamedTuple):
  weights: Any  # weights_tx state over the whole tree
  scales: Any  # scales_tx state over {path: scale} (no masked nodes, so it shards like params)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _scale_leaves(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
  return {jax.tree_util.keystr(p): v for p, v in flat if _leaf_name(p) == pol.QUANT_SCALE}


def with_scale_optimizer(weights_tx: optax.GradientTransformation,
                         scales_tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`weights_tx` for ordinary parameters, `scales_tx` for ParetoQ scales, zero for QAT gates.

  Like `optax.partition`, but the scales' state is a flat `{path: array}` dict and the weights'
  state covers the whole tree (scale and gate entries are computed and discarded: they are tiny),
  so no `MaskedNode`s appear and `ShardedTrainer` derives the state's shardings as usual.

  Example (scales at 10x the learning rate, no weight decay)::

    >>> import optax
    >>> tx = with_scale_optimizer(optax.adamw(2e-5, weight_decay=0.1), optax.adam(2e-4))
    >>> params = {"fc": {"kernel": jnp.ones((2, 2)), "quant_alpha": jnp.ones((1, 2))}}
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> [round(float(v), 6) for v in updates["fc"]["quant_alpha"][0]]
    [-0.0002, -0.0002]
  """

  def init_fn(params):
    return ScaleOptimizerState(weights_tx.init(params), scales_tx.init(_scale_leaves(params)))

  def update_fn(updates, state, params=None):
    uw, sw = weights_tx.update(updates, state.weights, params)
    us, ss = scales_tx.update(_scale_leaves(updates), state.scales,
                              None if params is None else _scale_leaves(params))

    def pick(path, u):
      name = _leaf_name(path)
      if name == pol.QUANT_SCALE:
        return us[jax.tree_util.keystr(path)]
      if name == pol.QAT_GATE:
        return jnp.zeros_like(u)
      return u

    return jax.tree_util.tree_map_with_path(pick, uw), ScaleOptimizerState(sw, ss)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------- trust mask
def _modules(tree, prefix=()):
  """Yields (module path tuple, dict of its leaves) for every dict holding a 'kernel'."""
  if isinstance(tree, Mapping):
    if "kernel" in tree and not isinstance(tree["kernel"], Mapping):
      yield prefix, tree
    for k, v in tree.items():
      if isinstance(v, Mapping):
        yield from _modules(v, prefix + (k,))


def _map_modules(fn, updates, params):
  """Rebuilds `updates` with fn(path, update_module, param_module) at every kernel module."""

  def rec(u, p, prefix):
    if not isinstance(u, Mapping):
      return u
    new = {k: rec(u[k], p[k], prefix + (k,)) if isinstance(u[k], Mapping) else u[k] for k in u}
    if "kernel" in u and not isinstance(u["kernel"], Mapping):
      new.update(fn("/".join(prefix), new, p))
    return new

  return rec(updates, params, ())


def trust_mask_for(kernel_KO: jax.Array, spec: pol.QuantSpec, block: int | None,
                   kernels: str = "xla") -> jax.Array:
  """QuEST's trust mask of a kernel, as [O, K] in the (rotated) quantization domain."""
  w_OK = kernel_KO.astype(jnp.float32).T
  if block:
    w_OK = hadamard_transform(w_OK, block, kernels)
  m = q.quest_trust_mask(pol.grouped(w_OK, spec), spec.bits, spec.trust_scale or 1.0)
  return m.reshape(w_OK.shape)


def scale_by_trust_mask(policy: pol.Policy) -> optax.GradientTransformation:
  """Multiplies the kernel update of every QuEST-weight layer by its trust mask.

  With a Hadamard rule the mask lives in the rotated domain: `u <- ((u H) * M) H^T` (H is
  symmetric and orthogonal). Idempotent with the quantizer's own masked VJP, so it can be
  used either with `QuantSpec(trust_scale=None)` (plain STE backward, mask in the optimizer) or
  on top. Needs `params`.

  References:
    Panferov et al., "QuEST: Stable Training of LLMs with 1-Bit Weights and Activations", 2025.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_trust_mask needs params: call tx.update(grads, state, params).")

    def fn(path, u_mod, p_mod):
      found = policy.match(path)
      if found is None or found[1].weight is None or found[1].weight.method != "quest":
        return {}
      rule = found[1]
      block = pol.hadamard_block_of(rule)
      m_OK = trust_mask_for(p_mod["kernel"], rule.weight, block, policy.kernels)
      u_OK = u_mod["kernel"].astype(jnp.float32).T
      if block:
        rot = functools.partial(hadamard_transform, block=block, impl=policy.kernels)
        u_OK = rot(rot(u_OK) * m_OK)
      else:
        u_OK = u_OK * m_OK
      return {"kernel": u_OK.T.astype(u_mod["kernel"].dtype)}

    return _map_modules(fn, updates, params), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def trust_masked(inner: optax.GradientTransformation,
                 policy: pol.Policy) -> optax.GradientTransformation:
  """`optax.chain(scale_by_trust_mask(policy), inner)`: mask the gradients, then optimize."""
  return optax.chain(scale_by_trust_mask(policy), inner)


# ----------------------------------------------------------------------------------- QAT switch
class QatSwitchState(NamedTuple):
  count: jax.Array  # int32: updates seen so far


def scale_by_qat_switch(switch_step: int, policy: pol.Policy) -> optax.GradientTransformation:
  """ParetoQ's full-precision -> QAT switch for a model built with `Policy(qat_gate=True)`.

  Place it LAST in the chain (its updates are final values, not gradients). At update number
  `switch_step` (0-based) it sets every `qat_gate` to 1 and every `quant_alpha` to the authors'
  init computed from the kernel as it will be after this update; before that, gates and scales
  receive zero updates; after it, gates receive zero updates and scales pass through.

  References:
    Liu et al., "ParetoQ: Scaling Laws in Extremely Low-bit LLM Quantization", 2025 (QAT after
    ~90% of the budget in full precision).
  """

  def init_fn(params):
    del params
    return QatSwitchState(jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_qat_switch needs params: call tx.update(grads, state, params).")
    before = state.count < switch_step
    at = state.count == switch_step

    def fn(path, u_mod, p_mod):
      out = {}
      if pol.QAT_GATE in u_mod:
        gate = p_mod[pol.QAT_GATE]
        out[pol.QAT_GATE] = jnp.where(at, 1.0 - gate, 0.0).astype(gate.dtype)
      if pol.QUANT_SCALE in u_mod:
        found = policy.match(path)
        if found is None or found[1].weight is None:
          raise ValueError(f"Module {path!r} has {pol.QUANT_SCALE} but the policy does not "
                           "quantize its weight; pass the policy the model was built with.")
        rule = found[1]
        alpha, u_alpha = p_mod[pol.QUANT_SCALE], u_mod[pol.QUANT_SCALE]
        w_OK = (p_mod["kernel"] + u_mod["kernel"]).astype(jnp.float32).T
        if (block := pol.hadamard_block_of(rule)):
          w_OK = hadamard_transform(w_OK, block, policy.kernels)
        fresh = pol.init_alpha(w_OK, rule.weight).astype(alpha.dtype)
        out[pol.QUANT_SCALE] = jnp.where(before, jnp.zeros_like(u_alpha),
                                         jnp.where(at, fresh - alpha, u_alpha))
      return out

    return _map_modules(fn, updates, params), QatSwitchState(state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def qat_switch(total_steps: int, policy: pol.Policy,
               qat_fraction: float = 0.1) -> optax.GradientTransformation:
  """`scale_by_qat_switch` at step `round((1 - qat_fraction) * total_steps)` (ParetoQ: ~10%)."""
  if not 0.0 < qat_fraction <= 1.0:
    raise ValueError(f"qat_fraction={qat_fraction} must be in (0, 1].")
  return scale_by_qat_switch(round((1.0 - qat_fraction) * total_steps), policy)

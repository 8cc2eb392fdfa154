"""Multi-token prediction objectives: Meta's parallel heads and DeepSeek's sequential MTP.

Meta (Gloeckle et al., 2024): loss = sum_i sum_t CE(head_i(z_t), x_{t+1+i}) on a shared trunk
output z. `multi_token_value_and_grad` computes the same value and gradients as differentiating
`multi_token_loss_fn` directly, in the memory-efficient order of the paper: the trunk runs
forward once (`jax.vjp`), then each head runs forward *and* backward in turn, adding its
gradient at z into one accumulator (only one head's logits exist at a time: peak O(V + d) per
token instead of O(n V + d)), and finally the trunk backward runs once on the summed gradient.
The heads run as iterations of one `fori_loop` (a `switch` picks the head), so XLA holds one
head's buffers at a time; unrolled Python loops, even chained by `optimization_barrier`, left
XLA:CPU keeping every head's logits (measured with `memory_analysis`).

Self-distilled draft heads (Medusa, Cai et al. 2024, sec. 3.3.1, applied to Meta's heads):
`draft_distillation_loss_fn` trains heads 1 .. n-1 on the model's own greedy continuations, so
that head i learns the token head 0 will emit i steps later -- exactly what self-speculative
decoding accepts. The trunk and head 0 stay frozen (`freeze_all_but_draft_heads`), so greedy
decoding, and hence the speculative output, is unchanged.

DeepSeek-V3 (sec. 2.2): loss = CE_main + (lambda / D) sum_k CE_k, depth k predicting t + k + 1
(`deepseek_mtp_loss`); `deepseek_train_step` also applies the auxiliary-loss-free bias update
and reports MaxVio.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int

from jaxllm.nn import moe
from jaxllm.objectives.next_token import next_token_nll


def future_targets(tokens_BT: Int[Array, "B T"], n: int, pad_id: int) -> Int[Array, "N B L"]:
  """targets[i, :, t] = tokens[:, t + 1 + i] for inputs tokens[:, :-1] (pad past the end)."""
  B, T = tokens_BT.shape
  padded = jnp.concatenate([tokens_BT, jnp.full((B, n), pad_id, tokens_BT.dtype)], axis=1)
  return jnp.stack([padded[:, 1 + i:T + i] for i in range(n)])


# ------------------------------------------------------------------------------ Meta-style heads
def multi_token_loss_fn(model, pad_id: int):
  """(params, batch, rng) -> (summed CE over all heads and tokens, head-0 target count), for
  `jaxllm.models.mtp.MultiTokenLlama`; plain autodiff (all logits alive at once)."""

  def loss_fn(params, batch, rng):
    del rng
    tokens_BT = batch["tokens"]
    logits_NBLV, _ = model.apply({"params": params}, tokens_BT[:, :-1])
    targets_NBL = future_targets(tokens_BT, model.n_future, pad_id)
    sums, weights = jax.vmap(next_token_nll, in_axes=(0, 0, None))(logits_NBLV, targets_NBL,
                                                                      pad_id)
    return jnp.sum(sums), weights[0]

  return loss_fn


def multi_token_value_and_grad(model, pad_id: int) -> Callable[..., Any]:
  """Same contract as `jax.value_and_grad(multi_token_loss_fn(model, pad_id), has_aux=True)`:
  (params, batch, rng) -> ((loss_sum, weight), grads), in the memory-efficient order."""

  def fn(params, batch, rng):
    del rng
    tokens_BT = batch["tokens"]
    inputs_BL = tokens_BT[:, :-1]
    targets_NBL = future_targets(tokens_BT, model.n_future, pad_id)
    trunk = lambda p: model.apply({"params": p}, inputs_BL, method="trunk")[0]
    z_BLD, trunk_vjp = jax.vjp(trunk, params)

    def head_loss(p, z, i):
      logits_BLV, _ = model.apply({"params": p}, i, z, method="head_logits")
      return next_token_nll(logits_BLV, targets_NBL[i], pad_id)

    def head_step(i, carry):
      loss_sum, weight, dz_BLD, grads = carry
      branches = [functools.partial(jax.value_and_grad(head_loss, argnums=(0, 1), has_aux=True),
                                    i=j) for j in range(model.n_future)]
      (l_i, w_i), (g_p, g_z) = jax.lax.switch(i, branches, params, z_BLD)
      weight = jnp.where(i == 0, w_i, weight)
      return loss_sum + l_i, weight, dz_BLD + g_z, jax.tree.map(jnp.add, grads, g_p)

    zero = jnp.zeros((), jnp.float32)
    loss_sum, weight, dz_BLD, grads = jax.lax.fori_loop(
        0, model.n_future, head_step,
        (zero, zero, jnp.zeros_like(z_BLD), jax.tree.map(jnp.zeros_like, params)))
    (g_trunk,) = trunk_vjp(dz_BLD)
    return (loss_sum, weight), jax.tree.map(jnp.add, grads, g_trunk)

  return fn


def draft_distillation_loss_fn(model, pad_id: int, prompt_len: int):
  """(params, batch, rng) -> (summed CE of draft heads 1 .. n-1, number of targets).

  batch["tokens"] [B, T] holds prompts of `prompt_len` tokens followed by head 0's greedy
  continuation (`jaxllm.infer.speculative.greedy_continuations`). Head i at position t is
  scored on token t + 1 + i only where that token belongs to the continuation
  (t + 1 + i >= prompt_len): those are the positions whose drafts self-speculative decoding
  verifies. Head 0 is not run and the trunk output is a constant (`stop_gradient`), so the
  gradient reaches the draft heads only (the shared final norm and unembedding get none)."""
  n = model.n_future
  if n < 2:
    raise ValueError(f"Draft distillation needs n_future >= 2 heads (got {n}).")

  def loss_fn(params, batch, rng):
    del rng
    tokens_BT = batch["tokens"]
    if tokens_BT.shape[1] <= prompt_len + 1:
      raise ValueError(f"Distillation sequences of {tokens_BT.shape[1]} tokens leave no "
                       f"continuation after the {prompt_len}-token prompt to learn from.")
    frozen = jax.lax.stop_gradient(params)
    z_BLD = model.apply({"params": frozen}, tokens_BT[:, :-1], method="trunk")[0]
    targets_NBL = future_targets(tokens_BT, n, pad_id)
    t_L = jnp.arange(tokens_BT.shape[1] - 1)
    total = weight = jnp.zeros((), jnp.float32)
    for i in range(1, n):
      draft = {**frozen, f"heads_{i}": params[f"heads_{i}"]}
      logits_BLV, _ = model.apply({"params": draft}, i, z_BLD, method="head_logits")
      targets_BL = jnp.where((t_L + 1 + i >= prompt_len)[None], targets_NBL[i], pad_id)
      s, w = next_token_nll(logits_BLV, targets_BL, pad_id)
      total, weight = total + s, weight + w
    return total, weight

  return loss_fn


def freeze_all_but_draft_heads(optimizer: optax.GradientTransformation, params,
                               ) -> optax.GradientTransformation:
  """`optimizer` on the draft heads' parameters (`heads_1` .. `heads_{n-1}`), zero updates
  (so no weight decay either) for the trunk, head 0, the final norm and the unembedding."""
  draft = lambda k: k.startswith("heads_") and k != "heads_0"
  labels = {k: jax.tree.map(lambda _: "draft" if draft(k) else "frozen", v)
            for k, v in params.items()}
  return optax.multi_transform({"draft": optimizer, "frozen": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------- DeepSeek MTP + MoE
def deepseek_mtp_loss(model, params, balance, tokens_BT: Int[Array, "B T"], pad_id: int,
                      mtp_lambda: float = 0.3):
  """(loss_sum, weight, aux): main next-token CE + (lambda / D) sum_k CE_k + sequence-wise
  balance losses (scaled by the weight, so that loss_sum / weight is the per-token objective).
  aux = {"main": main CE sum, "mtp": per-depth CE sums [D], "moe_stats": loads}."""
  D = model.config.mtp_depth
  inputs_BL = tokens_BT[:, :-1]
  targets_NBL = future_targets(tokens_BT, D + 1, pad_id)
  variables = {"params": params, "balance": balance}
  (h_BLD, _), state = model.apply(variables, inputs_BL, method="trunk",
                                  mutable=["moe_stats", "moe_losses"])
  logits_BLV = model.apply(variables, h_BLD, method=lambda m, h: m.logits(m.final_norm(h)))
  main_sum, weight = next_token_nll(logits_BLV, targets_NBL[0], pad_id)
  total = main_sum
  mtp_sums = jnp.zeros((D,), jnp.float32)
  if D:
    shifted_DBL = future_targets(tokens_BT, D, pad_id)  # depth k reads token t + k
    mtp_logits, mtp_state = model.apply(variables, h_BLD, shifted_DBL, method="mtp_logits",
                                        mutable=["moe_stats", "moe_losses"])
    state = {c: {**state.get(c, {}), **mtp_state.get(c, {})} for c in ("moe_stats",
                                                                         "moe_losses")}
    mtp_sums, _ = jax.vmap(next_token_nll, in_axes=(0, 0, None))(mtp_logits, targets_NBL[1:],
                                                                 pad_id)
    total = total + mtp_lambda / D * jnp.sum(mtp_sums)
  bal = jax.tree.leaves(state.get("moe_losses", {}))
  if bal:
    total = total + weight * sum(bal)
  return total, weight, {"main": main_sum, "mtp": mtp_sums, "moe_stats": state["moe_stats"]}


def deepseek_train_step(model, optimizer: optax.GradientTransformation, pad_id: int,
                        mtp_lambda: float = 0.3, bias_gamma: float = 1e-3):
  """A jittable step (params, opt_state, balance, batch) -> (params, opt_state, balance, metrics):
  gradient step on the MTP loss, then the auxiliary-loss-free bias update (outside the
  gradient) from this step's expert loads; metrics include MaxVio (max and mean over layers)."""

  def step(params, opt_state, balance, batch):
    def loss(p):
      total, weight, aux = deepseek_mtp_loss(model, p, balance, batch["tokens"], pad_id,
                                             mtp_lambda)
      return total / jnp.maximum(weight, 1.0), (weight, aux)

    (value, (weight, aux)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if bias_gamma:
      balance = moe.update_balance_bias(balance, aux["moe_stats"], bias_gamma)
    vios = jnp.stack([moe.max_violation(l) for l in moe.layer_loads(aux["moe_stats"])])
    metrics = {"loss": value, "main_loss": aux["main"] / jnp.maximum(weight, 1.0),
               "mtp_loss": aux["mtp"] / jnp.maximum(weight, 1.0),
               "maxvio_max": jnp.max(vios), "maxvio_mean": jnp.mean(vios)}
    return params, opt_state, balance, metrics

  return step

"""Masked-diffusion (LLaDA) objectives: pretraining and SFT, as in the authors' GUIDELINES.md.

Pretraining, per batch of B sequences of length L:

- one t ~ U[0, 1) per sequence, p_mask = (1 - eps) t + eps;
- every token is replaced by [MASK] independently with probability p_mask;
- loss = sum over masked positions of CE(logits_i, x_i) / p_mask, divided by B * L (a constant,
  not the number of masked tokens). Its expectation upper-bounds the NLL of the batch per token;
- with probability `random_length_prob` (1%) the whole batch is cut to a random length
  r ~ U{1, ..., L}; the normaliser is then B * r.

The loss functions follow the train step's contract `loss_fn(params, batch, rng) ->
(loss_sum, weight)`: the step divides the sum by the weight, so `weight` is the authors'
normaliser (B * L, B * r, or B for SFT).

Random-length truncation without a dynamic shape: the authors slice `input_ids[:, :r]`. Here the
sequence keeps its static length L; positions >= r are never masked or scored, and attention
keeps them out of the first r positions' context by running the same parameters with
block-causal attention over block ids (0 for positions < r, 1 for the rest): a block-0 query
attends exactly to keys < r with positions 0..r-1, i.e. to the truncated sequence. With r = L
every block id is 0 and block-causal attention is bidirectional attention, bit for bit. So the
loss and its gradient equal the authors' for every r, and one compiled step serves all lengths.
The same mechanism keeps `pad_id` tokens (if any) out of every scored position's context.
Under gradient accumulation each micro-batch draws its own truncation (the step then divides the
summed losses by the summed weights).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int


class Noise(NamedTuple):
  """The random draws of one forward process (injectable, so tests can fix the mask)."""

  t_B: Float[Array, "B"]  # diffusion time per sequence, U[0, 1)
  u_BL: Float[Array, "B L"]  # per-token uniforms: token i is masked iff u_i < p_mask
  length: Int[Array, ""]  # random-length truncation: positions >= length are dropped (L: none)


def sample_noise(rng, batch: int, seq_len: int, random_length_prob: float = 0.0) -> Noise:
  """t ~ U[0,1) per sequence, per-token uniforms, and (with probability `random_length_prob`) a
  truncation length ~ U{1..seq_len} for the whole batch."""
  k_t, k_u, k_cut, k_len = jax.random.split(rng, 4)
  t_B = jax.random.uniform(k_t, (batch,), jnp.float32)
  u_BL = jax.random.uniform(k_u, (batch, seq_len), jnp.float32)
  cut = jax.random.uniform(k_cut, (), jnp.float32) < random_length_prob
  length = jnp.where(cut, jax.random.randint(k_len, (), 1, seq_len + 1), seq_len)
  return Noise(t_B, u_BL, length.astype(jnp.int32))


def mask_probability(t_B: Float[Array, "B"], eps: float) -> Float[Array, "B"]:
  return (1.0 - eps) * t_B + eps


def forward_process(tokens_BL: Int[Array, "B L"], noise: Noise, mask_id: int, eps: float,
                    maskable_BL: Bool[Array, "B L"] | None = None
                    ) -> tuple[Int[Array, "B L"], Bool[Array, "B L"], Float[Array, "B"]]:
  """(noisy tokens, masked positions, p_mask per sequence). Only `maskable` positions (default:
  all) below `noise.length` can be masked; every other token is left exactly as it was."""
  p_mask_B = mask_probability(noise.t_B, eps)
  masked_BL = noise.u_BL < p_mask_B[:, None]
  masked_BL &= jnp.arange(tokens_BL.shape[1])[None, :] < noise.length
  if maskable_BL is not None:
    masked_BL &= maskable_BL
  return jnp.where(masked_BL, mask_id, tokens_BL), masked_BL, p_mask_B


def weighted_masked_ce(logits_BLV: Float[Array, "B L V"], tokens_BL: Int[Array, "B L"],
                       masked_BL: Bool[Array, "B L"],
                       p_mask_B: Float[Array, "B"]) -> Float[Array, "B L"]:
  """CE(logits_i, x_i) / p_mask at masked positions, 0 elsewhere (float32)."""
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                          tokens_BL)
  return jnp.where(masked_BL, ce_BL / p_mask_B[:, None], 0.0)


def _check_model(model: nn.Module, mask_id: int, eps: float) -> None:
  cfg = model.config
  if cfg.mask_kind != "bidirectional":
    raise ValueError(f"masked diffusion needs a bidirectional model; got mask_kind="
                     f"{cfg.mask_kind!r}. Build it with `jaxllm.models.llada.preset(...)` or set "
                     "LlamaConfig.mask_kind='bidirectional'.")
  if not 0 <= mask_id < cfg.vocab_size:
    raise ValueError(f"mask_id={mask_id} is outside the vocabulary [0, {cfg.vocab_size}); use "
                     "the tokenizer's mask_id (ByteTokenizer: 259).")
  if not 0.0 <= eps < 1.0:
    raise ValueError(f"eps={eps} must lie in [0, 1) (the authors use 1e-3).")


def _logits_within(model: nn.Module, params, noisy_BL, scored_keys_BL=None):
  """Logits where positions outside `scored_keys` are hidden from the others (see module doc)."""
  if scored_keys_BL is None:
    return model.apply({"params": params}, noisy_BL)[0]
  block_model = model.clone(config=dataclasses.replace(model.config, mask_kind="block_causal"))
  block_ids_BL = (~scored_keys_BL).astype(jnp.int32)
  return block_model.apply({"params": params}, noisy_BL, block_ids_BL=block_ids_BL)[0]


def pretrain_loss(model: nn.Module, params, tokens_BL: Int[Array, "B L"], noise: Noise,
                  mask_id: int, eps: float = 1e-3, pad_id: int | None = None,
                  hide_dropped: bool = True) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """(sum of CE / p_mask over masked tokens, normaliser) for fixed noise.

  The normaliser is B * noise.length (the authors' B x L after truncation); with `pad_id`, it is
  the number of non-pad tokens below the length, and pad tokens are never masked or attended.
  `hide_dropped=False` skips the truncation attention mask (valid only when noise.length == L
  and there is no padding); it is what a loss with random_length_prob=0 and no pad_id uses.
  """
  B, L = tokens_BL.shape
  keep_BL = jnp.broadcast_to(jnp.arange(L)[None, :] < noise.length, (B, L))
  if pad_id is not None:
    keep_BL &= tokens_BL != pad_id
  noisy_BL, masked_BL, p_mask_B = forward_process(tokens_BL, noise, mask_id, eps, keep_BL)
  logits_BLV = _logits_within(model, params, noisy_BL, keep_BL if hide_dropped else None)
  loss_sum = jnp.sum(weighted_masked_ce(logits_BLV, tokens_BL, masked_BL, p_mask_B))
  if pad_id is None:
    weight = (B * noise.length).astype(jnp.float32)
  else:
    weight = jnp.sum(keep_BL).astype(jnp.float32)
  return loss_sum, weight


def masked_diffusion_loss_fn(model: nn.Module, mask_id: int, eps: float = 1e-3,
                             random_length_prob: float = 0.01, pad_id: int | None = None,
                             drop_last: bool = True):
  """LLaDA pretraining loss, `loss_fn(params, batch, rng) -> (loss_sum, weight)`.

  `batch["tokens"]` is int32[B, L + 1] from the next-token pipeline; with `drop_last` (default)
  the model sees tokens[:, :-1], i.e. exactly the configured L (no shift is needed: the targets
  are the inputs; one token per row goes unused). `drop_last=False` uses all columns.
  """
  _check_model(model, mask_id, eps)
  if not 0.0 <= random_length_prob <= 1.0:
    raise ValueError(f"random_length_prob={random_length_prob} must lie in [0, 1] "
                     "(the authors use 0.01).")
  hide = random_length_prob > 0.0 or pad_id is not None

  def loss_fn(params, batch, rng):
    tokens_BL = batch["tokens"][:, :-1] if drop_last else batch["tokens"]
    B, L = tokens_BL.shape
    noise = sample_noise(rng, B, L, random_length_prob)
    return pretrain_loss(model, params, tokens_BL, noise, mask_id, eps, pad_id, hide)

  return loss_fn


def response_mask(batch: dict, seq_len: int) -> Bool[Array, "B L"]:
  """Response positions: `batch["response_mask"]` if given, else positions >= prompt_len."""
  if "response_mask" in batch:
    return batch["response_mask"].astype(bool)
  if "prompt_len" not in batch:
    raise KeyError("an SFT batch needs 'prompt_len' int32[B] (or 'response_mask' bool[B, L]) "
                   "beside 'tokens'.")
  return jnp.arange(seq_len)[None, :] >= batch["prompt_len"][:, None]


def sft_loss(model: nn.Module, params, tokens_BL: Int[Array, "B L"],
             response_BL: Bool[Array, "B L"], noise: Noise, mask_id: int,
             eps: float = 1e-3) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """(sum_b [sum over masked response tokens CE / p_mask] / answer_len_b, B) for fixed noise.

  Only response tokens are masked (the prompt is restored, as the authors do); EOS padding is
  part of the response, so it is masked, trained, and counted in answer_len.
  """
  noisy_BL, masked_BL, p_mask_B = forward_process(tokens_BL, noise, mask_id, eps, response_BL)
  logits_BLV = model.apply({"params": params}, noisy_BL)[0]
  answer_len_B = jnp.maximum(jnp.sum(response_BL, axis=1), 1).astype(jnp.float32)
  per_seq_B = jnp.sum(weighted_masked_ce(logits_BLV, tokens_BL, masked_BL, p_mask_B), axis=1)
  return jnp.sum(per_seq_B / answer_len_B), jnp.asarray(tokens_BL.shape[0], jnp.float32)


def sft_loss_fn(model: nn.Module, mask_id: int, eps: float = 1e-3):
  """LLaDA SFT loss, `loss_fn(params, batch, rng) -> (loss_sum, weight = B)`.

  `batch["tokens"]` int32[B, L] holds prompt + response + EOS padding (all columns are used: SFT
  batches are built for this objective); `batch["prompt_len"]` int32[B] or
  `batch["response_mask"]` bool[B, L] says which positions are response.
  """
  _check_model(model, mask_id, eps)

  def loss_fn(params, batch, rng):
    tokens_BL = batch["tokens"]
    B, L = tokens_BL.shape
    noise = sample_noise(rng, B, L)
    return sft_loss(model, params, tokens_BL, response_mask(batch, L), noise, mask_id, eps)

  return loss_fn

"""Masked-diffusion log-likelihood: the authors' Monte Carlo estimator, and multiple-choice scoring.

For a prompt p (length P) and target x (length T), LLaDA bounds log p(x | p) from below by

    -E_{l ~ U{1..T}} E_{S ~ uniform l-subset of x} [ (T / l) sum_{i in S} CE_i(x with S masked) ]

(the authors' get_log_likelihood.py / eval_llada.py). One Monte Carlo sample draws l, masks
exactly l target tokens chosen uniformly, and returns sum_{masked} CE / (l / T). Samples come in
batches whose l are *stratified*: the batch's counts are l_i = ((k - 1 + round(i T / b)) mod T) + 1
for one k ~ U{1..T}, spreading them evenly over 1..T (lower variance than independent l's), while
each l_i alone is still uniform on 1..T, so every sample is unbiased. (The authors compute the
offsets with torch.round, which rounds halves to even and so, when i T / b ends in .5, makes the
marginal depend on the parity of k; integer round-half-up keeps each marginal exactly uniform.)
The estimate of log p(x | p) is minus the mean over `mc_num` samples (default 128).

Scoring is one jitted program per (prompt length, target length): a `lax.scan` over the
mc_num / batch_size batches. `sequence_nll_bound` is the batched form for held-out text (no
prompt; many sequences at once, stratified across each sequence's own samples), the quantity
to set beside an autoregressive model's loss.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from jaxllm.infer.diffusion import guided_logits


def stratified_mask_counts(rng, batch: int, target_len: int) -> Int[Array, "b"]:
  """Mask counts in 1..target_len, evenly spread over the batch, each marginally uniform."""
  k = jax.random.randint(rng, (), 1, target_len + 1)
  i = jnp.arange(batch, dtype=jnp.int32)
  offset = (2 * i * target_len + batch) // (2 * batch)  # round(i * T / b), halves up
  return (k - 1 + offset) % target_len + 1


def uniform_masks(rng, counts_B: Int[Array, "B"], length: int) -> Bool[Array, "B T"]:
  """For each row, exactly counts_B[b] of `length` positions, a uniformly random subset."""
  u_BT = jax.random.uniform(rng, (counts_B.shape[0], length))
  rank_BT = jnp.argsort(jnp.argsort(u_BT, axis=1), axis=1)
  return rank_BT < counts_B[:, None]


def _check(model, prompt_len: int, target_len: int, mc_num: int, batch_size: int,
           mask_id: int, cfg_scale: float) -> None:
  cfg = model.config
  if cfg.mask_kind != "bidirectional":
    raise ValueError(f"the masked-diffusion likelihood needs a bidirectional model; got "
                     f"mask_kind={cfg.mask_kind!r} (see jaxllm.models.llada).")
  if target_len < 1:
    raise ValueError("the target must hold at least one token.")
  if prompt_len + target_len > cfg.max_seq_len:
    raise ValueError(f"prompt ({prompt_len}) + target ({target_len}) tokens exceed the model's "
                     f"max_seq_len={cfg.max_seq_len}; truncate the prompt from the left.")
  if batch_size < 1 or mc_num < batch_size or mc_num % batch_size:
    raise ValueError(f"mc_num={mc_num} must be a positive multiple of batch_size={batch_size} "
                     "(samples are drawn in stratified batches).")
  if not 0 <= mask_id < cfg.vocab_size:
    raise ValueError(f"mask_id={mask_id} is outside the vocabulary [0, {cfg.vocab_size}).")
  if cfg_scale < 0:
    raise ValueError(f"cfg_scale={cfg_scale} must be >= 0 (0 disables guidance).")


@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "num_batches", "batch_size",
                                             "mask_id", "cfg_scale"))
def mc_nll_samples(model, params, seq_T: Int[Array, "T"], rng, *, prompt_len: int,
                   num_batches: int, batch_size: int, mask_id: int,
                   cfg_scale: float = 0.0) -> Float[Array, "n b"]:
  """Monte Carlo samples of -log p(seq[prompt_len:] | seq[:prompt_len]) (an upper bound in
  expectation), float32[num_batches, batch_size]; each batch's mask counts are stratified."""
  total = seq_T.shape[0]
  target_len = total - prompt_len
  seq_bT = jnp.broadcast_to(seq_T, (batch_size, total))
  is_prompt_1T = (jnp.arange(total) < prompt_len)[None, :]

  def one_batch(_, key):
    k_count, k_mask = jax.random.split(key)
    counts_b = stratified_mask_counts(k_count, batch_size, target_len)
    target_masks = uniform_masks(k_mask, counts_b, target_len)
    masked_bT = jnp.concatenate(
        [jnp.zeros((batch_size, prompt_len), bool), target_masks], axis=1)
    noisy_bT = jnp.where(masked_bT, mask_id, seq_bT)
    if cfg_scale == 0.0:
      logits_bTV = model.apply({"params": params}, noisy_bT)[0]
    else:
      un_bT = jnp.where(is_prompt_1T, mask_id, noisy_bT)
      both = model.apply({"params": params}, jnp.concatenate([noisy_bT, un_bT], axis=0))[0]
      logits_bTV = guided_logits(both[:batch_size], both[batch_size:], cfg_scale)
    ce_bT = optax.softmax_cross_entropy_with_integer_labels(logits_bTV.astype(jnp.float32),
                                                            seq_bT)
    p_mask_b = counts_b.astype(jnp.float32) / target_len
    return None, jnp.sum(jnp.where(masked_bT, ce_bT, 0.0), axis=1) / p_mask_b

  _, samples_nb = jax.lax.scan(one_batch, None, jax.random.split(rng, num_batches))
  return samples_nb


def log_likelihood(model, params, prompt: Sequence[int] | np.ndarray,
                   target: Sequence[int] | np.ndarray, rng, *, mask_id: int, mc_num: int = 128,
                   batch_size: int = 32, cfg_scale: float = 0.0) -> float:
  """Estimate of log p(target | prompt) (nats): minus the mean of `mc_num` samples (the authors'
  get_log_likelihood). An empty prompt gives the whole-sequence bound."""
  prompt, target = np.asarray(prompt, np.int32), np.asarray(target, np.int32)
  _check(model, len(prompt), len(target), mc_num, batch_size, mask_id, cfg_scale)
  samples = mc_nll_samples(model, params, jnp.asarray(np.concatenate([prompt, target])), rng,
                           prompt_len=len(prompt), num_batches=mc_num // batch_size,
                           batch_size=batch_size, mask_id=mask_id, cfg_scale=float(cfg_scale))
  return -float(jnp.mean(samples))


def choice_log_likelihoods(model, params, context: Sequence[int] | np.ndarray,
                           choices: Sequence[Sequence[int] | np.ndarray], rng, *, mask_id: int,
                           mc_num: int = 128, batch_size: int = 32,
                           cfg_scale: float = 0.0) -> np.ndarray:
  """log p(choice | context) for each choice, float64[n_choices]; the answer is the argmax.

  Every choice is scored with the same random key (common random numbers), so the comparison
  between choices of equal length is not blurred by independent mask draws.
  """
  return np.array([log_likelihood(model, params, context, c, rng, mask_id=mask_id,
                                  mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale)
                   for c in choices])


@functools.partial(jax.jit, static_argnames=("model", "mc_num", "mask_id", "pad_id"))
def sequence_nll_bound(model, params, tokens_BL: Int[Array, "B L"], rng, *, mask_id: int,
                       mc_num: int = 16, pad_id: int | None = None) -> Float[Array, "B"]:
  """Per-sequence estimate of the NLL bound, sum over tokens (nats), float32[B].

  Row b with T_b real tokens (pad_id tokens excluded, and hidden from attention as in
  `jaxllm.objectives.masked_diffusion`) gets mc_num samples whose mask counts are stratified
  over 1..T_b: l_m = ((k_b - 1 + round(m T_b / mc_num)) mod T_b) + 1. Divide by T_b for a
  per-token value comparable with an autoregressive model's loss. Rows without real tokens give 0.
  """
  B, L = tokens_BL.shape
  real_BL = jnp.ones((B, L), bool) if pad_id is None else tokens_BL != pad_id
  T_B = jnp.sum(real_BL, axis=1).astype(jnp.int32)
  T_safe_B = jnp.maximum(T_B, 1)
  k_rng, m_rng = jax.random.split(rng)
  k_B = jax.random.randint(k_rng, (B,), 0, jnp.iinfo(jnp.int32).max) % T_safe_B
  m_M1 = jnp.arange(mc_num, dtype=jnp.int32)[:, None]
  offset_MB = (2 * m_M1 * T_safe_B[None, :] + mc_num) // (2 * mc_num)
  counts_MB = (k_B[None, :] + offset_MB) % T_safe_B[None, :] + 1
  if pad_id is None:
    apply = lambda x: model.apply({"params": params}, x)[0]
  else:
    block_model = model.clone(config=dataclasses.replace(model.config,
                                                         mask_kind="block_causal"))
    block_ids_BL = (~real_BL).astype(jnp.int32)
    apply = lambda x: block_model.apply({"params": params}, x,
                                        block_ids_BL=block_ids_BL)[0]

  def one_sample(total_B, inputs):
    counts_B, key = inputs
    u_BL = jnp.where(real_BL, jax.random.uniform(key, (B, L)), 2.0)  # pads rank last
    masked_BL = jnp.argsort(jnp.argsort(u_BL, axis=1), axis=1) < counts_B[:, None]
    masked_BL &= real_BL
    logits_BLV = apply(jnp.where(masked_BL, mask_id, tokens_BL))
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                            tokens_BL)
    p_B = counts_B.astype(jnp.float32) / T_safe_B
    return total_B + jnp.sum(jnp.where(masked_BL, ce_BL, 0.0), axis=1) / p_B, None

  total_B, _ = jax.lax.scan(one_sample, jnp.zeros((B,), jnp.float32),
                            (counts_MB, jax.random.split(m_rng, mc_num)))
  return jnp.where(T_B > 0, total_B / mc_num, 0.0)

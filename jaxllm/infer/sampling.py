"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

`generate` prefills the prompt in one forward pass, then decodes one token per step inside a
`jax.lax.scan`, so the whole generation is one compiled program (no recompilation per token).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.models.llama import Llama, init_cache


def filter_logits(logits_BV: Float[Array, "B V"], top_k: int = 0,
                  top_p: float = 1.0) -> Float[Array, "B V"]:
  """Sets logits outside the top-k, and outside the smallest set whose probability mass reaches
  top_p (nucleus), to -inf. top_k=0 and top_p=1 disable the filters."""
  neg_inf = jnp.finfo(logits_BV.dtype).min
  if top_k > 0:
    kth_BV = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_BV, neg_inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # keep a token if the mass strictly before it is < top_p (always keeps the best one)
    keep_BV = (cum_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
  return logits_BV


def sample_token(rng, logits_BV: Float[Array, "B V"], temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> Int[Array, "B"]:
  """Greedy when temperature == 0, else a draw from softmax(filtered logits / temperature)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_id", "pad_id"))
def generate(model: Llama, params, prompt_BP: Int[Array, "B P"], rng, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int = 0) -> Int[Array, "B N"]:
  """Returns `max_new_tokens` new tokens per prompt; after an EOS the rest are `pad_id`."""
  B, P = prompt_BP.shape
  max_len = P + max_new_tokens
  if max_len > model.config.max_seq_len:
    raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) = {max_len} exceeds "
                     f"the model's max_seq_len={model.config.max_seq_len}; shorten either.")
  cache = init_cache(model.config, B, max_len)
  logits_BPV, cache = model.apply({"params": params}, prompt_BP, cache=cache)
  rng, first_rng = jax.random.split(rng)
  first_B = sample_token(first_rng, logits_BPV[:, -1], temperature, top_k, top_p)

  def step(carry, step_rng):
    token_B, cache, done_B = carry
    logits_B1V, cache = model.apply({"params": params}, token_B[:, None], cache=cache)
    nxt_B = sample_token(step_rng, logits_B1V[:, 0], temperature, top_k, top_p)
    if eos_id is not None:
      done_B = done_B | (token_B == eos_id)
      nxt_B = jnp.where(done_B, pad_id, nxt_B)
    return (nxt_B, cache, done_B), token_B

  done_B = jnp.zeros((B,), bool)
  (last_B, _, _), tokens_NB = jax.lax.scan(
      step, (first_B, cache, done_B), jax.random.split(rng, max_new_tokens - 1))
  return jnp.concatenate([tokens_NB.T, last_B[:, None]], axis=1)

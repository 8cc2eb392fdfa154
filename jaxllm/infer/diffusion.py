"""LLaDA sampling: fixed-length generation by iterative unmasking, as the authors' generate.py.

The answer starts as `gen_length` [MASK] tokens after the prompt. It is cut into
`gen_length // block_length` blocks generated left to right (semi-autoregressive; one block is
plain fixed-length generation), each with `steps // num_blocks` steps. At every step the model
predicts all positions; inside the current block, the `k` masked positions with the highest
confidence are committed, where the per-step counts `k` spread the block's masked count evenly
(`num_transfer_tokens`, the linear schedule). Committed tokens are never re-masked; the prompt is
never altered; positions beyond the current block are never committed.

The loop is one `jax.lax.scan` over all steps with static shapes (one compiled program per
(shape, settings); no recompilation per step). No KV cache: every step re-runs the whole
sequence, as the authors do.

Gumbel-max at a temperature without a (B, L, V) float64 tensor. The authors take
argmax(exp(l) / (-log u)^T) in float64. For T > 0 this equals
argmax(l - T log(-log u)) = argmax(l / T + G), G = -log(-log u) a standard Gumbel, so it is
exactly a draw from softmax(l / T). What float64 buys is the *resolution of u*: a float32 uniform
on a 2^-23 or 2^-24 grid caps G at about 16 (and coarsens its upper tail); the maximum of V
Gumbels passes 16 with probability ~V e^-16, 1.4% of draws at LLaDA's V = 126464, and those draws
are biased (lower diversity; arXiv 2409.02908). Here G comes from `jax.random.gumbel(..., float32,
mode="highest")`, which builds u from 64 random bits and takes log1p/log on the side where each is
accurate: the tail reaches G ~ 44 (float64's 53-bit uniform reaches ~37), so the only remaining
error is float32 rounding of l / T + G (relative 6e-8, a tie-breaking perturbation). Noise is
drawn only for the current block, (B, block_length, V) float32, not for the whole sequence.

Deliberate difference from generate.py: the committed token is never [MASK] itself (its logit is
excluded from the argmax; a trained model gives it ~0 probability since data never contains it),
so every answer position ends committed. Confidence is the authors' softmax(logits)[x0] over the
full vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

REMASKING = ("low_confidence", "random")


def num_transfer_tokens(mask_count_B: Int[Array, "B"], steps: int) -> Int[Array, "B S"]:
  """Tokens to commit at each of `steps` steps: count // steps each, the first count % steps
  steps one more (generate.py's get_num_transfer_tokens). Rows sum to `mask_count`."""
  mask_count_B = jnp.asarray(mask_count_B, jnp.int32)
  base_B1, rem_B1 = (mask_count_B // steps)[:, None], (mask_count_B % steps)[:, None]
  return base_B1 + (jnp.arange(steps, dtype=jnp.int32)[None, :] < rem_B1).astype(jnp.int32)


def gumbel_max_sample(rng, logits_BLV: Float[Array, "B L V"],
                      temperature: float) -> Int[Array, "B L"]:
  """argmax(logits) at temperature 0, else a draw from softmax(logits / temperature) by the
  Gumbel-max trick with 64-bit-resolution Gumbel noise in float32 (see the module doc)."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits_BLV, axis=-1).astype(jnp.int32)
  g_BLV = jax.random.gumbel(rng, logits_BLV.shape, jnp.float32, mode="highest")
  return jnp.argmax(logits_BLV / temperature + g_BLV, axis=-1).astype(jnp.int32)


def guided_logits(cond_BLV: Float[Array, "B L V"], uncond_BLV: Float[Array, "B L V"],
                  cfg_scale: float) -> Float[Array, "B L V"]:
  """Classifier-free guidance: un + (w + 1) (cond - un); w = 0 gives the conditional logits."""
  return uncond_BLV + (cfg_scale + 1.0) * (cond_BLV - uncond_BLV)


def check_generation_args(*, prompt_len: int, steps: int, gen_length: int, block_length: int,
                          temperature: float, cfg_scale: float, remasking: str, mask_id: int,
                          vocab_size: int, max_seq_len: int) -> None:
  """Raises ValueError naming the bad field and the fix."""
  if gen_length <= 0 or block_length <= 0 or steps <= 0:
    raise ValueError(f"gen_length={gen_length}, block_length={block_length} and steps={steps} "
                     "must all be positive.")
  if gen_length % block_length:
    raise ValueError(
        f"gen_length={gen_length} is not divisible by block_length={block_length}; choose a "
        f"block_length dividing gen_length (e.g. {_divisor_near(gen_length, block_length)}) or "
        f"block_length=gen_length for one block.")
  num_blocks = gen_length // block_length
  if steps < num_blocks:
    raise ValueError(f"steps={steps} is fewer than the number of blocks "
                     f"(gen_length / block_length = {num_blocks}); every block needs at least one "
                     f"step: set steps to a multiple of {num_blocks} (e.g. {num_blocks}) or "
                     "raise block_length.")
  if steps % num_blocks:
    raise ValueError(f"steps={steps} is not divisible by the number of blocks "
                     f"(gen_length / block_length = {num_blocks}); steps are split evenly across "
                     f"blocks: use a multiple of {num_blocks} such as "
                     f"{max(num_blocks, steps // num_blocks * num_blocks)}.")
  if remasking not in REMASKING:
    raise ValueError(f"remasking={remasking!r}; use one of {REMASKING}.")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy).")
  if cfg_scale < 0:
    raise ValueError(f"cfg_scale={cfg_scale} must be >= 0 (0 disables guidance).")
  if not 0 <= mask_id < vocab_size:
    raise ValueError(f"mask_id={mask_id} is outside the vocabulary [0, {vocab_size}); use the "
                     "tokenizer's mask_id.")
  if prompt_len + gen_length > max_seq_len:
    raise ValueError(f"prompt length ({prompt_len}) + gen_length ({gen_length}) = "
                     f"{prompt_len + gen_length} exceeds the model's max_seq_len={max_seq_len}; "
                     "shorten the prompt or gen_length.")


def _divisor_near(n: int, k: int) -> int:
  return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


def generate(model, params, prompt_BP: Int[Array, "B P"], rng, *, mask_id: int, steps: int = 128,
             gen_length: int = 128, block_length: int = 128, temperature: float = 0.0,
             cfg_scale: float = 0.0, remasking: str = "low_confidence",
             eos_id: int | None = None, pad_id: int | None = None,
             return_trajectory: bool = False):
  """LLaDA generation: `gen_length` new tokens per prompt, int32[B, gen_length].

  Prompts in a batch share their length P. With `eos_id`, every token after the first EOS of an
  answer becomes `pad_id` (default `eos_id`: LLaDA-Instruct pads answers with EOS). With
  `return_trajectory`, also returns the whole sequence after each step, int32[steps, B, P + G].
  Defaults are generate.py's (steps = gen_length = block_length = 128, greedy, no guidance,
  low-confidence remasking).
  """
  P = prompt_BP.shape[1]
  cfg = model.config
  check_generation_args(prompt_len=P, steps=steps, gen_length=gen_length,
                        block_length=block_length, temperature=temperature, cfg_scale=cfg_scale,
                        remasking=remasking, mask_id=mask_id, vocab_size=cfg.vocab_size,
                        max_seq_len=cfg.max_seq_len)
  if cfg.mask_kind != "bidirectional":
    raise ValueError(f"LLaDA sampling needs a bidirectional model; got mask_kind="
                     f"{cfg.mask_kind!r} (see jaxllm.models.llada).")
  return _generate(model, params, jnp.asarray(prompt_BP, jnp.int32), rng, mask_id=mask_id,
                   steps=steps, gen_length=gen_length, block_length=block_length,
                   temperature=float(temperature), cfg_scale=float(cfg_scale),
                   remasking=remasking, eos_id=eos_id,
                   pad_id=eos_id if pad_id is None else pad_id,
                   return_trajectory=return_trajectory)


@functools.partial(jax.jit, static_argnames=(
    "model", "mask_id", "steps", "gen_length", "block_length", "temperature", "cfg_scale",
    "remasking", "eos_id", "pad_id", "return_trajectory"))
def _generate(model, params, prompt_BP, rng, *, mask_id, steps, gen_length, block_length,
              temperature, cfg_scale, remasking, eos_id, pad_id, return_trajectory):
  B, P = prompt_BP.shape
  T, V = P + gen_length, model.config.vocab_size
  block_steps = steps // (gen_length // block_length)
  x_BT = jnp.concatenate([prompt_BP, jnp.full((B, gen_length), mask_id, jnp.int32)], axis=1)
  is_prompt_1T = (jnp.arange(T) < P)[None, :]
  not_mask_V = jnp.arange(V) != mask_id

  def predict(x_BT):
    if cfg_scale == 0.0:  # static: the authors skip the unconditional pass at w = 0
      return model.apply({"params": params}, x_BT)[0]
    un_BT = jnp.where(is_prompt_1T, mask_id, x_BT)  # unconditional: prompt -> [MASK]
    both_BTV = model.apply({"params": params}, jnp.concatenate([x_BT, un_BT], axis=0))[0]
    return guided_logits(both_BTV[:B], both_BTV[B:], cfg_scale)

  def step(carry, j):
    x_BT, count_B = carry
    i = j % block_steps  # step inside the block
    start = P + (j // block_steps) * block_length
    blk_BK = jax.lax.dynamic_slice(x_BT, (0, start), (B, block_length))
    masked_BK = blk_BK == mask_id
    # masked count at the block's first step fixes the block's schedule
    count_B = jnp.where(i == 0, jnp.sum(masked_BK, axis=1, dtype=jnp.int32), count_B)
    k_B = count_B // block_steps + (i < count_B % block_steps).astype(jnp.int32)

    logits_BTV = predict(x_BT)
    logits_BKV = jax.lax.dynamic_slice(logits_BTV, (0, start, 0),
                                       (B, block_length, V)).astype(jnp.float32)
    rng_x0, rng_conf = jax.random.split(jax.random.fold_in(rng, j))
    x0_BK = gumbel_max_sample(rng_x0, jnp.where(not_mask_V, logits_BKV, -jnp.inf), temperature)
    if remasking == "low_confidence":
      logp_BKV = jax.nn.log_softmax(logits_BKV, axis=-1)
      conf_BK = jnp.exp(jnp.take_along_axis(logp_BKV, x0_BK[..., None], axis=-1)[..., 0])
    else:
      conf_BK = jax.random.uniform(rng_conf, (B, block_length), jnp.float32)
    conf_BK = jnp.where(masked_BK, conf_BK, -jnp.inf)
    # commit the k most confident masked positions (ties: lower position first)
    rank_BK = jnp.argsort(jnp.argsort(-conf_BK, axis=1, stable=True), axis=1)
    commit_BK = masked_BK & (rank_BK < k_B[:, None])
    x_BT = jax.lax.dynamic_update_slice(x_BT, jnp.where(commit_BK, x0_BK, blk_BK), (0, start))
    return (x_BT, count_B), (x_BT if return_trajectory else None)

  (x_BT, _), traj_SBT = jax.lax.scan(step, (x_BT, jnp.zeros((B,), jnp.int32)),
                                     jnp.arange(steps))
  out_BG = x_BT[:, P:]
  if eos_id is not None:
    after_eos_BG = jnp.cumsum(out_BG == eos_id, axis=1) - (out_BG == eos_id) > 0
    out_BG = jnp.where(after_eos_BG, pad_id, out_BG)
  return (out_BG, traj_SBT) if return_trajectory else out_BG


def transfer_schedule(block_length: int, steps_per_block: int) -> np.ndarray:
  """The per-step commit counts of one fully masked block, int[steps_per_block]."""
  return np.asarray(num_transfer_tokens(jnp.array([block_length]), steps_per_block))[0]

"""Self-speculative decoding with multi-token heads (Stern et al. 2018; Gloeckle et al. 2024).

The next-token head (head 0) is the model; heads 1 .. n-1 of a `MultiTokenLlama` propose the
following tokens. Each forward feeds the current block of n tokens [d_0 (certain), d_1 .. d_{n-1}
(drafts)] through the trunk and head 0 with the KV cache; head 0's greedy predictions g_j verify
the drafts: d_j is accepted while d_j == g_{j-1} for every earlier j. The m accepted tokens are
emitted, the caches are rolled back to the accepted length (later slots are masked and
overwritten), and the next block is [g_{m-1}, head_1 .. head_{n-1} at position m-1]. The output
is, by construction, plain greedy decoding with head 0 (up to floating-point reassociation: head 0
sees a block of n tokens instead of one, so an exact tie between two logits could break the
other way); each forward emits 1 .. n tokens.

What one verification forward computes (and what it skips):
  - the trunk and head 0 on the n block positions (verification needs all n);
  - for each draft head 1 .. n-1 only the keys and values of the n positions (its cache needs
    them) and the full layer at the single position m-1 whose drafts are used. The heads run in
    turn: as one `vmap`ped layer over stacked parameters they cost twice as much on XLA:CPU
    (batched matmuls; measured 0.25 vs 0.13 ms per forward for 3 heads at d 128);
  - one unembedding of head 0 at the n positions and one of the n-1 drafts; only argmaxes leave
    the forward, the roll-back only resets `length`, and nothing returns to the host until the end.

`distill_draft_heads` raises the acceptance rate without touching the model's output: it trains
the draft heads alone on head 0's own greedy continuations of training prompts (Medusa's
self-distillation, Cai et al. 2024, sec. 3.3.1), the text speculative decoding has to predict.

`deepseek_mtp_speculative_decode` does the same with DeepSeek-V3's depth-1 MTP module as the
draft (blocks of 2: the certain token and the MTP guess for the one after it).

Every decoder here is one compiled program (`jax.lax.while_loop` / `scan`), batch size 1, so
wall-clock ratios compare like with like; `benchmark` times greedy and speculative decoding
interleaved, prompt by prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from jaxllm.models.llama import LlamaConfig
from jaxllm.models.mtp import MultiTokenLlama, decoder_block, init_multi_token_cache
from jaxllm.nn.attention import KVCache
from jaxllm.nn.linear import dense
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.rope import apply_rope


def _set_length(cache, length):
  return jax.tree.map(lambda c: c.replace(length=length), cache,
                      is_leaf=lambda c: hasattr(c, "length"))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def greedy_decode(model: MultiTokenLlama, params, prompt_1P: Int[Array, "1 P"], *,
                  max_new_tokens: int) -> Int[Array, " N"]:
  """Plain greedy decoding with head 0 and a KV cache (one token per forward)."""
  P = prompt_1P.shape[1]
  cache = init_multi_token_cache(model.config, 1, 1, P + max_new_tokens)
  cache = {"trunk": cache["trunk"], "head": cache["heads"][0]}

  def forward(tokens_1L, cache):
    z, trunk = model.apply({"params": params}, tokens_1L, cache=cache["trunk"], method="trunk")
    logits, head = model.apply({"params": params}, 0, z, None, cache["head"],
                               method="head_logits")
    return jnp.argmax(logits[0, -1]).astype(jnp.int32), {"trunk": trunk, "head": head}

  first, cache = forward(prompt_1P, cache)

  def step(carry, _):
    tok, cache = carry
    nxt, cache = forward(tok[None, None], cache)
    return (nxt, cache), tok

  _, out = jax.lax.scan(step, (first, cache), None, length=max_new_tokens)
  return out


def head_keys_values(config: LlamaConfig, head_params, z_BLD: Float[Array, "B L D"],
                     positions_BL: Int[Array, "B L"]):
  """The keys and values [B, L, K, H] a head layer (`DecoderBlock` with `head_params`) writes
  into its KV cache for inputs z: its attention RMSNorm, k/v projections and RoPE, the same
  modules the block runs, without the queries, attention output and MLP."""
  cfg = config
  K, H = cfg.n_kv_heads, cfg.resolved_head_dim
  B, L, D = z_BLD.shape
  x_TD = RMSNorm(cfg.norm_eps, cfg.weight_dtype).apply(
      {"params": head_params["attn_norm"]}, z_BLD).reshape(B * L, D)
  proj = lambda name: dense(K * H, ("embed", "kv_heads"), name=name, dtype=cfg.compute_dtype,
                            param_dtype=cfg.weight_dtype).apply(
                                {"params": head_params["attn"][name]}, x_TD).reshape(B, L, K, H)
  inv_freq = np.asarray(decoder_block(cfg).inv_freq)  # exactly the block's RoPE frequencies
  return apply_rope(proj("k_proj"), positions_BL, inv_freq), proj("v_proj")


def _speculative(model: MultiTokenLlama, params, prompt_1P, max_new_tokens: int):
  """(tokens [N], forwards, accepted [n-1]): accepted[j-1] counts the forwards in which draft j
  was accepted (drafts 1 .. j all equal to head 0's greedy tokens)."""
  n, cfg = model.n_future, model.config
  if n < 2:
    raise ValueError(f"Self-speculative decoding needs n_future >= 2 heads (got {n}).")
  P = prompt_1P.shape[1]
  max_len = P + max_new_tokens + 2 * n
  empty = lambda: KVCache.empty(1, max_len, cfg.n_kv_heads, cfg.resolved_head_dim,
                                cfg.compute_dtype)
  cache = {"trunk": [empty() for _ in range(cfg.n_layers - 1)], "head": empty(),
           "drafts": [empty() for _ in range(n - 1)]}
  layer = decoder_block(cfg)

  def draft_head(i, cache, z_1LD, positions_1L, m):
    """Draft head i: keys/values of the whole block, the full layer at position m-1 only."""
    p = params[f"heads_{i}"]
    k_1LKH, v_1LKH = head_keys_values(cfg, p, z_1LD, positions_1L)
    start = cache.length
    cache = KVCache(
        jax.lax.dynamic_update_slice(cache.k_BSKH, k_1LKH.astype(cache.k_BSKH.dtype),
                                     (0, start, 0, 0)),
        jax.lax.dynamic_update_slice(cache.v_BSKH, v_1LKH.astype(cache.v_BSKH.dtype),
                                     (0, start, 0, 0)),
        start + m - 1)  # the layer call below rewrites slot start + m - 1 and attends up to it
    at = lambda x: jax.lax.dynamic_slice_in_dim(x, m - 1, 1, axis=1)
    h_11D, cache = layer.apply({"params": p}, at(z_1LD), at(positions_1L), cache)
    return h_11D[0, 0], cache

  def forward(block_1L, cache, accept):
    """-> head 0's greedy tokens after each block position [L], accepted count m, the n-1
    drafts after position m-1, and the caches (length = start + L; rolled back by the caller)."""
    z_1LD, trunk = model.apply({"params": params}, block_1L, cache=cache["trunk"],
                               method="trunk")
    logits_1LV, head = model.apply({"params": params}, 0, z_1LD, None, cache["head"],
                                   method="head_logits")
    greedy_L = jnp.argmax(logits_1LV[0], axis=-1).astype(jnp.int32)
    m = accept(greedy_L)
    L = block_1L.shape[1]
    positions_1L = (cache["head"].length + jnp.arange(L, dtype=jnp.int32))[None]
    h_D, drafts = zip(*[draft_head(i, cache["drafts"][i - 1], z_1LD, positions_1L, m)
                        for i in range(1, n)])
    draft_N = jnp.argmax(model.apply({"params": params}, jnp.stack(h_D), method="unembed"),
                         axis=-1).astype(jnp.int32)
    return greedy_L, m, draft_N, {"trunk": trunk, "head": head, "drafts": list(drafts)}

  greedy_P, _, draft_N, cache = forward(prompt_1P, cache, lambda g: jnp.int32(P))
  block = jnp.concatenate([greedy_P[P - 1][None], draft_N])
  out = jnp.zeros((max_new_tokens + n,), jnp.int32)

  def body(state):
    out, n_out, block, cache, forwards, accepted = state
    length = cache["head"].length
    # block[j] (j >= 1) is accepted while it equals greedy's token after block[j - 1]
    run = lambda greedy_L: jnp.cumprod((block[1:] == greedy_L[:-1]).astype(jnp.int32))
    greedy_L, m, draft_N, cache = forward(block[None], cache, lambda g: 1 + jnp.sum(run(g)))
    accepted = accepted + run(greedy_L)
    out = jax.lax.dynamic_update_slice(out, block, (n_out,))
    cache = _set_length(cache, length + m)  # roll back: later slots are masked, overwritten
    block = jnp.concatenate([greedy_L[m - 1][None], draft_N])
    return out, n_out + m, block, cache, forwards + 1, accepted

  zero = jnp.zeros((), jnp.int32)
  out, _, _, _, forwards, accepted = jax.lax.while_loop(
      lambda state: state[1] < max_new_tokens, body,
      (out, zero, block, cache, zero, jnp.zeros((n - 1,), jnp.int32)))
  return out[:max_new_tokens], forwards, accepted


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def speculative_decode(model: MultiTokenLlama, params, prompt_1P: Int[Array, "1 P"], *,
                       max_new_tokens: int) -> tuple[Int[Array, " N"], Int[Array, ""]]:
  """(greedy tokens, number of forwards after the prefill) by blockwise self-speculation."""
  tokens, forwards, _ = _speculative(model, params, prompt_1P, max_new_tokens)
  return tokens, forwards


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def speculative_decode_stats(model: MultiTokenLlama, params, prompt_1P: Int[Array, "1 P"], *,
                             max_new_tokens: int):
  """(tokens, forwards, accepted [n-1]): as `speculative_decode`, plus for each draft head j the
  number of forwards in which drafts 1 .. j were all accepted (accepted[j-1] / accepted[j-2] is
  head j's acceptance rate given that the drafts before it were accepted)."""
  return _speculative(model, params, prompt_1P, max_new_tokens)


@dataclasses.dataclass(frozen=True)
class SpeculativeReport:
  tokens: int
  forwards: int  # verification forwards (plain greedy needs `tokens` of them)
  tokens_per_forward: float
  greedy_seconds: float  # sum over prompts of the median over repeats
  speculative_seconds: float
  speedup: float
  identical: bool
  per_prompt_speedup: tuple[float, ...] = ()


def benchmark(model: MultiTokenLlama, params, prompts: list, max_new_tokens: int,
              repeats: int = 3, clock=time.perf_counter) -> SpeculativeReport:
  """Accepted tokens per forward and wall-clock speedup vs greedy with a KV cache, measured in
  the same run: both compiled first (prompts of one length share one compilation), then timed
  interleaved, greedy and speculative back to back for each prompt and repeat, so that changes
  in machine load hit both alike; per prompt the median over `repeats` is kept."""
  greedy = functools.partial(greedy_decode, model, params, max_new_tokens=max_new_tokens)
  spec = functools.partial(speculative_decode, model, params, max_new_tokens=max_new_tokens)
  for p in {tuple(p.shape): p for p in prompts}.values():  # one compilation per prompt shape
    jax.block_until_ready(greedy(p))
    jax.block_until_ready(spec(p))
  tg, ts, forwards, identical = [], [], 0, True
  for p in prompts:
    times_g, times_s = [], []
    for _ in range(repeats):
      t0 = clock()
      g = jax.block_until_ready(greedy(p))
      t1 = clock()
      s, f = jax.block_until_ready(spec(p))
      t2 = clock()
      times_g.append(t1 - t0)
      times_s.append(t2 - t1)
    tg.append(statistics.median(times_g))
    ts.append(statistics.median(times_s))
    forwards += int(f)
    identical &= bool(jnp.array_equal(g, s))
  tokens = max_new_tokens * len(prompts)
  return SpeculativeReport(
      tokens=tokens, forwards=forwards, tokens_per_forward=tokens / max(forwards, 1),
      greedy_seconds=sum(tg), speculative_seconds=sum(ts), speedup=sum(tg) / sum(ts),
      identical=identical, per_prompt_speedup=tuple(a / b for a, b in zip(tg, ts)))


# ----------------------------------------------------------------------- self-distilled drafts
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def greedy_continuations(model: MultiTokenLlama, params, prompts_BP: Int[Array, "B P"], *,
                         max_new_tokens: int) -> Int[Array, "B T"]:
  """Each prompt followed by head 0's greedy continuation of `max_new_tokens` tokens
  (`greedy_decode` run for every row; T = P + max_new_tokens). Batched products may round
  differently from batch-1 decoding, so a near-tie can rarely break the other way: harmless for
  distillation data, which only has to be what the model tends to emit."""
  one = lambda p_P: greedy_decode(model, params, p_P[None], max_new_tokens=max_new_tokens)
  return jnp.concatenate([prompts_BP, jax.vmap(one)(prompts_BP)], axis=1)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """What `distill_draft_heads` generates and how it trains on it."""

  max_new_tokens: int = 128  # greedy tokens generated after each prompt
  steps: int = 600
  batch_size: int = 16
  lr: float = 1e-3
  warmup_steps: int = 20
  weight_decay: float = 0.0
  seed: int = 0

  def __post_init__(self):
    for name in ("max_new_tokens", "steps", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"DistillConfig.{name}={getattr(self, name)} must be >= 1.")
    if self.lr <= 0:
      raise ValueError(f"DistillConfig.lr={self.lr} must be positive.")


def distill_draft_heads(model: MultiTokenLlama, params, prompt_batches: Iterable,
                        cfg: DistillConfig = DistillConfig(), pad_id: int = -1,
                        progress: bool = True):
  """Self-distils the draft heads: generates head 0's greedy continuation of every prompt
  (`prompt_batches`: arrays [B, P], one prompt length P throughout), then trains heads
  1 .. n-1 alone for `cfg.steps` AdamW steps (the library's warm-up + cosine schedule to
  0.1 lr) on random minibatches of those sequences with
  `draft_distillation_loss_fn` (trunk, head 0, final norm and unembedding frozen, so greedy
  decoding -- and the speculative output -- stays exactly what it was).
  -> (params, {"loss": per-step loss per target, "sequences": the generated [S, P + N] data})."""
  from jaxllm.config import OptimConfig
  from jaxllm.objectives import multi_token as mt
  from jaxllm.train.optim import make_schedule
  from jaxllm.train.step import TrainState, make_train_step

  if model.n_future < 2:
    raise ValueError(f"distill_draft_heads needs n_future >= 2 heads (got {model.n_future}).")
  seqs, P = [], None
  for prompts_BP in tqdm(list(prompt_batches), desc="greedy continuations", unit="batch",
                         disable=not progress):
    prompts_BP = jnp.asarray(prompts_BP, jnp.int32)
    if prompts_BP.ndim != 2 or (P is not None and prompts_BP.shape[1] != P):
      raise ValueError(f"prompt batches must be [B, P] with one P throughout; got shape "
                       f"{prompts_BP.shape} after P = {P}.")
    P = prompts_BP.shape[1]
    seqs.append(np.asarray(greedy_continuations(model, params, prompts_BP,
                                                max_new_tokens=cfg.max_new_tokens)))
  if not seqs:
    raise ValueError("distill_draft_heads got no prompt batches.")
  data = np.concatenate(seqs)
  if len(data) < cfg.batch_size:
    raise ValueError(f"{len(data)} generated sequences are fewer than batch_size "
                     f"{cfg.batch_size}: pass more prompts or a smaller batch.")
  schedule = make_schedule(OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps), cfg.steps)
  tx = mt.freeze_all_but_draft_heads(
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay), params)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jax.random.key_data(jax.random.key(cfg.seed)))
  step = jax.jit(make_train_step(mt.draft_distillation_loss_fn(model, pad_id, P), tx))
  rng, losses = np.random.default_rng(cfg.seed), []
  for _ in tqdm(range(cfg.steps), desc="distilling draft heads", unit="step",
                disable=not progress):
    idx = rng.choice(len(data), cfg.batch_size, replace=False)
    state, metrics = step(state, {"tokens": jnp.asarray(data[idx])})
    losses.append(metrics["loss"])
  return state.params, {"loss": [float(x) for x in jax.device_get(losses)], "sequences": data}


# ------------------------------------------------------------------- DeepSeek MTP as the draft
def _ds_forward(model, variables, tokens_1L, cache):
  """Main model over a block: trunk output h (MTP input), logits, updated MLA cache."""
  h_1LD, cache = model.apply(variables, tokens_1L, cache=cache, method="trunk")
  logits = model.apply(variables, h_1LD, method=lambda m, h: m.logits(m.final_norm(h)))
  return h_1LD, logits, cache


def _ds_mtp(model, variables, h_1LD, next_1L, cache):
  """MTP depth 1 over a block: h_t and token t + 1 -> logits for token t + 2; its own cache."""
  def f(m, h, t, c):
    L = t.shape[1]
    pos = jnp.broadcast_to(c.length + jnp.arange(L, dtype=jnp.int32), (1, L))
    x, c = m.mtp[0](h, m.embed(t), pos, c)
    return m.logits(m.mtp[0].head_input(x)), c
  return model.apply(variables, h_1LD, next_1L, cache, method=f)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def deepseek_greedy_decode(model, variables, prompt_1P: Int[Array, "1 P"], *,
                           max_new_tokens: int) -> Int[Array, " N"]:
  """Plain greedy decoding of a `jaxllm.models.deepseek.DeepSeek` with its MLA cache."""
  from jaxllm.models.deepseek import init_cache
  cache = init_cache(model.config, 1, prompt_1P.shape[1] + max_new_tokens)
  _, logits, cache = _ds_forward(model, variables, prompt_1P, cache)

  def step(carry, _):
    tok, cache = carry
    _, logits, cache = _ds_forward(model, variables, tok[None, None], cache)
    return (jnp.argmax(logits[0, -1]).astype(jnp.int32), cache), tok

  first = jnp.argmax(logits[0, -1]).astype(jnp.int32)
  _, out = jax.lax.scan(step, (first, cache), None, length=max_new_tokens)
  return out


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def deepseek_mtp_speculative_decode(model, variables, prompt_1P: Int[Array, "1 P"], *,
                                    max_new_tokens: int):
  """(greedy tokens, forwards) with the depth-1 MTP module drafting token t + 2: each forward
  verifies the block [certain token, MTP draft] and emits 1 or 2 tokens (DeepSeek-V3 sec. 5.4.3
  reports 85-90% second-token acceptance). The MTP layer keeps its own compressed cache, fed
  h_t with the verified token t + 1, and is rolled back with the main cache."""
  from jaxllm.models.deepseek import init_cache
  from jaxllm.nn.mla import MLACache
  cfg = model.config
  if cfg.mtp_depth < 1:
    raise ValueError("deepseek_mtp_speculative_decode needs a model with mtp_depth >= 1.")
  P = prompt_1P.shape[1]
  max_len = P + max_new_tokens + 4
  cache = init_cache(cfg, 1, max_len)
  mtp_cache = MLACache.empty(1, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                             cfg.compute_dtype)
  h, logits, cache = _ds_forward(model, variables, prompt_1P, cache)
  d0 = jnp.argmax(logits[0, -1]).astype(jnp.int32)
  nxt = jnp.concatenate([prompt_1P[:, 1:], d0[None, None]], axis=1)
  mtp_logits, mtp_cache = _ds_mtp(model, variables, h, nxt, mtp_cache)
  block = jnp.stack([d0, jnp.argmax(mtp_logits[0, -1]).astype(jnp.int32)])
  out = jnp.zeros((max_new_tokens + 2,), jnp.int32)

  def body(state):
    out, n_out, block, cache, mtp_cache, forwards = state
    length = cache[0].length
    h, logits, cache = _ds_forward(model, variables, block[None], cache)
    g = jnp.argmax(logits[0], axis=-1).astype(jnp.int32)  # greedy after block[0], block[1]
    m = 1 + (block[1] == g[0]).astype(jnp.int32)
    out = jax.lax.dynamic_update_slice(out, block, (n_out,))
    cache = _set_length(cache, length + m)
    # token after position length is g[0] whether or not the draft was right (if right, it
    # equals the draft); the MTP layer reads (h_t, token t + 1) for both new positions
    mtp_logits, mtp_cache = _ds_mtp(model, variables, h, g[None], mtp_cache)
    mtp_cache = mtp_cache.replace(length=length + m)
    draft = jnp.argmax(mtp_logits[0, m - 1]).astype(jnp.int32)
    return out, n_out + m, jnp.stack([g[m - 1], draft]), cache, mtp_cache, forwards + 1

  state = (out, jnp.zeros((), jnp.int32), block, cache, mtp_cache, jnp.zeros((), jnp.int32))
  out, _, _, _, _, forwards = jax.lax.while_loop(lambda s: s[1] < max_new_tokens, body, state)
  return out[:max_new_tokens], forwards

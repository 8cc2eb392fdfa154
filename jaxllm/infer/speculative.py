"""Self-speculative decoding with multi-token heads (Stern et al. 2018; Gloeckle et al. 2024).

The next-token head (head 0) is the model; heads 1 .. n-1 of a `MultiTokenLlama` propose the
following tokens. Each forward feeds the current block of n tokens [d_0 (certain), d_1 .. d_{n-1}
(drafts)] through trunk and heads with the KV cache; head 0's greedy predictions g_j verify the
drafts: d_j is accepted while d_j == g_{j-1} for every earlier j. The m accepted tokens are
emitted, the caches are rolled back to the accepted length (later slots are masked and
overwritten), and the next block is [g_{m-1}, head_1 .. head_{n-1} at position m-1]. The output
is, by construction, exactly plain greedy decoding with head 0; each forward emits 1 .. n tokens.

`deepseek_mtp_speculative_decode` does the same with DeepSeek-V3's depth-1 MTP module as the
draft (blocks of 2: the certain token and the MTP guess for the one after it).

Every decoder here is one compiled program (`jax.lax.while_loop` / `scan`), batch size 1, so
wall-clock ratios compare like with like.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from jaxllm.models.mtp import MultiTokenLlama, decoder_block, init_multi_token_cache
from jaxllm.nn.attention import KVCache


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


def _stack(trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def _all_heads(model: MultiTokenLlama, params, tokens_1L, cache):
  """Trunk over a block, then all n heads as ONE batched layer (`vmap` over the heads' stacked
  parameters and caches, not n layers in turn): head outputs [n, L, D] before the final norm,
  and the cache {"trunk": [...], "heads": KVCache with a leading head axis}."""
  z_1LD, trunk = model.apply({"params": params}, tokens_1L, cache=cache["trunk"],
                             method="trunk")
  L = tokens_1L.shape[1]
  positions_1L = (cache["heads"].length + jnp.arange(L, dtype=jnp.int32))[None]
  block = decoder_block(model.config)
  stacked = _stack([params[f"heads_{i}"] for i in range(model.n_future)])
  axes = KVCache(0, 0, None)  # one shared length for all heads
  h_N1LD, heads = jax.vmap(lambda p, c: block.apply({"params": p}, z_1LD, positions_1L, c),
                           in_axes=(0, axes), out_axes=(0, axes))(stacked, cache["heads"])
  return h_N1LD[:, 0], {"trunk": trunk, "heads": heads}


def _argmax_logits(model, params, h_LD):
  return jnp.argmax(model.apply({"params": params}, h_LD, method="unembed"),
                    axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def speculative_decode(model: MultiTokenLlama, params, prompt_1P: Int[Array, "1 P"], *,
                       max_new_tokens: int) -> tuple[Int[Array, " N"], Int[Array, ""]]:
  """(greedy tokens, number of forwards after the prefill) by blockwise self-speculation.

  One verification forward = the trunk on the n-token block, all n heads as one batched layer
  (their KV caches need every block position), the unembedding of head 0 at the n positions
  (verification), then the unembedding of heads 1 .. n-1 at the last accepted position only
  (the next drafts). Only argmaxes leave the forward; the rollback only resets `length`."""
  n = model.n_future
  P = prompt_1P.shape[1]
  max_len = P + max_new_tokens + 2 * n
  cfg = model.config
  empty = lambda: KVCache.empty(1, max_len, cfg.n_kv_heads, cfg.resolved_head_dim,
                                cfg.compute_dtype)
  cache = {"trunk": [empty() for _ in range(cfg.n_layers - 1)],
           "heads": _stack([empty() for _ in range(n)]).replace(length=jnp.zeros((), jnp.int32))}

  def forward(block_1L, cache):
    """-> head 0's greedy tokens after each block position [L], heads' outputs, cache."""
    h_NLD, cache = _all_heads(model, params, block_1L, cache)
    return _argmax_logits(model, params, h_NLD[0]), h_NLD, cache

  def next_block(greedy_L, h_NLD, m):
    """[certain token, drafts of heads 1 .. n-1] after the m-th block position."""
    drafts = _argmax_logits(model, params, jax.lax.dynamic_index_in_dim(h_NLD[1:], m - 1, 1,
                                                                        keepdims=False))
    return jnp.concatenate([greedy_L[m - 1][None], drafts])

  greedy_P, h_NPD, cache = forward(prompt_1P, cache)
  block = next_block(greedy_P, h_NPD, P)
  out = jnp.zeros((max_new_tokens + n,), jnp.int32)

  def body(state):
    out, n_out, block, cache, forwards = state
    length = cache["heads"].length
    greedy_L, h_NLD, cache = forward(block[None], cache)
    # block[j] (j >= 1) is accepted while it equals greedy's token after block[j - 1]
    m = 1 + jnp.sum(jnp.cumprod((block[1:] == greedy_L[:-1]).astype(jnp.int32)))
    out = jax.lax.dynamic_update_slice(out, block, (n_out,))
    cache = _set_length(cache, length + m)  # roll back: later slots are masked, overwritten
    return out, n_out + m, next_block(greedy_L, h_NLD, m), cache, forwards + 1

  out, _, _, _, forwards = jax.lax.while_loop(
      lambda state: state[1] < max_new_tokens, body,
      (out, jnp.zeros((), jnp.int32), block, cache, jnp.zeros((), jnp.int32)))
  return out[:max_new_tokens], forwards


@dataclasses.dataclass(frozen=True)
class SpeculativeReport:
  tokens: int
  forwards: int  # verification forwards (plain greedy needs `tokens` of them)
  tokens_per_forward: float
  greedy_seconds: float
  speculative_seconds: float
  speedup: float
  identical: bool


def benchmark(model: MultiTokenLlama, params, prompts: list, max_new_tokens: int
              ) -> SpeculativeReport:
  """Accepted tokens per forward and wall-clock speedup vs greedy with a KV cache, measured in
  the same run (both compiled first; prompts of one length share one compilation)."""
  for p in prompts[:1]:
    jax.block_until_ready(greedy_decode(model, params, p, max_new_tokens=max_new_tokens))
    jax.block_until_ready(speculative_decode(model, params, p, max_new_tokens=max_new_tokens))
  t0 = time.perf_counter()
  greedy = [jax.block_until_ready(greedy_decode(model, params, p,
                                                max_new_tokens=max_new_tokens))
            for p in prompts]
  t1 = time.perf_counter()
  spec = [jax.block_until_ready(speculative_decode(model, params, p,
                                                   max_new_tokens=max_new_tokens))
          for p in prompts]
  t2 = time.perf_counter()
  forwards = sum(int(f) for _, f in spec)
  tokens = max_new_tokens * len(prompts)
  return SpeculativeReport(
      tokens=tokens, forwards=forwards, tokens_per_forward=tokens / max(forwards, 1),
      greedy_seconds=t1 - t0, speculative_seconds=t2 - t1, speedup=(t1 - t0) / (t2 - t1),
      identical=all(bool(jnp.array_equal(g, s)) for g, (s, _) in zip(greedy, spec)))


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

"""Self-speculative decoding internals: draft-head keys/values, acceptance counts, interleaved
benchmark timing."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.infer import speculative
from jaxllm.models import llama
from jaxllm.models.mtp import MultiTokenLlama, decoder_block
from jaxllm.nn.attention import KVCache


def _mtl(n_future, scale=3.0):
  """A tiny model whose weights are scaled up so that its predictions vary from token to token."""
  cfg = llama.tiny(n_layers=3, d_model=32, ffn_dim=64)
  model = MultiTokenLlama(cfg, n_future)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  return model, jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)


def test_head_keys_values_equal_what_the_head_layer_caches():
  model, params = _mtl(3)
  cfg = model.config
  z_BLD = jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model))
  positions_BL = jnp.broadcast_to(7 + jnp.arange(5), (2, 5))
  cache = KVCache.empty(2, 16, cfg.n_kv_heads, cfg.resolved_head_dim).replace(
      length=jnp.int32(7))
  _, cache = decoder_block(cfg).apply({"params": params["heads_2"]}, z_BLD, positions_BL, cache)
  k, v = speculative.head_keys_values(cfg, params["heads_2"], z_BLD, positions_BL)
  np.testing.assert_allclose(k, cache.k_BSKH[:, 7:12], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(v, cache.v_BSKH[:, 7:12], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_future", [2, 3])
def test_speculative_equals_greedy_and_counts_acceptances(n_future):
  model, params = _mtl(n_future)
  N = 20
  for seed in range(2):
    prompt = jax.random.randint(jax.random.key(seed), (1, 6), 0, 256)
    greedy = speculative.greedy_decode(model, params, prompt, max_new_tokens=N)
    tokens, forwards, accepted = speculative.speculative_decode_stats(model, params, prompt,
                                                                      max_new_tokens=N)
    np.testing.assert_array_equal(tokens, greedy)
    accepted = np.asarray(accepted)
    assert accepted.shape == (n_future - 1,)
    assert np.all(np.diff(accepted) <= 0)  # draft j is accepted only after drafts 1 .. j-1
    emitted = int(forwards) + int(accepted.sum())  # each forward emits 1 + accepted drafts
    assert N <= emitted < N + n_future
    assert len(set(np.asarray(greedy).tolist())) > 3  # a non-degenerate continuation
  # zero final-norm scale: every head predicts token 0 everywhere, every draft is accepted
  same = {**params, "final_norm": {"scale": jnp.zeros_like(params["final_norm"]["scale"])}}
  _, forwards, accepted = speculative.speculative_decode_stats(model, same, prompt,
                                                               max_new_tokens=N)
  assert int(forwards) == -(-N // n_future)
  np.testing.assert_array_equal(accepted, [int(forwards)] * (n_future - 1))


def test_benchmark_times_greedy_and_speculative_interleaved(monkeypatch):
  """After compiling, each (prompt, repeat) runs greedy then speculative back to back, so load
  changes during the benchmark hit both alike."""
  model, params = _mtl(2)
  calls = []
  greedy, spec = speculative.greedy_decode, speculative.speculative_decode

  def logged(name, fn):
    def f(*a, **kw):
      calls.append(name)
      return fn(*a, **kw)
    return f

  monkeypatch.setattr(speculative, "greedy_decode", logged("g", greedy))
  monkeypatch.setattr(speculative, "speculative_decode", logged("s", spec))
  prompts = [jax.random.randint(jax.random.key(s), (1, 5), 0, 256) for s in range(2)]
  rep = speculative.benchmark(model, params, prompts, max_new_tokens=8, repeats=3)
  assert calls[:2] == ["g", "s"]  # compilation (one prompt shape)
  assert calls[2:] == ["g", "s"] * 2 * 3
  assert rep.identical and len(rep.per_prompt_speedup) == 2
  assert rep.tokens == 16 and 1.0 <= rep.tokens_per_forward <= 2.0


@pytest.mark.parametrize("n_future", [2, 4])
def test_drafts_and_acceptances_match_a_full_forward_simulation(n_future):
  """Independent check of what the drafts are: replay self-speculation in Python on the greedy
  sequence, with every head's argmax taken from one uncached full forward (head i at position t
  predicts token t + 1 + i), and compare forwards and per-head acceptance counts."""
  model, params = _mtl(n_future)
  N, P = 24, 6
  prompt = jax.random.randint(jax.random.key(5), (1, P), 0, 256)
  greedy = speculative.greedy_decode(model, params, prompt, max_new_tokens=N + n_future)
  seq = jnp.concatenate([prompt[0], greedy])
  logits_NBLV, _ = model.apply({"params": params}, seq[None])
  heads = np.asarray(jnp.argmax(logits_NBLV[:, 0], axis=-1))  # [n, L]: head i at position t
  seq = np.asarray(seq)
  emitted, forwards, accepted = 0, 0, np.zeros(n_future - 1, int)
  p = P  # position of the block's certain token (greedy's token after the prompt)
  while emitted < N:
    drafts = [heads[i, p - 1] for i in range(1, n_future)]  # head i at p - 1 -> token p + i
    run = np.cumprod([d == seq[p + i] for i, d in enumerate(drafts, 1)])
    accepted += run
    m = 1 + int(run.sum())
    forwards, emitted, p = forwards + 1, emitted + m, p + m
  tokens, f, acc = speculative.speculative_decode_stats(model, params, prompt, max_new_tokens=N)
  np.testing.assert_array_equal(tokens, greedy[:N])
  assert int(f) == forwards
  np.testing.assert_array_equal(np.asarray(acc), accepted)
  assert accepted[0] > 0  # the check means something: some drafts were accepted


# ----------------------------------------------------------------------- self-distilled drafts
def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_draft_distillation_loss_scores_continuation_targets_of_draft_heads_only():
  from jaxllm.objectives import multi_token as mt
  model, params = _mtl(3)
  P, pad = 5, -1
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 256)
  loss_fn = mt.draft_distillation_loss_fn(model, pad, P)
  (total, weight), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, {"tokens": tokens},
                                                                     None)
  # independent: every head's logits from the model's plain forward, cross-entropy in numpy
  logp = _log_softmax(np.asarray(model.apply({"params": params}, tokens[:, :-1])[0], np.float64))
  toks, T = np.asarray(tokens), tokens.shape[1]
  want = [-logp[i, b, t, toks[b, t + 1 + i]] for i in (1, 2) for b in range(2)
          for t in range(T - 1) if P <= t + 1 + i < T]
  np.testing.assert_allclose(float(total), sum(want), rtol=1e-5)
  assert float(weight) == len(want)
  for k, g in grads.items():
    norm = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g))
    assert (norm > 0) == (k in ("heads_1", "heads_2")), k
  with pytest.raises(ValueError, match="no continuation"):
    loss_fn(params, {"tokens": tokens[:, :P + 1]}, None)
  with pytest.raises(ValueError, match="n_future >= 2"):
    mt.draft_distillation_loss_fn(_mtl(1)[0], pad, P)


def test_distilled_draft_heads_raise_acceptance_and_keep_the_greedy_output():
  model, params = _mtl(3)
  prompt = lambda s, B: jax.random.randint(jax.random.key(s), (B, 6), 0, 256)
  cfg = speculative.DistillConfig(max_new_tokens=24, steps=300, batch_size=16, lr=3e-3)
  new, info = speculative.distill_draft_heads(model, params, [prompt(10, 32), prompt(11, 32)],
                                              cfg, progress=False)
  assert info["sequences"].shape == (64, 30)
  assert np.mean(info["loss"][-10:]) < 0.85 * np.mean(info["loss"][:10])
  for k in params:  # trunk, head 0, final norm, unembedding: bit for bit what they were
    same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params[k], new[k]))
    assert same == (k not in ("heads_1", "heads_2")), k
  before = after = 0
  for s in range(4):  # held-out prompts
    p = prompt(100 + s, 1)
    greedy = speculative.greedy_decode(model, params, p, max_new_tokens=24)
    tokens, f_new = speculative.speculative_decode(model, new, p, max_new_tokens=24)
    np.testing.assert_array_equal(tokens, greedy)
    before += int(speculative.speculative_decode(model, params, p, max_new_tokens=24)[1])
    after += int(f_new)
  print(f"forwards for 4 x 24 tokens: {before} before, {after} after distillation")
  assert after < 0.85 * before

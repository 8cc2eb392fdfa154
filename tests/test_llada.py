"""LLaDA masked diffusion: objective, sampler and likelihood against direct computations."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from jaxllm.eval import likelihood as lk
from jaxllm.infer import diffusion as dif
from jaxllm.models import llada, llama
from jaxllm.objectives import masked_diffusion as md

MASK = 259  # ByteTokenizer.mask_id
EOS = 257


def _init(cfg):
  model = llada.make_model(cfg)
  init = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, 4), jnp.int32)))["params"])
  return model, init(jax.random.key(0))


def _forward(model):
  """A jitted `tokens -> logits` for direct (numpy) computations."""
  return jax.jit(lambda p, x: model.apply({"params": p}, x)[0])


@pytest.fixture(scope="module")
def tiny():
  return _init(llada.tiny(max_seq_len=64))


@pytest.fixture(scope="module")
def peaky():
  """Vocabulary 16 ([MASK] = 15), large init: confident, context-dependent predictions."""
  return _init(llada.tiny(vocab_size=16, init_std=0.5, max_seq_len=32))


def _log_softmax64(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------ model
def test_presets_are_bidirectional_llamas():
  for name in llada.PRESETS:
    assert llada.preset(name).mask_kind == "bidirectional"
  cfg = llada.smdm_6m()
  abstract = jax.eval_shape(llada.make_model(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract)["params"]))
  assert n == cfg.num_params()
  assert abs(llada.llada_8b().num_params() / 8.02e9 - 1) < 0.01  # LLaDA-8B: 8.02B parameters
  with pytest.raises(ValueError, match="mask_kind='bidirectional'"):
    llada.make_model(llama.tiny())
  with pytest.raises(ValueError, match="bidirectional"):
    md.masked_diffusion_loss_fn(llama.Llama(llama.tiny()), MASK)


# -------------------------------------------------------------------------------- objective
def test_loss_equals_direct_per_token_formula(tiny):
  model, params = tiny
  B, L, eps = 3, 12, 1e-3
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, 256)
  noise = md.Noise(t_B=jnp.array([0.1, 0.5, 0.9]),
                   u_BL=jax.random.uniform(jax.random.key(2), (B, L)), length=jnp.array(L))
  pretrain_loss = jax.jit(md.pretrain_loss, static_argnums=(0, 4, 5))
  loss_sum, weight = pretrain_loss(model, params, tokens, noise, MASK, eps)

  t, u, x = np.asarray(noise.t_B), np.asarray(noise.u_BL), np.asarray(tokens)
  noisy = x.copy()
  total = 0.0
  for b in range(B):
    p = (1 - eps) * t[b] + eps
    noisy[b] = np.where(u[b] < p, MASK, x[b])
  logp = _log_softmax64(_forward(model)(params, jnp.asarray(noisy)))
  for b, i in itertools.product(range(B), range(L)):
    p = (1 - eps) * t[b] + eps
    if u[b, i] < p:
      total += -logp[b, i, x[b, i]] / p
  assert float(weight) == B * L  # normalised by batch x length, not by the masked count
  np.testing.assert_allclose(float(loss_sum), total, rtol=1e-5)

  # the loss function draws exactly this kind of noise from its rng
  rng = jax.random.key(7)
  fn = md.masked_diffusion_loss_fn(model, MASK, eps, random_length_prob=0.0)
  batch = {"tokens": jnp.concatenate([tokens, tokens[:, :1]], axis=1)}  # [B, L + 1]
  got = jax.jit(fn)(params, batch, rng)
  want = pretrain_loss(model, params, tokens, md.sample_noise(rng, B, L), MASK, eps)
  np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6)


def test_noise_draws():
  keys = jax.random.split(jax.random.key(0), 4000)
  noise = jax.vmap(lambda k: md.sample_noise(k, 2, 8, random_length_prob=0.25))(keys)
  length = np.asarray(noise.length)
  cut = length < 8  # a draw of length 8 is indistinguishable from no cut (prob 0.25 / 8)
  assert abs(cut.mean() - 0.25 * 7 / 8) < 0.03
  assert stats.chisquare(np.bincount(length[cut], minlength=8)[1:]).pvalue > 1e-3  # U{1..7}
  t = np.asarray(noise.t_B).ravel()
  assert t.min() >= 0 and t.max() < 1 and stats.kstest(t, "uniform").pvalue > 1e-3
  assert (np.asarray(md.sample_noise(jax.random.key(1), 2, 8).length) == 8).all()


def test_random_length_truncation_equals_sliced_batch(tiny):
  model, params = tiny
  B, L, r = 2, 16, 7
  tokens = jax.random.randint(jax.random.key(3), (B, L), 0, 256)
  noise = md.Noise(jnp.array([0.3, 0.8]), jax.random.uniform(jax.random.key(4), (B, L)),
                   jnp.array(r))
  sliced = md.Noise(noise.t_B, noise.u_BL[:, :r], jnp.array(r))

  f = jax.jit(lambda p, toks, nz, hide: md.pretrain_loss(model, p, toks, nz, MASK,
                                                          hide_dropped=hide), static_argnums=3)
  # positions >= r are neither masked, scored, nor seen: the loss (as a function of the
  # parameters, hence also its gradient) is the sliced batch's, normalised by B * r
  got, want = np.array(f(params, tokens, noise, True)), np.array(f(params, tokens[:, :r], sliced,
                                                                     False))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[1] == B * r
  # no truncation: the hidden-keys path is the plain bidirectional model, bit for bit
  whole = md.Noise(noise.t_B, noise.u_BL, jnp.array(L))
  np.testing.assert_array_equal(np.array(f(params, tokens, whole, True)),
                                np.array(f(params, tokens, whole, False)))


def test_sft_masks_only_the_response_and_normalises_by_answer_length(tiny):
  model, params = tiny
  B, L, eps = 2, 10, 1e-3
  prompt_len = np.array([3, 6])
  x = np.array(jax.random.randint(jax.random.key(5), (B, L), 0, 256))
  x[0, 7:] = EOS  # EOS padding is part of the response
  noise = md.Noise(jnp.array([0.6, 0.95]), jax.random.uniform(jax.random.key(6), (B, L)),
                   jnp.array(L))
  response = np.arange(L)[None, :] >= prompt_len[:, None]
  noisy, masked, _ = md.forward_process(jnp.asarray(x), noise, MASK, eps, jnp.asarray(response))
  noisy, masked = np.asarray(noisy), np.asarray(masked)
  for b in range(B):  # the prompt is never altered
    np.testing.assert_array_equal(noisy[b, :prompt_len[b]], x[b, :prompt_len[b]])
  assert masked[0, 7:].any()  # some EOS padding is masked (and trained)

  loss_sum, weight = jax.jit(md.sft_loss, static_argnums=(0, 5, 6))(model, params, jnp.asarray(x), jnp.asarray(response), noise,
                                 MASK, eps)
  logp = _log_softmax64(_forward(model)(params, jnp.asarray(noisy)))
  want = 0.0
  for b in range(B):
    p = (1 - eps) * float(noise.t_B[b]) + eps
    ans_len = L - prompt_len[b]
    want += sum(-logp[b, i, x[b, i]] / p / ans_len for i in range(L) if masked[b, i])
  assert float(weight) == B
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)

  np.testing.assert_array_equal(md.response_mask({"prompt_len": jnp.asarray(prompt_len)}, L),
                                response)
  fn = jax.jit(md.sft_loss_fn(model, MASK, eps))
  got = fn(params, {"tokens": jnp.asarray(x), "prompt_len": jnp.asarray(prompt_len)},
           jax.random.key(0))
  assert np.isfinite(np.array(got)).all() and float(got[1]) == B


def test_sharded_loss_equals_single_device():
  from jaxllm.sharding import MeshConfig, make_mesh
  from jaxllm.train.step import ShardedTrainer

  model = llada.make_model(llada.tiny(max_seq_len=64))
  loss_fn = md.masked_diffusion_loss_fn(model, MASK, random_length_prob=1.0)
  tokens = np.random.RandomState(0).randint(0, 256, (8, 17)).astype(np.int32)
  spec = {"tokens": jax.ShapeDtypeStruct(tokens.shape, jnp.int32)}

  def fn(params, batch):
    s, w = loss_fn(params, batch, jax.random.key(3))
    return s / w

  trainer = ShardedTrainer(model, optax.sgd(0.1), make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
                           loss_fn, spec)
  params = trainer.init(0).params
  sharded = trainer.evaluate(fn, params, trainer.shard_batch({"tokens": tokens}))
  single = jax.jit(fn)(jax.device_put(jax.device_get(params), jax.devices()[0]),
                       {"tokens": jnp.asarray(tokens)})
  np.testing.assert_allclose(float(sharded), float(single), rtol=1e-5)


# ---------------------------------------------------------------------------------- sampler
def test_transfer_counts_sum_to_masked_count():
  counts = jnp.array([0, 1, 5, 7, 32, 33])
  for steps in (1, 3, 4, 8):
    k = np.asarray(dif.num_transfer_tokens(counts, steps))
    np.testing.assert_array_equal(k.sum(1), np.asarray(counts))
    assert (k.max(1) - k.min(1) <= 1).all() and (np.diff(k, axis=1) <= 0).all()


def _reference_generate(model, params, prompt, *, steps, gen_length, block_length, cfg_scale):
  """generate.py's loop at temperature 0, low-confidence remasking, one step at a time."""
  B, P = prompt.shape
  x = np.concatenate([prompt, np.full((B, gen_length), MASK)], axis=1)
  fwd = _forward(model)
  nb = gen_length // block_length
  s = steps // nb
  for blk in range(nb):
    lo, hi = P + blk * block_length, P + (blk + 1) * block_length
    k = np.asarray(dif.num_transfer_tokens(jnp.asarray((x[:, lo:hi] == MASK).sum(1)), s))
    for i in range(s):
      logits = np.asarray(fwd(params, jnp.asarray(x)), np.float64)
      if cfg_scale > 0:
        un = x.copy()
        un[:, :P] = MASK
        un_logits = np.asarray(fwd(params, jnp.asarray(un)), np.float64)
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
      pick = logits.copy()
      pick[..., MASK] = -np.inf
      x0 = pick.argmax(-1)
      p = np.exp(_log_softmax64(logits))
      conf = np.take_along_axis(p, x0[..., None], -1)[..., 0]
      conf[:, hi:] = -np.inf
      conf = np.where(x == MASK, conf, -np.inf)
      for b in range(B):
        idx = np.argsort(-conf[b], kind="stable")[:k[b, i]]
        x[b, idx] = x0[b, idx]
  return x[:, P:]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_greedy_sampler_equals_reference_loop(tiny, cfg_scale):
  """At guidance scale 0 this is plain conditional sampling; at w > 0, the guided logits."""
  model, params = tiny
  prompt = np.asarray(jax.random.randint(jax.random.key(8), (2, 5), 0, 256))
  kw = dict(steps=8, gen_length=8, block_length=4, cfg_scale=cfg_scale)
  out = dif.generate(model, params, prompt, jax.random.key(0), mask_id=MASK, **kw)
  np.testing.assert_array_equal(out, _reference_generate(model, params, prompt, **kw))
  # temperature 0 is deterministic: another key gives the same tokens
  again = dif.generate(model, params, prompt, jax.random.key(123), mask_id=MASK, **kw)
  np.testing.assert_array_equal(out, again)


def test_guidance_scale_zero_is_conditional():
  cond, un = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  np.testing.assert_allclose(dif.guided_logits(cond, un, 0.0), cond, atol=1e-6)


@pytest.mark.parametrize("remasking,cfg_scale", [("low_confidence", 0.0), ("random", 1.0)])
def test_trajectory_invariants(tiny, remasking, cfg_scale):
  model, params = tiny
  P, G, K, steps = 3, 12, 4, 6  # 3 blocks of 4, 2 steps each
  prompt = np.asarray(jax.random.randint(jax.random.key(9), (2, P), 0, 256))
  out, traj = dif.generate(model, params, prompt, jax.random.key(1), mask_id=MASK, steps=steps,
                           gen_length=G, block_length=K, temperature=1.0, cfg_scale=cfg_scale,
                           remasking=remasking, return_trajectory=True)
  traj = np.asarray(traj)
  schedule = dif.transfer_schedule(K, steps // (G // K))
  prev = np.concatenate([prompt, np.full((2, G), MASK)], axis=1)
  for j in range(steps):
    cur = traj[j]
    np.testing.assert_array_equal(cur[:, :P], prompt)  # the prompt is never altered
    was = prev != MASK
    np.testing.assert_array_equal(cur[was], prev[was])  # committed tokens never change
    new = (prev == MASK) & (cur != MASK)
    blk = j // (steps // (G // K))
    lo, hi = P + blk * K, P + (blk + 1) * K
    assert not new[:, :lo].any() and not new[:, hi:].any()  # only the current block
    np.testing.assert_array_equal(new.sum(1), schedule[j % len(schedule)])
    prev = cur
  assert (prev != MASK).all()
  np.testing.assert_array_equal(out, prev[:, P:])


def test_gumbel_frequencies_match_softmax_at_temperature():
  V, N, temp = 6, 30000, 0.7
  logits = jnp.array([1.0, 0.2, -0.5, 2.0, 0.0, -3.0])
  draws = dif.gumbel_max_sample(jax.random.key(0), jnp.broadcast_to(logits, (1, N, V)), temp)
  counts = np.bincount(np.asarray(draws).ravel(), minlength=V)
  expected = N * np.asarray(jax.nn.softmax(logits / temp))
  assert stats.chisquare(counts, expected).pvalue > 1e-3
  # temperature 0 is the argmax
  assert (np.asarray(dif.gumbel_max_sample(jax.random.key(0), logits[None, None], 0.0)) == 3).all()


def test_eos_pads_the_rest_of_the_answer(tiny):
  model, params = tiny
  prompt = np.asarray(jax.random.randint(jax.random.key(8), (2, 5), 0, 256))
  kw = dict(mask_id=MASK, steps=8, gen_length=8, block_length=8)
  free = np.asarray(dif.generate(model, params, prompt, jax.random.key(0), **kw))
  eos = int(free[0, 2])  # pretend the third token of row 0 is EOS
  out = np.asarray(dif.generate(model, params, prompt, jax.random.key(0), eos_id=eos,
                                pad_id=999, **kw))
  first = list(free[0]).index(eos)
  np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
  assert (out[0, first + 1:] == 999).all()


def test_no_recompilation_across_keys_and_prompts(tiny):
  model, params = tiny
  kw = dict(mask_id=MASK, steps=4, gen_length=4, block_length=2, temperature=1.0)
  dif.generate(model, params, np.zeros((1, 3), np.int32), jax.random.key(0), **kw)
  size = dif._generate._cache_size()
  for seed in range(3):
    dif.generate(model, params, np.full((1, 3), seed, np.int32), jax.random.key(seed), **kw)
  assert dif._generate._cache_size() == size


@pytest.mark.parametrize("kw,match", [
    (dict(gen_length=10, block_length=4, steps=10), "block_length"),
    (dict(gen_length=8, block_length=2, steps=2), "steps=2 is fewer than the number of blocks"),
    (dict(gen_length=8, block_length=2, steps=6), "steps=6 is not divisible"),
    (dict(gen_length=60, block_length=60, steps=60), "max_seq_len"),
    (dict(gen_length=8, block_length=8, steps=8, remasking="top"), "remasking"),
])
def test_bad_generation_arguments_raise(tiny, kw, match):
  model, params = tiny
  with pytest.raises(ValueError, match=match):
    dif.generate(model, params, np.zeros((1, 8), np.int32), jax.random.key(0), mask_id=MASK,
                 **kw)


# ------------------------------------------------------------------------------- likelihood
def test_stratified_counts_are_spread_and_uniform():
  T, b = 5, 4
  c = np.stack([np.asarray(lk.stratified_mask_counts(jax.random.key(s), b, T))
                for s in range(400)])
  assert c.min() >= 1 and c.max() <= T
  for i in range(b):  # each slot's marginal is uniform on 1..T
    assert stats.chisquare(np.bincount(c[:, i], minlength=T + 1)[1:]).pvalue > 1e-3
  assert (np.ptp(c, axis=1) >= 2).all()  # spread, not identical
  m = np.asarray(lk.uniform_masks(jax.random.key(0), jnp.array([0, 2, 5]), 5))
  np.testing.assert_array_equal(m.sum(1), [0, 2, 5])


def _exact_nll_bound(model, params, prompt, target):
  """-E_l E_S [(T/l) sum_{i in S} CE_i]: all 2^T - 1 masks of the target, enumerated."""
  P, T = len(prompt), len(target)
  seq = np.concatenate([prompt, target])
  subsets = [s for n in range(1, T + 1) for s in itertools.combinations(range(T), n)]
  noisy = np.tile(seq, (len(subsets), 1))
  for r, s in enumerate(subsets):
    noisy[r, [P + i for i in s]] = 15
  logp = _log_softmax64(_forward(model)(params, jnp.asarray(noisy)))
  by_len = {n: [] for n in range(1, T + 1)}
  for r, s in enumerate(subsets):
    by_len[len(s)].append(sum(-logp[r, P + i, seq[P + i]] for i in s) * T / len(s))
  return np.mean([np.mean(v) for v in by_len.values()])


def test_estimator_is_unbiased_and_its_variance_falls(peaky):
  model, params = peaky
  prompt, target = np.array([3, 9]), np.array([1, 4, 12, 7])
  exact = _exact_nll_bound(model, params, prompt, target)
  samples = np.asarray(lk.mc_nll_samples(
      model, params, jnp.asarray(np.concatenate([prompt, target])), jax.random.key(0),
      prompt_len=2, num_batches=128, batch_size=8, mask_id=15)).ravel()  # 1024 samples
  se = samples.std() / np.sqrt(samples.size)
  assert samples.std() > 0.05 * abs(exact)  # a real test: single samples vary
  assert abs(samples.mean() - exact) < 4 * se, (samples.mean(), exact, se)
  # estimates from mc_num = 8 vs 64 samples: variance falls roughly 8x
  var8 = samples.reshape(-1, 8).mean(1).var(ddof=1)
  var64 = samples.reshape(-1, 64).mean(1).var(ddof=1)
  assert var64 < var8 / 3, (var8, var64)
  ll = lk.log_likelihood(model, params, prompt, target, jax.random.key(0), mask_id=15,
                         mc_num=1024, batch_size=8)
  np.testing.assert_allclose(ll, -samples.mean(), rtol=1e-5)  # same key, same samples


def test_choice_scoring(peaky):
  model, params = peaky
  choices = [np.array([1, 4]), np.array([7, 7]), np.array([1, 4])]
  ll = lk.choice_log_likelihoods(model, params, [3, 9], choices, jax.random.key(0), mask_id=15,
                                 mc_num=16, batch_size=8)
  assert ll.shape == (3,) and np.isfinite(ll).all() and (ll < 0).all()
  assert ll[0] == ll[2]  # common random numbers
  guided = lk.choice_log_likelihoods(model, params, [3, 9], choices[:1], jax.random.key(0),
                                     mask_id=15, mc_num=16, batch_size=8, cfg_scale=0.5)
  assert np.isfinite(guided).all()
  with pytest.raises(ValueError, match="multiple of batch_size"):
    lk.log_likelihood(model, params, [3], [1], jax.random.key(0), mask_id=15, mc_num=10,
                      batch_size=4)
  with pytest.raises(ValueError, match="max_seq_len"):
    lk.log_likelihood(model, params, np.zeros(30, int), [1, 2, 3], jax.random.key(0),
                      mask_id=15, mc_num=8, batch_size=8)


def test_batched_sequence_bound_matches_enumeration_and_hides_padding(peaky):
  model, params = peaky
  seqs = np.array([[1, 4, 12, 7], [5, 2, 9, 14]])  # 14 plays the pad token in row 1
  est = np.asarray(lk.sequence_nll_bound(model, params, jnp.asarray(seqs), jax.random.key(1),
                                         mask_id=15, mc_num=512, pad_id=14))
  exact = [_exact_nll_bound(model, params, np.array([], int), seqs[0]),
           _exact_nll_bound(model, params, np.array([], int), seqs[1, :3])]
  np.testing.assert_allclose(est, exact, rtol=0.03)  # ~3.5 standard errors at mc_num=2048

"""KV-cache generation and the sampling filters, against independent references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.infer.sampling import filter_logits, generate, sample_token
from jaxllm.models import llama


@pytest.fixture(scope="module")
def model_and_params():
  cfg = llama.tiny(max_seq_len=64)
  model = llama.Llama(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  return model, params


def test_greedy_generation_equals_argmax_of_full_forward(model_and_params):
  model, params = model_and_params
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 256)
  out = generate(model, params, prompt, jax.random.key(0), max_new_tokens=7)
  seq = prompt
  for _ in range(7):  # no cache: re-run the whole sequence each time
    logits, _ = model.apply({"params": params}, seq)
    seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None].astype(seq.dtype)], 1)
  np.testing.assert_array_equal(out, seq[:, 5:])


def test_eos_stops_a_sequence(model_and_params):
  model, params = model_and_params
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 256)
  free = np.asarray(generate(model, params, prompt, jax.random.key(0), max_new_tokens=6))
  eos = int(free[0, 2])  # pretend the third greedy token of row 0 is EOS
  out = np.asarray(generate(model, params, prompt, jax.random.key(0), max_new_tokens=6,
                            eos_id=eos, pad_id=999))
  first = list(free[0]).index(eos)
  np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
  assert (out[0, first + 1:] == 999).all()


def _np_filter(logits, top_k, top_p):
  out = logits.copy()
  if top_k:
    kth = np.sort(logits)[::-1][top_k - 1]
    out[logits < kth] = -np.inf
  if top_p < 1:
    order = np.argsort(-out)
    probs = np.exp(out[order] - out[order][0])
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    drop = order[before >= top_p]
    out[drop] = -np.inf
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (7, 0.8)])
def test_filters_match_numpy_reference(top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(4, 40)).astype(np.float32) * 2
  got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
  for row in range(4):
    want = _np_filter(logits[row], top_k, top_p)
    kept = np.isfinite(want)
    np.testing.assert_array_equal(got[row] > -1e30, kept)
    np.testing.assert_allclose(got[row][kept], want[kept])


def test_sampling_frequencies_match_softmax_over_temperature():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0, 0.5]])
  temperature, n = 0.7, 20000
  draws = jax.vmap(lambda k: sample_token(k, logits, temperature))(
      jax.random.split(jax.random.key(3), n))[:, 0]
  freq = np.bincount(np.asarray(draws), minlength=5) / n
  want = np.asarray(jax.nn.softmax(logits[0] / temperature))
  # 4.5 standard errors of a binomial proportion
  assert np.all(np.abs(freq - want) < 4.5 * np.sqrt(want * (1 - want) / n)), (freq, want)


def test_temperature_zero_is_greedy_and_deterministic():
  logits = jax.random.normal(jax.random.key(0), (3, 11))
  a = sample_token(jax.random.key(1), logits, 0.0)
  b = sample_token(jax.random.key(2), logits, 0.0)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, jnp.argmax(logits, -1))


def test_prompt_too_long_is_a_clear_error(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len=64"):
    generate(model, params, jnp.zeros((1, 60), jnp.int32), jax.random.key(0),
             max_new_tokens=10)

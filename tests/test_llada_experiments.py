"""experiments/llada/run.py: the reversal data never shows a fact backward, the exact
enumeration of LLaDA's likelihood estimator agrees with the library's Monte Carlo estimator, and
the sorting task's answers are sorted prompts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.eval import likelihood as lk
from jaxllm.models import llada

_SPEC = importlib.util.spec_from_file_location(
    "llada_run", Path(__file__).parents[1] / "experiments" / "llada" / "run.py")
run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run)


def test_reversal_training_set_is_forward_only():
  A = 12
  names, attrs, train = run.build_facts(100, A, seed=3)
  run.assert_forward_only(train, A)
  assert len({tuple(n) for n in names}) == 100 and len({tuple(a) for a in attrs}) == 100
  assert np.array_equal(train[:, 1:3], names) and np.array_equal(train[:, 4:6], attrs)
  # no row starts with an attribute or ends with a name: the backward sentence never occurs
  name_tok = (train >= run.R_SPECIAL) & (train < run.R_SPECIAL + A)
  attr_tok = (train >= run.R_SPECIAL + A) & (train < run.R_SPECIAL + 2 * A)
  assert not attr_tok[:, :4].any() and not name_tok[:, 3:].any()
  with pytest.raises(AssertionError):
    bad = train.copy()
    bad[0, 1:3], bad[0, 4:6] = train[0, 4:6], train[0, 1:3]  # a backward sentence
    run.assert_forward_only(bad, A)


def test_mask_subset_weights_are_a_distribution():
  for n in (1, 2, 3, 4):
    masks, w = run.mask_subsets(n)
    prob = w * masks.sum(1) / n  # weight = P(S) * n / |S|
    assert len(w) == 2 ** n - 1 and abs(prob.sum() - 1) < 1e-6


def test_exact_bound_equals_library_estimator_in_expectation():
  cfg = llada.tiny(vocab_size=16, init_std=0.5, max_seq_len=16)
  model = llada.make_model(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 7), jnp.int32)))[
      "params"]
  seq = np.array([0, 5, 6, 1, 9, 10, 2], np.int32)
  exact = float(run.md_exact_bound(model, params, jnp.asarray(seq[None]), (4, 5, 6), 15)[0])
  samples = np.asarray(lk.mc_nll_samples(model, params, jnp.asarray(seq), jax.random.key(1),
                                         prompt_len=4, num_batches=16, batch_size=64,
                                         mask_id=15)).ravel()
  se = samples.std() / np.sqrt(samples.size)
  assert abs(samples.mean() - exact) < 4 * se + 1e-4, (samples.mean(), exact, se)


def test_sort_problems():
  tokens, P = run.sort_problems(np.random.default_rng(0), 32, 8)
  assert tokens.shape == (32, 18) and P == 10
  assert np.all(tokens[:, 0] == run.S_BOS) and np.all(tokens[:, 9] == run.S_SEP)
  assert np.array_equal(np.sort(tokens[:, 1:9], axis=1), tokens[:, 10:])

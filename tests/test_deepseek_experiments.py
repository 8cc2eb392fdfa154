"""experiments/deepseek/run.py: the induction data generator really repeats its segment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_SPEC = importlib.util.spec_from_file_location(
    "deepseek_run", Path(__file__).parents[1] / "experiments" / "deepseek" / "run.py")
run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run)


def test_induction_batch_repeats_a_segment():
  rng = np.random.default_rng(0)
  seq, seg = 48, 6
  tokens, mask = run.induction_batch(rng, 16, seq, 32, seg)
  assert tokens.shape == (16, seq + 1) and mask.shape == (16, seq)
  assert tokens.min() >= 0 and tokens.max() < 32
  for b in range(16):
    idx = np.flatnonzero(mask[b])  # targets tokens[t + 1], t in idx: the copy's tokens 1 .. seg-1
    assert len(idx) == seg - 1 and np.all(np.diff(idx) == 1)
    second = idx[0]  # the copy starts at token index `second`
    copy = tokens[b, second:second + seg]
    starts = [s for s in range(0, second - seg + 1) if np.array_equal(tokens[b, s:s + seg], copy)]
    assert starts, "the masked segment must occur earlier in the sequence"


def test_acceptance_rates_are_conditional_per_head():
  """Head j's rate = forwards with drafts 1..j accepted / forwards with drafts 1..j-1 accepted."""
  rows = [{"forwards": 10, "accepted": [6, 3, 1]}, {"forwards": 10, "accepted": [4, 1, 0]}]
  np.testing.assert_allclose(run._acceptance(rows, 4), [10 / 20, 4 / 10, 1 / 4])


def test_steps_to_level():
  curve = [(50, 0.1), (100, 0.6), (150, 0.95)]
  assert run._steps_to(curve, 0.5) == 100 and run._steps_to(curve, 0.9) == 150
  assert run._steps_to(curve, 0.99) is None

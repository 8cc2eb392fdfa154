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

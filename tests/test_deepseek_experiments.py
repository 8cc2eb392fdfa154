"""experiments/deepseek/run.py: the induction data generator really repeats its segment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

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


def test_distill_then_speculative_run_end_to_end(tmp_path, monkeypatch):
  """`run.py distill` and `run.py speculative` on a tiny saved n = 4 model: the distilled
  parameters change the draft heads only, and the speculative report times both models with
  outputs identical to greedy decoding."""
  import json
  import sys

  import flax.linen as nn
  import flax.serialization
  import jax
  import jax.numpy as jnp

  from jaxllm.data import load_tokenizer
  from jaxllm.models.mtp import MultiTokenLlama

  meta = {"d": 32, "layers": 2, "ffn": 64}
  tok = load_tokenizer("byte")
  model = MultiTokenLlama(run.mtl_config(tok.vocab_size, 32, 2, 64, run.SEQ), 4)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  (tmp_path / "mtp_code.json").write_text(json.dumps({"_meta": meta}))
  (tmp_path / "mtp_code_n4.msgpack").write_bytes(flax.serialization.to_bytes(params))
  common = ["--out", str(tmp_path), "--img", str(tmp_path), "--prompt-len", "16",
            "--new-tokens", "8"]
  monkeypatch.setattr(sys, "argv", ["run.py", "distill", *common, "--distill-steps", "3",
                                    "--distill-prompts", "32"])
  run.main()
  distilled = flax.serialization.from_bytes(
      params, (tmp_path / "mtp_code_n4_distilled.msgpack").read_bytes())
  for k in params:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[k]),
                                                      jax.tree.leaves(distilled[k])))
    assert same == (k not in ("heads_1", "heads_2", "heads_3")), k
  assert len(json.loads((tmp_path / "distill.json").read_text())["loss"]) == 3
  monkeypatch.setattr(sys, "argv", ["run.py", "speculative", *common, "--ns", "4",
                                    "--prompts", "2", "--repeats", "1", "--cost-widths", "",
                                    "--matmul-widths", "32"])
  run.main()
  out = json.loads((tmp_path / "speculative.json").read_text())
  assert {"n=4", "n=4 distilled"} <= set(out)
  assert all(out[k]["all_identical"] for k in ("n=4", "n=4 distilled"))
  assert set(out["matmul_us"]["32"]) == {"1", "2", "4"}
  assert (tmp_path / "spec_speedup.png").exists()
  # a distilled file from another base model is refused before anything is timed
  other = {**params, "layers_0": jax.tree.map(lambda x: x + 1.0, params["layers_0"])}
  (tmp_path / "mtp_code_n4.msgpack").write_bytes(flax.serialization.to_bytes(other))
  with pytest.raises(SystemExit, match="rerun `run.py distill"):
    run.main()

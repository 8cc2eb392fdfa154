"""The training loop: exact resume, non-finite loss, schedules, CLI and bad-input errors."""

import json
import math

import jax
import numpy as np
import pytest

from jaxllm import cli
from jaxllm import config as config_lib
from jaxllm.config import OptimConfig
from jaxllm.train.loop import NonFiniteLossError, train
from jaxllm.train.metrics import read_metrics
from jaxllm.train.optim import make_schedule

TINY = "experiments/configs/tiny.toml"


def _cfg(workdir, *overrides):
  return config_lib.load(TINY, [f"train.workdir={json.dumps(str(workdir))}", "mesh.data=1",
                                "train.eval_batches=1", *overrides])


@pytest.fixture(autouse=True)
def _single_device(monkeypatch):
  """Runs on the first device only, so these tests don't pay for 8-way collectives."""
  import jaxllm.train.loop as loop
  real = loop.make_mesh
  monkeypatch.setattr(loop, "make_mesh", lambda cfg: real(cfg, jax.devices()[:1]))


def test_exact_resume_bit_for_bit(tmp_path):
  steps = ["train.steps=8", "train.ckpt_every=4", "train.log_every=1"]
  full = train(_cfg(tmp_path / "full", *steps))
  first = train(_cfg(tmp_path / "halted", *steps, "train.halt_at=4"))
  assert first["step"] == 4 and len(first["train_losses"]) == 4
  second = train(_cfg(tmp_path / "halted", *steps))  # resumes from step 4's checkpoint
  resumed = first["train_losses"] + second["train_losses"]
  assert resumed == full["train_losses"]  # bit for bit, data order included
  assert second["eval"] == full["eval"]


def test_resume_continues_the_data_stream_not_a_new_one(tmp_path):
  steps = ["train.steps=6", "train.log_every=1"]
  first = train(_cfg(tmp_path / "a", *steps, "train.halt_at=3"))
  second = train(_cfg(tmp_path / "a", *steps))
  restart = train(_cfg(tmp_path / "b", "train.steps=3", "train.log_every=1",
                       "train.halt_at=0", "optim.warmup_steps=5"))
  # a fresh run's first losses differ from the resumed run's later ones: the iterator moved on
  assert second["train_losses"][0] != restart["train_losses"][0]
  assert len(first["train_losses"]) == 3 and len(second["train_losses"]) == 3


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
  # lr=inf turns the first update into NaNs: step 1's loss is finite, step 2's is the first
  # computed from broken parameters.
  cfg = _cfg(tmp_path / "nan", "train.steps=6", "optim.lr=inf", "train.log_every=100")
  with pytest.raises(NonFiniteLossError, match=r"at step 2;.*no checkpoint was saved"):
    train(cfg)
  assert not (tmp_path / "nan" / "checkpoints" / "2").exists()


def test_schedules_match_closed_form():
  cos = make_schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
  assert float(cos(0)) == 0.0 and math.isclose(float(cos(10)), 1.0, rel_tol=1e-6)
  # halfway through the cosine part: min + (1 - min) * 0.5
  assert math.isclose(float(cos(60)), 0.1 + 0.9 * 0.5, rel_tol=1e-5)
  assert math.isclose(float(cos(110)), 0.1, rel_tol=1e-5)
  wsd = make_schedule(OptimConfig(lr=2.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2,
                                  min_lr_ratio=0.0), 100)
  assert math.isclose(float(wsd(5)), 1.0, rel_tol=1e-6)
  assert float(wsd(50)) == 2.0 and float(wsd(80)) == 2.0
  assert math.isclose(float(wsd(90)), 1.0, rel_tol=1e-5)
  assert math.isclose(float(wsd(100)), 0.0, abs_tol=1e-6)


def test_cli_train_eval_generate(tmp_path, capsys):
  workdir = tmp_path / "run"
  args = ["train", "--config", TINY, "--set", f"train.workdir={workdir}", "mesh.data=1",
          "train.steps=4", "train.eval_batches=1", "train.sample_prompt=def",
          "train.sample_tokens=8"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "bits/byte" in out and "Sample:" in out
  assert (workdir / "loss.png").stat().st_size > 0
  rows = read_metrics(workdir / "metrics.jsonl")
  assert {r["split"] for r in rows} == {"train", "eval"}
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert cli.main(["eval", "--workdir", str(workdir), "--batches", "1"]) == 0
  assert "bits/byte" in capsys.readouterr().out
  assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "import ",
                   "--max-new-tokens", "5", "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("import ")


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path, capsys):
  assert cli.main(["eval", "--workdir", str(tmp_path / "nowhere")]) == 2
  err = capsys.readouterr().err
  assert "No run found at --workdir" in err and "jaxllm train" in err


def test_batch_not_divisible_by_data_axes_names_field_and_fix(tmp_path, monkeypatch):
  import jaxllm.sharding
  import jaxllm.train.loop as loop
  monkeypatch.setattr(loop, "make_mesh", jaxllm.sharding.make_mesh)  # all 8 devices
  cfg = config_lib.load(TINY, [f"train.workdir={json.dumps(str(tmp_path))}", "mesh.data=-1",
                               "train.batch_size=12"])
  with pytest.raises(ValueError, match=r"train.batch_size=12 must be divisible by the "
                                       r"data-parallel devices \(mesh data x fsdp = 8\)"):
    train(cfg)


def test_config_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown config field train.stepz"):
    config_lib.load(TINY, ["train.stepz=3"])
  with pytest.raises(ValueError, match=r"Unknown field model.width"):
    config_lib.load(TINY, ["model.width=3"]).model_config(272)
  with pytest.raises(ValueError, match=r"train.batch_size=10 is not divisible by "
                                       r"train.grad_accum=4"):
    config_lib.load(TINY, ["train.batch_size=10", "train.grad_accum=4"])
  with pytest.raises(ValueError, match=r"n_heads=5 does not divide d_model=64"):
    config_lib.load(TINY, ["model.n_heads=5"]).model_config(272)
  with pytest.raises(FileNotFoundError, match="experiments/configs"):
    config_lib.load(tmp_path / "missing.toml")
  bad = tmp_path / "bad.toml"
  bad.write_text("[train\nsteps = 3")
  with pytest.raises(ValueError, match="not valid TOML"):
    config_lib.load(bad)


def test_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{ this is not json")
  cfg = _cfg(tmp_path / "run", f"data.tokenizer={json.dumps(str(bad))}")
  with pytest.raises(ValueError, match=str(bad)):
    train(cfg)


def test_bf16_compute_keeps_float32_master_weights(tmp_path):
  """Mixed precision: bf16 matmuls, float32 parameters and optimizer state; the first loss
  (same init, same batch) agrees with the float32 run to bf16 precision."""
  steps = ["train.steps=3", "train.log_every=1"]
  f32 = train(_cfg(tmp_path / "f32", *steps))
  bf16 = train(_cfg(tmp_path / "bf16", *steps, 'model.dtype="bfloat16"'))
  assert abs(bf16["train_losses"][0] - f32["train_losses"][0]) < 0.02
  assert all(math.isfinite(x) for x in bf16["train_losses"])
  from jaxllm.train.checkpoint import Checkpointer
  from jaxllm.train.loop import Run
  run = Run.build(_cfg(tmp_path / "bf16", *steps, 'model.dtype="bfloat16"'))
  state = run.restore(Checkpointer(tmp_path / "bf16" / "checkpoints"))
  dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
            if x.ndim > 0}
  assert dtypes == {np.dtype("float32")}


def test_checkpoint_restores_onto_a_different_mesh(tmp_path, monkeypatch):
  """Saved from one device, restored sharded over fsdp x tensor: same values, new layout."""
  train(_cfg(tmp_path / "run", "train.steps=2"))
  from jaxllm.sharding import make_mesh
  from jaxllm.train.checkpoint import Checkpointer
  from jaxllm.train.loop import Run
  import jaxllm.train.loop as loop
  one = Run.build(_cfg(tmp_path / "run", "train.steps=2"))
  ref = jax.device_get(one.restore(Checkpointer(tmp_path / "run" / "checkpoints")).params)
  monkeypatch.setattr(loop, "make_mesh", make_mesh)
  eight = Run.build(_cfg(tmp_path / "run", "train.steps=2", "mesh.data=1", "mesh.fsdp=4",
                         "mesh.tensor=2"))
  state = eight.restore(Checkpointer(tmp_path / "run" / "checkpoints"))
  q = state.params["layers_0"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (q.shape[0] // 4, q.shape[1] // 2)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), ref)

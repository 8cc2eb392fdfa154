"""LLaDA through the training loop and the CLI: `train.objective = "masked_diffusion"`."""

import json
import math

import pytest

from jaxllm import cli
from jaxllm import config as config_lib
from jaxllm.train.loop import train

LLADA = ["model.preset=tiny", 'model.mask_kind="bidirectional"',
         'train.objective="masked_diffusion"', "train.eval_batches=1", "train.batch_size=8"]


def test_train_eval_generate_masked_diffusion(tmp_path, capsys):
  workdir = tmp_path / "llada"
  args = ["train", "--config", "experiments/configs/llada_tiny.toml", "--set", *LLADA,
          f"train.workdir={workdir}", "train.steps=6", "train.seq_len=32",
          "train.sample_tokens=8"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "bits/byte" in out and "Sample:" in out
  assert cli.main(["eval", "--workdir", str(workdir), "--batches", "1"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert math.isfinite(result["bpb"]) and result["bpb"] > 0
  assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "x = ",
                   "--max-new-tokens", "8", "--steps", "4", "--block-length", "4",
                   "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("x = ")


def test_masked_diffusion_needs_a_bidirectional_model(tmp_path):
  cfg = config_lib.load("experiments/configs/tiny.toml", [
      'train.objective="masked_diffusion"', f"train.workdir={json.dumps(str(tmp_path))}"])
  with pytest.raises(ValueError, match="needs a bidirectional model"):
    train(cfg)


def test_unknown_objective_names_the_choices():
  with pytest.raises(ValueError, match=r"train.objective='mtp'; use one of"):
    config_lib.load("experiments/configs/tiny.toml", ['train.objective="mtp"'])

"""experiments/varsr/run.py: the LR-use probe scores an LR-blind model the same on its own and on
another crop's LR, and a model that reads its LR differently; VARSR sizes and run names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxllm.models.var import varsr as varsr_lib
from jaxllm.models.var import vqvae as vqvae_lib
from jaxllm.train import sr

_SPEC = importlib.util.spec_from_file_location(
    "varsr_run", Path(__file__).parents[1] / "experiments" / "varsr" / "run.py")
run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run)


def _tiny_model(conditioning: str, blind: bool) -> sr.SRModel:
  vq_cfg = vqvae_lib.tiny()
  vq = vqvae_lib.VQVAE(vq_cfg)
  S = vq_cfg.image_size
  vq_params = jax.jit(vq.init)(jax.random.key(0), jnp.zeros((1, S, S, 3)))["params"]
  # AdaLN gates at 1 instead of VAR's 1e-5 and a head of std 1 instead of 4e-4: at VAR's init
  # the attention branch (the prefix's only way to the tokens) is scaled by 1e-5 and the logits
  # are near zero, so the LR moves the cross-entropy below float32 resolution
  c = sr.varsr_config_for(vq_cfg, 4, "tiny", conditioning=conditioning, init_adaln_gamma=1.0,
                          init_head=50.0)
  model = varsr_lib.VARSR(c)
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, S // 4, S // 4, 3)),
                               jnp.zeros((1,), jnp.int32),
                               jnp.zeros((1, c.seq_len - 1, c.c_vae)))["params"]
  if blind:  # the LR encoder's last conv outputs zeros: the LR cannot reach the tokens
    params = {**params, "lr_encoder": {**params["lr_encoder"], "conv_out": jax.tree.map(
        jnp.zeros_like, params["lr_encoder"]["conv_out"])}}
  return sr.SRModel(model, params, vq, vq_params, {})


@pytest.mark.parametrize("conditioning", ["prefix", "additive"])
def test_lr_use_probe_tells_blind_from_reading_models(conditioning):
  blind = run.lr_dependence(_tiny_model(conditioning, blind=True), n=8)
  assert [r["scale"] for r in blind] == list(vqvae_lib.tiny().patch_nums)
  for r in blind:
    assert r["acc_true"] == r["acc_rolled"] and r["ce_true"] == pytest.approx(r["ce_rolled"],
                                                                               abs=1e-6)
  reading = run.lr_dependence(_tiny_model(conditioning, blind=False), n=8)
  assert max(abs(r["ce_true"] - r["ce_rolled"]) for r in reading) > 1e-4


def test_size_overrides_reach_the_refiner_and_small_runs_keep_their_names():
  vq_cfg = vqvae_lib.small()
  c = sr.varsr_config_for(vq_cfg, 4, "small", d_model=64, num_heads=2)
  assert (c.d_model, c.refiner.cond_dim) == (64, 64)  # was a refiner/width mismatch error
  m = sr.varsr_config_for(vq_cfg, 4, "medium")
  assert (m.depth, m.d_model, m.refiner.cond_dim) == (6, 192, 192)
  args = run.argparse.Namespace(vq_run="runs/varsr/vq_4200", sr_steps=4800, varsr_size="small")
  assert run.transfer_dir(Path("runs/varsr"), args) == Path("runs/varsr/on_vq_4200_4800")
  args.varsr_size = "medium"
  assert run.run_tag(args) == "vq_4200_4800_medium"


def test_cfw_command_names_its_runs_and_asks_for_missing_ones(tmp_path):
  args = run.argparse.Namespace(out="runs/varsr", vq_run="runs/varsr/vq_4200", sr_steps=4800,
                                varsr_size="small", decoder_steps=3000)
  assert run.decoder_run(args) == Path("runs/varsr/decoder_vq_4200_3000")  # fidelity's run
  args.out = str(tmp_path)
  with pytest.raises(SystemExit, match="run `run.py transfer`"):
    run.cmd_cfw(args)
  (tmp_path / "on_vq_4200_4800" / "sr" / "checkpoints").mkdir(parents=True)
  with pytest.raises(SystemExit, match="run `run.py fidelity`"):
    run.cmd_cfw(args)

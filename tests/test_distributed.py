"""Two local processes under `jax.distributed.initialize` (4 CPU devices each, one 8-device
mesh, gloo collectives) train a few steps through the CLI and agree with one process."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest

from jaxllm import config as config_lib
from jaxllm.data import load_tokenizer, train_iterator
from jaxllm.models.llama import Llama
from jaxllm.sharding import make_mesh
from jaxllm.train.metrics import read_metrics
from jaxllm.train.optim import make_optimizer
from jaxllm.train.step import ShardedTrainer, lm_loss_fn

STEPS = 4
OVERRIDES = ["train.steps=4", "train.log_every=1", "train.batch_size=8", "train.seq_len=32",
             "train.eval_batches=1", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
  port = portpicker.pick_unused_port()
  workdir = tmp_path / "two"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "jaxllm.cli", "train", "--config", "experiments/configs/tiny.toml",
           "--set", *OVERRIDES, f"train.workdir={json.dumps(str(workdir))}",
           "distributed.enabled=true", f'distributed.coordinator_address="127.0.0.1:{port}"',
           "distributed.num_processes=2", f"distributed.process_id={pid}",
           "distributed.local_device_count=4"]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "8 devices in 2 process(es)" in outs[0]
  two = [r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
  assert len(two) == STEPS

  # One process, 8 devices, the same global batches: each process's shard of the data,
  # concatenated in process order (what make_array_from_process_local_data assembles).
  cfg = config_lib.load("experiments/configs/tiny.toml", OVERRIDES)
  tok = load_tokenizer(cfg.data.tokenizer)
  model = Llama(cfg.model_config(tok.vocab_size))
  trainer = ShardedTrainer(model, make_optimizer(cfg.optim, cfg.train.steps), make_mesh(cfg.mesh),
                           lm_loss_fn(model, tok.pad_id),
                           {"tokens": jax.ShapeDtypeStruct((8, 33), jnp.int32)})
  iters = [train_iterator(cfg.data, tok, 32, 4, i, 2) for i in range(2)]
  state, one = trainer.init(cfg.train.seed), []
  for _ in range(STEPS):
    batch = {"tokens": np.concatenate([next(it)["tokens"] for it in iters])}
    state, m = trainer.train_step(state, trainer.shard_batch(batch))
    one.append(float(m["loss"]))
  np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)

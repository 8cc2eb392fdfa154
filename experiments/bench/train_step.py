"""Train-step throughput of jaxllm against the machine's matmul peak and against PyTorch.

For the ~20M-parameter `bench_20m` Llama (d 512, 6 layers, 8 heads, FFN 1536, byte vocabulary,
batch 8 x 256, AdamW, float32) this prints, all measured in this one run:
  (a) jaxllm's achieved FLOP/s as a fraction of the best dense f32 matmul FLOP/s measured here;
  (b) jaxllm's tokens/s as a ratio to Hugging Face transformers' `LlamaForCausalLM` (PyTorch, CPU)
      with the same model, batch and optimizer.
Timings interleave the two frameworks round by round and report medians, because shared
machines are noisy.

    python experiments/bench/train_step.py [--rounds 5] [--steps 3] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.models import llama
from jaxllm.sharding import MeshConfig, make_mesh
from jaxllm.train.step import ShardedTrainer, lm_loss_fn

BATCH, SEQ = 8, 256
LR, B1, B2, EPS, WD = 1e-4, 0.9, 0.95, 1e-8, 0.1


def matmul_peak(n: int = 2048, reps: int = 10) -> dict[str, float]:
  """Best-of dense f32 matmul FLOP/s for JAX and for PyTorch on this machine."""
  import torch
  out = {}
  a = jnp.asarray(np.random.RandomState(0).randn(n, n).astype(np.float32))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  out["jax"] = 2 * n ** 3 / best
  ta = torch.from_numpy(np.asarray(a))
  ta @ ta
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    ta @ ta
    best = min(best, time.perf_counter() - t)
  out["torch"] = 2 * n ** 3 / best
  return out


def jax_stepper(cfg: llama.LlamaConfig, tokens: np.ndarray):
  model = llama.Llama(cfg)
  tx = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
  mesh = make_mesh(MeshConfig(), jax.devices())
  trainer = ShardedTrainer(model, tx, mesh, lm_loss_fn(model, pad_id=-1),
                           {"tokens": jax.ShapeDtypeStruct(tokens.shape, jnp.int32)})
  state = trainer.init(0)
  batch = trainer.shard_batch({"tokens": tokens})
  holder = {"state": state}

  def run(steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      holder["state"], metrics = trainer.train_step(holder["state"], batch)
    metrics["loss"].block_until_ready()
    return (time.perf_counter() - t) / steps

  run(1)  # compile
  return run, trainer


def torch_stepper(cfg: llama.LlamaConfig, tokens: np.ndarray):
  import torch
  import transformers
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      attention_bias=False, mlp_bias=False)
  model = transformers.LlamaForCausalLM(hf_cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
  ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))
  labels = torch.from_numpy(tokens[:, 1:].astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()

  def run(steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      logits = model(input_ids=ids).logits
      loss = loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    return (time.perf_counter() - t) / steps

  run(1)  # warm-up
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="steps per timed round")
  p.add_argument("--profile", default="", help="write a jax.profiler trace to this directory")
  args = p.parse_args()

  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  cfg = llama.bench_20m()
  tokens = np.random.RandomState(0).randint(0, 256, (BATCH, SEQ + 1)).astype(np.int32)
  flops_per_step = cfg.flops_per_token(SEQ) * BATCH * SEQ
  peak = matmul_peak()
  run_jax, trainer = jax_stepper(cfg, tokens)
  run_torch = torch_stepper(cfg, tokens)
  t_jax, t_torch = [], []
  for _ in range(args.rounds):
    t_jax.append(run_jax(args.steps))
    t_torch.append(run_torch(args.steps))
  tj, tt = statistics.median(t_jax), statistics.median(t_torch)
  peak_best = max(peak.values())
  print(f"model: bench_20m, {cfg.num_params() / 1e6:.1f}M params, batch {BATCH} x {SEQ}, "
        f"{flops_per_step / 1e9:.1f} GFLOP per train step (6N + attention)")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, torch threads "
        f"{torch.get_num_threads()}")
  print(f"dense f32 matmul 2048^3: jax {peak['jax'] / 1e9:.1f} GFLOP/s, torch "
        f"{peak['torch'] / 1e9:.1f} GFLOP/s")
  print(f"jaxllm  step {tj * 1e3:7.1f} ms  {BATCH * SEQ / tj:8.0f} tokens/s  "
        f"{flops_per_step / tj / 1e9:6.1f} GFLOP/s")
  print(f"PyTorch step {tt * 1e3:7.1f} ms  {BATCH * SEQ / tt:8.0f} tokens/s  "
        f"{flops_per_step / tt / 1e9:6.1f} GFLOP/s")
  print(f"(a) jaxllm achieved / best matmul FLOP/s: {flops_per_step / tj / peak_best:.2f}")
  print(f"(b) jaxllm / PyTorch tokens/s:            {tt / tj:.2f}x")
  if args.profile:
    jax.profiler.start_trace(args.profile)
    run_jax(args.steps)
    jax.profiler.stop_trace()
    print(f"profile written to {args.profile} (open with TensorBoard's profile plugin)")


if __name__ == "__main__":
  main()

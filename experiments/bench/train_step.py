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


def matmul_timers(n: int = 2048):
  """Timers of one dense f32 n x n x n matmul, in JAX and in PyTorch (2 n^3 FLOPs each)."""
  import torch
  a_np = np.random.RandomState(0).randn(n, n).astype(np.float32)
  a, ta = jnp.asarray(a_np), torch.from_numpy(a_np)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  ta @ ta

  def best(fn, reps=3):
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)

  return (lambda: best(lambda: f(a).block_until_ready()), lambda: best(lambda: ta @ ta))


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
  peak_jax, peak_torch = matmul_timers()
  run_jax, trainer = jax_stepper(cfg, tokens)
  run_torch = torch_stepper(cfg, tokens)
  rows = []  # per round: matmul peaks and both steps, so load changes hit all of them alike
  for _ in range(args.rounds):
    rows.append((peak_jax(), peak_torch(), run_jax(args.steps), run_torch(args.steps)))
  pj, pt, tj, tt = (statistics.median(col) for col in zip(*rows))
  fraction = statistics.median(flops_per_step / r[2] / max(r[0], r[1]) for r in rows)
  speedup = statistics.median(r[3] / r[2] for r in rows)
  print(f"model: bench_20m, {cfg.num_params() / 1e6:.1f}M params, batch {BATCH} x {SEQ}, "
        f"{flops_per_step / 1e9:.1f} GFLOP per train step (6N + attention)")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, torch threads "
        f"{torch.get_num_threads()}; {args.rounds} rounds of {args.steps} steps, medians")
  print(f"dense f32 matmul 2048^3: jax {pj / 1e9:.1f} GFLOP/s, torch {pt / 1e9:.1f} GFLOP/s")
  print(f"jaxllm  step {tj * 1e3:7.1f} ms  {BATCH * SEQ / tj:8.0f} tokens/s  "
        f"{flops_per_step / tj / 1e9:6.1f} GFLOP/s")
  print(f"PyTorch step {tt * 1e3:7.1f} ms  {BATCH * SEQ / tt:8.0f} tokens/s  "
        f"{flops_per_step / tt / 1e9:6.1f} GFLOP/s")
  print(f"(a) jaxllm achieved / best matmul FLOP/s (jax or torch, same round): {fraction:.2f}")
  print(f"(b) jaxllm / PyTorch tokens/s:                                        {speedup:.2f}x")
  if args.profile:
    jax.profiler.start_trace(args.profile)
    run_jax(args.steps)
    jax.profiler.stop_trace()
    print(f"profile written to {args.profile} (open with TensorBoard's profile plugin)")


if __name__ == "__main__":
  main()

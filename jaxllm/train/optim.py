"""Learning-rate schedules and the AdamW chain."""

from __future__ import annotations

import jax
import optax

from jaxllm.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """warmup_cosine: linear warmup then cosine to `min_lr_ratio * lr`.

  wsd (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): linear warmup, constant, then a linear
  decay to `min_lr_ratio * lr` over the last `decay_fraction` of the steps.
  """
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  if cfg.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)],
        [warmup])
  if cfg.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(warmup, 1), max(total_steps, max(warmup, 1) + 1),
        cfg.lr * cfg.min_lr_ratio)
  decay = max(int(round(total_steps * cfg.decay_fraction)), 1)
  stable = max(total_steps - warmup - decay, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr),
       optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, decay)],
      [warmup, warmup + stable])


def decay_mask(params):
  """Weight decay on matrices only (not norm scales)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  schedule = make_schedule(cfg, total_steps)
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=decay_mask))

"""Projection layers: Flax `nn.Dense` with logical axis names on the kernel.

Every projection in jaxllm is a plain 2-D `nn.Dense` (heads are folded into the feature axis,
head-major, exactly as in Hugging Face checkpoints), so module-level transforms that intercept
Flax's dense layers (quantization policies, LoRA) apply to library models and user models alike,
per-row / per-group quantization sees ordinary matrices, and parameter paths read like
Hugging Face's (`attn/q_proj/kernel`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def dense(features: int, logical_axes: tuple[str | None, str | None], *, name: str,
          dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
          init=DEFAULT_INIT) -> nn.Dense:
  """A bias-free Dense whose [in, out] kernel carries `logical_axes`."""
  return nn.Dense(features=features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.with_logical_partitioning(init, logical_axes), name=name)

"""Normalisation layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class RMSNorm(nn.Module):
  """Root-mean-square norm (Zhang & Sennrich, 2019), computed in float32 as Llama does.

  The result is cast back to the input dtype before the learned scale multiplies it, which is
  what Hugging Face's `LlamaRMSNorm` does, so bf16 runs match the original bit for bit in layout.
  """

  eps: float = 1e-5
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))  # explicit broadcast
    return scale * normed.astype(x.dtype)

"""Rotary position embeddings (Su et al., 2021) with Llama-3 frequency scaling.

Layout follows Hugging Face Llama ("rotate half"): the head dimension is split into two halves
that rotate together, so weights imported from HF checkpoints need no permutation.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama-3.1's piecewise frequency scaling for long context.

  Wavelengths shorter than `original_max_position / high_freq_factor` keep their frequency,
  wavelengths longer than `original_max_position / low_freq_factor` are divided by `factor`,
  and those in between are interpolated smoothly.
  """

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


def rope_frequencies(head_dim: int, theta: float,
                     scaling: Llama3RopeScaling | None = None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] in float64 numpy (constants, folded at trace time)."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; pick an even head_dim.")
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return inv_freq
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled)


def apply_rope(x_BLHD: Float[Array, "B L H D"], positions_BL: Int[Array, "B L"],
               inv_freq: np.ndarray) -> Float[Array, "B L H D"]:
  """Rotates each head's vector by angles `position * inv_freq` (angles in float32)."""
  inv_freq_11F = jnp.asarray(inv_freq, jnp.float32)[None, None, :]  # explicit broadcast
  angles_BLF = positions_BL[..., None].astype(jnp.float32) * inv_freq_11F
  cos = jnp.cos(angles_BLF)[:, :, None, :]
  sin = jnp.sin(angles_BLF)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHD.dtype)

"""Scale-aligned 2-D rotary positions (SA-RoPE, VARSR; Qu et al., 2025).

Every token of a pn x pn token map gets continuous 2-D coordinates on a common grid of side G,
top-left aligned: a token at row i, column j has (p_row, p_col) = (i G / pn, j G / pn), so the
same image location has the same coordinates at every scale. With head dimension d_h, the
frequencies are w_m = theta^(-4m / d_h), m = 0 .. d_h/4 - 1; VARSR rotates the first half of each
head by p_row w_m and the second half by p_col w_m. Here the pairs use the library's
"rotate half" layout (`jaxllm.nn.rope`): dim k pairs with dim k + d_h/2, the first d_h/4 pairs
turn with p_row and the last d_h/4 with p_col. The two layouts differ by a fixed permutation of
head dimensions, which the q/k projections absorb (importing VARSR weights would permute them).

`scale_positions` builds the coordinates for a schedule (plus optional prefix tokens, which
VARSR places on the final scale's grid); `sa_rope_angles` turns them into per-position angles
[L, d_h / 2] that `jaxllm.nn.adaln.ScaleAttention` applies to q and k after their L2 norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def scale_positions(patch_nums: Sequence[int], grid: int | None = None,
                    prefix_side: int = 0) -> np.ndarray:
  """[L, 2] (row, col) coordinates on a `grid`-sided canvas (default: the last scale's side).

  `prefix_side` > 0 prepends prefix_side^2 tokens (VARSR's LR prefix) on the same canvas.
  """
  grid = grid or patch_nums[-1]
  parts = []
  for pn in ([prefix_side] if prefix_side else []) + list(patch_nums):
    i, j = np.meshgrid(np.arange(pn), np.arange(pn), indexing="ij")
    parts.append(np.stack([i.reshape(-1), j.reshape(-1)], -1) * (grid / pn))
  return np.concatenate(parts).astype(np.float32)


def sa_rope_frequencies(head_dim: int, theta: float = 10000.0) -> np.ndarray:
  """w_m = theta^(-4m / d_h), m = 0 .. d_h/4 - 1."""
  if head_dim % 4:
    raise ValueError(f"SA-RoPE needs head_dim divisible by 4 (two axes x rotation pairs), got "
                     f"{head_dim}.")
  return theta ** (-4.0 * np.arange(head_dim // 4) / head_dim)


def sa_rope_angles(positions_L2: Float[Array, "L 2"], head_dim: int,
                   theta: float = 10000.0) -> Float[Array, "L F"]:
  """Angles [L, head_dim / 2]: d_h/4 row angles p_row w_m, then d_h/4 column angles."""
  w = jnp.asarray(sa_rope_frequencies(head_dim, theta), jnp.float32)
  pos = jnp.asarray(positions_L2, jnp.float32)
  return jnp.concatenate([pos[:, :1] * w[None, :], pos[:, 1:] * w[None, :]], axis=-1)


def apply_sa_rope(x_BLNH: Float[Array, "B L N H"], positions_L2: Float[Array, "L 2"],
                  theta: float = 10000.0) -> Float[Array, "B L N H"]:
  """Rotates each head of x by its token's 2-D position."""
  from jaxllm.nn.adaln import rotate_half  # the one rotation used by the attention
  angles = sa_rope_angles(positions_L2, x_BLNH.shape[-1], theta)
  return rotate_half(x_BLNH, jnp.broadcast_to(angles[None], (x_BLNH.shape[0],) + angles.shape))

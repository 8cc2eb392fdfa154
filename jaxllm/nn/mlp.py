"""Feed-forward blocks."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxllm.nn.linear import dense


class SwiGLU(nn.Module):
  """SwiGLU feed-forward (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

  hidden_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
    B, L, D = x_BLD.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Tokens flattened to one axis: every projection is then a plain 2-D matmul, and its weight
    # gradient contracts a single axis (XLA:CPU runs the 3-D contraction ~1.5x slower).
    x_TD = x_BLD.reshape(B * L, D)
    gate_TF = dense(self.hidden_dim, ("embed", "mlp"), name="gate_proj", **kw)(x_TD)
    up_TF = dense(self.hidden_dim, ("embed", "mlp"), name="up_proj", **kw)(x_TD)
    h_TF = nn.with_logical_constraint(nn.silu(gate_TF) * up_TF, ("batch", "act_mlp"))
    return dense(D, ("mlp", "embed"), name="down_proj", **kw)(h_TF).reshape(B, L, D)

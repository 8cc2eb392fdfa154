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
    d_model = x_BLD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate_BLF = dense(self.hidden_dim, ("embed", "mlp"), name="gate_proj", **kw)(x_BLD)
    up_BLF = dense(self.hidden_dim, ("embed", "mlp"), name="up_proj", **kw)(x_BLD)
    h_BLF = nn.with_logical_constraint(nn.silu(gate_BLF) * up_BLF, ("batch", "length", "act_mlp"))
    return dense(d_model, ("mlp", "embed"), name="down_proj", **kw)(h_BLF)

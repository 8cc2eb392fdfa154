"""Next-token prediction (the autoregressive LM objective)."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int


def split_tokens(tokens_BT: Int[Array, "B T"]) -> tuple[Int[Array, "B L"], Int[Array, "B L"]]:
  """Packed sequences of L + 1 tokens -> (inputs, targets), each [B, L]."""
  return tokens_BT[:, :-1], tokens_BT[:, 1:]


def next_token_nll(logits_BLV: Float[Array, "B L V"], targets_BL: Int[Array, "B L"],
                   pad_id: int) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """Summed negative log-likelihood (nats, float32) over non-pad targets, and their count."""
  nll_BL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BLV.astype(jnp.float32), targets_BL)
  mask_BL = (targets_BL != pad_id).astype(jnp.float32)
  return jnp.sum(nll_BL * mask_BL), jnp.sum(mask_BL)

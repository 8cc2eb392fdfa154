"""Matryoshka Quantization (MatQuant): one int8 model whose int4 / int2 / any-width slices work.

Every quantized weight is a parent c-bit (c = 8) asymmetric min-max code `q`; the r-bit model uses
`S(q, r) = clamp(round(q / 2^(c-r)), 0, 2^r - 1) * 2^(c-r)` dequantized with the parent's scale and
zero point (`quantizers.matquant_codes`, straight-through gradient). Training optimizes
`sum_r lambda_r * L(F(x; S(Q(theta, c), r)))` on one batch (`joint_loss_fn`). A width, or a
per-layer mix of widths (Mix'n'Match), is a `Policy` of `matquant(r)` rules (`width_policy`); int3
and int6 slices come out of the same parameters. `ptq.quantize_params` packs any of them.

References:
  Nair et al., "Matryoshka Quantization", 2025 (arXiv 2502.06786).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax

from jaxllm.objectives.next_token import next_token_nll, split_tokens
from jaxllm.quant import policy as pol

DEFAULT_PATTERN = r"(.*/)?(attn|mlp)/.*"


def width_policy(bits: int | Mapping[str, int], pattern: str = DEFAULT_PATTERN,
                 group_size: int | None = None) -> pol.Policy:
  """All layers matching `pattern` at `bits`, or `{pattern: bits}` in order (Mix'n'Match)."""
  if isinstance(bits, Mapping):
    return pol.Policy(tuple(pol.Rule(p, pol.matquant(b, group_size)) for p, b in bits.items()))
  return pol.Policy((pol.Rule(pattern, pol.matquant(bits, group_size)),))


def joint_loss_fn(model: nn.Module, pad_id: int, weights: Mapping[int, float] | None = None,
                  pattern: str = DEFAULT_PATTERN, group_size: int | None = None):
  """`loss_fn(params, batch, rng) -> (sum_r lambda_r * loss_sum_r, weight)` over the widths in
  `weights` (default {8: 1, 4: 1, 2: 1}), all on the same batch and the same parameters."""
  weights = dict(weights or {8: 1.0, 4: 1.0, 2: 1.0})
  models = {r: width_policy(r, pattern, group_size).apply(model) for r in weights}

  def loss_fn(params, batch, rng):
    del rng
    inputs_BL, targets_BL = split_tokens(batch["tokens"])
    total, weight = 0.0, None
    for r, lam in weights.items():
      logits_BLV, _ = models[r].apply({"params": params}, inputs_BL)
      s, weight = next_token_nll(logits_BLV, targets_BL, pad_id)
      total = total + lam * s
    return total, weight

  return loss_fn


def per_width_losses(model: nn.Module, params, tokens, pad_id: int,
                     widths: Sequence[int] = (8, 6, 4, 3, 2),
                     pattern: str = DEFAULT_PATTERN) -> dict[int, jax.Array]:
  """Mean next-token loss of each slice width (int3 / int6 included) of one set of params."""
  inputs_BL, targets_BL = split_tokens(tokens)
  out = {}
  for r in widths:
    logits, _ = width_policy(r, pattern).apply(model).apply({"params": params}, inputs_BL)
    s, w = next_token_nll(logits, targets_BL, pad_id)
    out[r] = s / w
  return out

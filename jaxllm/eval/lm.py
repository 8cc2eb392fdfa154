"""Language-model evaluation: held-out loss, bits per byte, and a unigram baseline."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxllm.objectives.next_token import next_token_nll, split_tokens


def make_eval_fn(model, pad_id: int, token_bytes: np.ndarray):
  """(params, batch) -> (nll_sum nats, target tokens, target bytes)."""
  token_bytes = jnp.asarray(token_bytes, jnp.float32)

  def eval_fn(params, batch):
    inputs_BL, targets_BL = split_tokens(batch["tokens"])
    logits_BLV, _ = model.apply({"params": params}, inputs_BL)
    nll, count = next_token_nll(logits_BLV, targets_BL, pad_id)
    n_bytes = jnp.sum(jnp.where(targets_BL != pad_id, token_bytes[targets_BL], 0.0))
    return nll, count, n_bytes

  return eval_fn


def summarize(nll: float, tokens: float, n_bytes: float) -> dict[str, float]:
  return {"loss": nll / max(tokens, 1.0), "bpb": nll / max(n_bytes, 1.0) / math.log(2),
          "tokens": tokens, "bytes": n_bytes}


def unigram_log_probs(counts: np.ndarray) -> np.ndarray:
  """Add-one smoothed unigram log-probabilities (nats) from train-split token counts."""
  counts = counts.astype(np.float64) + 1.0
  return np.log(counts / counts.sum())


def unigram_bpb(log_probs: np.ndarray, batches: Iterable[dict[str, Any]], pad_id: int,
                token_bytes: np.ndarray) -> float:
  """Bits per byte of the unigram model on the same targets the LM is scored on."""
  nll = n_bytes = 0.0
  for batch in batches:
    targets = np.asarray(batch["tokens"])[:, 1:]
    keep = targets != pad_id
    nll -= float(log_probs[targets[keep]].sum())
    n_bytes += float(token_bytes[targets[keep]].sum())
  return nll / max(n_bytes, 1.0) / math.log(2)

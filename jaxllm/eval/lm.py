"""Language-model evaluation: held-out loss, bits per byte, and a unigram baseline."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.objectives.next_token import next_token_nll, split_tokens


def make_eval_fn(model, pad_id: int, token_bytes: np.ndarray):
  """(params, batch) -> (nll_sum nats, target tokens, target bytes).

  `params` is the parameter tree, or a whole variables dict {"params": ..., <collections>} for
  models with state besides their parameters (a DeepSeek model's router bias lives in its
  `balance` collection and must be scored with it)."""
  token_bytes = jnp.asarray(token_bytes, jnp.float32)

  def eval_fn(params, batch):
    inputs_BL, targets_BL = split_tokens(batch["tokens"])
    logits_BLV, _ = model.apply(as_variables(params), inputs_BL)
    nll, count = next_token_nll(logits_BLV, targets_BL, pad_id)
    n_bytes = jnp.sum(jnp.where(targets_BL != pad_id, token_bytes[targets_BL], 0.0))
    return nll, count, n_bytes

  return eval_fn


def as_variables(params_or_variables) -> dict[str, Any]:
  """{"params": tree} for a parameter tree; a variables dict (it has a "params" entry: a model's
  parameter tree never has a top-level module named "params") is returned as it is."""
  if isinstance(params_or_variables, Mapping) and "params" in params_or_variables:
    return dict(params_or_variables)
  return {"params": params_or_variables}


def make_masked_diffusion_eval_fn(model, mask_id: int, pad_id: int, token_bytes: np.ndarray,
                                  mc_num: int = 8, seed: int = 0):
  """(params, batch) -> (NLL upper bound in nats, tokens, bytes) for a masked-diffusion LM.

  Each row `tokens[:, :-1]` is scored as a whole sequence with LLaDA's Monte Carlo bound
  (`jaxllm.eval.likelihood.sequence_nll_bound`, stratified mask counts, `mc_num` draws, a fixed
  key so that evaluations of different checkpoints share their masks).
  """
  from jaxllm.eval.likelihood import sequence_nll_bound
  token_bytes = jnp.asarray(token_bytes, jnp.float32)

  def eval_fn(params, batch):
    tokens_BL = batch["tokens"][:, :-1]
    nll_B = sequence_nll_bound(model, params, tokens_BL, jax.random.key(seed), mask_id=mask_id,
                               mc_num=mc_num, pad_id=pad_id)
    real_BL = tokens_BL != pad_id
    n_bytes = jnp.sum(jnp.where(real_BL, token_bytes[tokens_BL], 0.0))
    return jnp.sum(nll_B), jnp.sum(real_BL).astype(jnp.float32), n_bytes

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

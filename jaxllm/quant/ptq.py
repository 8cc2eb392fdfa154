"""Post-training quantization and packed export of a parameter tree, with a size report.

`quantize_params(params, policy)` walks the tree; every `kernel` of a module whose path a rule
with a weight spec decides is encoded (rotated first if the rule rotates; ParetoQ uses the
trained `quant_alpha` when present, else the authors' init) and replaced by a `PackedWeight`.
ParetoQ scales and QAT gates are dropped. Run the result with
`policy.apply(model).apply({"params": packed}, ...)` (or under `policy.packed_intercept()` when
no rule quantizes activations).

A mixed policy is just ordered rules, e.g. Unsloth-style "attention and the first layer at 4
bits, other MLPs ternary" (see `mixed_precision_policy`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.quant import packing
from jaxllm.quant import policy as pol
from jaxllm.quant.hadamard import hadamard_transform


@dataclasses.dataclass
class LayerSize:
  path: str
  fmt: str  # packing format, or "float32" etc. for unquantized tensors
  num_weights: int
  nbytes: int

  @property
  def bits_per_weight(self) -> float:
    return 8 * self.nbytes / self.num_weights


@dataclasses.dataclass
class SizeReport:
  layers: list[LayerSize]

  def _sum(self, quantized: bool | None):
    sel = [l for l in self.layers if quantized is None or (l.fmt in packing.FORMATS) == quantized]
    return sum(l.num_weights for l in sel), sum(l.nbytes for l in sel)

  @property
  def total_bytes(self) -> int:
    return self._sum(None)[1]

  @property
  def quantized_bits_per_weight(self) -> float:
    n, b = self._sum(True)
    return 8 * b / max(n, 1)

  @property
  def bits_per_weight(self) -> float:
    n, b = self._sum(None)
    return 8 * b / n

  def table(self) -> str:
    rows = ["| tensor | format | weights | bytes | bits/weight |", "|---|---|---|---|---|"]
    rows += [f"| {l.path} | {l.fmt} | {l.num_weights} | {l.nbytes} | {l.bits_per_weight:.3f} |"
             for l in self.layers]
    nq, bq = self._sum(True)
    n, b = self._sum(None)
    rows.append(f"| quantized tensors | | {nq} | {bq} | {8 * bq / max(nq, 1):.3f} |")
    rows.append(f"| whole model | | {n} | {b} | {8 * b / n:.3f} |")
    return "\n".join(rows)


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def quantize_params(params: Mapping[str, Any], policy: pol.Policy, *,
                    scale_dtype=jnp.float32) -> tuple[dict[str, Any], SizeReport]:
  """Packed copy of `params` (nested dicts, unboxed) under `policy` (encoded in one jitted
  computation), and its size report."""
  packed = jax.jit(lambda p: _quantize_tree(p, policy, scale_dtype))(params)
  return packed, size_report(packed)


def size_report(tree: Mapping[str, Any]) -> SizeReport:
  """Bytes and bits per weight of every tensor (packed or not) of a params tree."""
  layers = []
  for keys, leaf in _paths(tree):
    path = "/".join(keys)
    if isinstance(leaf, packing.PackedWeight):
      layers.append(LayerSize(path, leaf.fmt, leaf.num_weights, leaf.nbytes))
    else:
      layers.append(LayerSize(path, str(leaf.dtype), int(leaf.size),
                              int(leaf.size * leaf.dtype.itemsize)))
  return SizeReport(layers)


def _quantize_tree(params, policy: pol.Policy, scale_dtype) -> dict[str, Any]:
  out: dict[str, Any] = {}
  matched, module_paths = set(), []
  for keys, leaf in _paths(params):
    *mod, name = keys
    path = "/".join(mod)
    node = out
    for k in mod:
      node = node.setdefault(k, {})
    if name in (pol.QUANT_SCALE, pol.QAT_GATE):
      continue
    found = None
    if name == "kernel" and jnp.ndim(leaf) == 2:
      module_paths.append(path)
      found = policy.match(path)
    if found is not None:
      matched.add(found[0])
    if found is None or found[1].weight is None:
      node[name] = leaf
      continue
    idx, rule = found
    k, o = leaf.shape
    block = pol.hadamard_block_of(rule)
    pol.check_dims(rule.weight, k, f"{policy.describe(idx)} at module {path!r}", block)
    w_OK = jnp.asarray(leaf, jnp.float32).T
    if block:
      w_OK = hadamard_transform(w_OK, block, policy.kernels)
    alpha = None
    if rule.weight.method == "paretoq":
      alpha = _get(params, mod).get(pol.QUANT_SCALE)
      alpha = pol.init_alpha(w_OK, rule.weight) if alpha is None else jnp.asarray(alpha)
    codes = pol.weight_codes(w_OK, rule.weight, alpha)
    node[name] = packing.pack(codes, (k, o), packing.format_for(rule.weight.bits),
                              hadamard_block=block, act=rule.act, scale_dtype=scale_dtype)
  for i in range(len(policy.rules)):
    if i not in matched:
      raise ValueError(f"{policy.describe(i)} matched no 2-D kernel of the checkpoint (its "
                       f"kernels' modules are {module_paths[:6]}...). Fix the pattern "
                       "(re.fullmatch on '/'-joined module paths) or remove the rule.")
  return out


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def mixed_precision_policy(n_layers: int, *, high: pol.QuantSpec, low: pol.QuantSpec,
                           high_first_layers: int = 1, high_attention: bool = True,
                           high_down_proj: bool = False) -> pol.Policy:
  """Unsloth-"dynamic"-style mixed precision for jaxllm's Llama paths: the first
  `high_first_layers` blocks and (optionally) all attention and MLP down projections at `high`,
  every other projection at `low`. lm_head and embeddings stay in full precision."""
  rules = []
  if high_first_layers:
    first = "|".join(str(i) for i in range(min(high_first_layers, n_layers)))
    rules.append(pol.Rule(rf"layers_({first})/.*", high))
  if high_attention:
    rules.append(pol.Rule(r"layers_\d+/attn/.*", high))
  if high_down_proj:
    rules.append(pol.Rule(r"layers_\d+/mlp/down_proj", high))
  rules.append(pol.Rule(r"layers_\d+/.*", low))
  if n_layers <= high_first_layers:
    rules = rules[:1]
  return pol.Policy(tuple(rules))


def weight_paths(params) -> list[str]:
  return ["/".join(k[:-1]) for k, v in _paths(params) if k[-1] == "kernel"]


def matches(pattern: str, params) -> list[str]:
  return [p for p in weight_paths(params) if re.fullmatch(pattern, p)]

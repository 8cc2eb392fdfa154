"""Quantization from a run config: spec strings, the policy, and the QAT optimizer chain.

A `[quant]` section of a run config (see `jaxllm.config.QuantConfig`) lists rules; each rule's
`weight` and `act` is either a spec string or a table of `QuantSpec` fields:

    [quant]
    rules = [
      { pattern = 'layers_\\d+/(attn|mlp)/.*', weight = "paretoq:2" },
    ]
    qat_fraction = 0.1       # ParetoQ: full precision first, QAT for the last 10% of the steps

Spec strings are `method[:bits][:key=value ...]`:

| string | spec |
|---|---|
| `paretoq:2`, `paretoq:1.58:group=64` | `paretoq(bits, group_size)` |
| `quest:4`, `quest:4:block=64`, `quest:2:block=none:trust=none` | `quest(bits, hadamard_block, trust_scale)` |
| `bitnet` / `bitnet_act` | absmean ternary weights / int8 abs-max activations |
| `matquant:4` | the int4 slice of an int8 min-max parent |
| `minmax:2`, `absmax:8:per_tensor=true` | round-to-nearest baselines |

`1.58` and `ternary` both mean ternary. Keys: `group`, `block`, `trust`, `per_tensor`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import optax

from jaxllm.quant import policy as pol
from jaxllm.quant import quantizers as q
from jaxllm.quant import transforms

_KEYS = {"group": "group_size", "block": "hadamard_block", "trust": "trust_scale",
         "per_tensor": "per_tensor"}
_NO_BITS = {"bitnet": pol.bitnet, "bitnet_act": pol.bitnet_act}


def _value(text: str, where: str) -> Any:
  low = text.strip().lower()
  if low in ("none", "off"):
    return None
  if low in ("true", "false"):
    return low == "true"
  try:
    return int(low)
  except ValueError:
    pass
  try:
    return float(low)
  except ValueError:
    raise ValueError(f"{where}: cannot read the value {text!r}; use a number, true/false or "
                     "none.") from None


def _bits(text: str, where: str) -> float:
  if text.strip().lower() in ("ternary", "1.58"):
    return q.TERNARY
  bits = _value(text, where)
  if not isinstance(bits, (int, float)) or isinstance(bits, bool):
    raise ValueError(f"{where}: bits {text!r} must be a number such as 2, 4 or 1.58.")
  return float(bits) if bits != int(bits) else int(bits)


def parse_spec(spec: str | Mapping[str, Any] | None, where: str = "spec") -> pol.QuantSpec | None:
  """A `QuantSpec` from a spec string (see the module docstring) or a table of its fields."""
  if spec is None or isinstance(spec, pol.QuantSpec):
    return spec
  if isinstance(spec, Mapping):
    fields = {f.name for f in dataclasses.fields(pol.QuantSpec)}
    unknown = sorted(set(spec) - fields)
    if unknown or "method" not in spec or "bits" not in spec:
      raise ValueError(f"{where}: a spec table needs 'method' and 'bits' and may hold "
                       f"{sorted(fields)}; got {sorted(spec)}.")
    values = dict(spec)
    values["bits"] = _bits(str(values["bits"]), where)
    return pol.QuantSpec(**values)
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"{where}: expected a spec string such as 'paretoq:2' or a table, got "
                     f"{spec!r}.")
  method, *rest = [p.strip() for p in spec.split(":")]
  if method in _NO_BITS:
    if rest:
      raise ValueError(f"{where}: {method!r} takes no bits or options (got {spec!r}).")
    return _NO_BITS[method]()
  makers = {"paretoq": pol.paretoq, "quest": pol.quest, "matquant": pol.matquant,
            "minmax": pol.minmax, "absmax": pol.absmax}
  if method not in makers:
    raise ValueError(f"{where}: unknown method {method!r} in {spec!r}; use one of "
                     f"{sorted([*makers, *_NO_BITS])}.")
  if not rest or "=" in rest[0]:
    raise ValueError(f"{where}: {spec!r} names no bit width; write e.g. '{method}:2'.")
  kwargs = {}
  for opt in rest[1:]:
    key, eq, raw = opt.partition("=")
    if not eq or key not in _KEYS:
      raise ValueError(f"{where}: option {opt!r} in {spec!r} must be key=value with key one of "
                       f"{sorted(_KEYS)}.")
    kwargs[_KEYS[key]] = _value(raw, where)
  try:
    return makers[method](_bits(rest[0], where), **kwargs)
  except TypeError:
    raise ValueError(f"{where}: {method} does not take the options {sorted(kwargs)} "
                     f"(in {spec!r}).") from None


def policy_from_config(cfg, qat_gate: bool | None = None) -> pol.Policy | None:
  """The `Policy` of a `QuantConfig` (None when it has no rules). Errors name the rule."""
  if not cfg.rules:
    return None
  rules = []
  for i, r in enumerate(cfg.rules):
    where = f"quant.rules[{i}]"
    if not isinstance(r, Mapping) or "pattern" not in r or not set(r) <= {"pattern", "weight",
                                                                           "act"}:
      raise ValueError(f"{where}: each rule is a table with 'pattern' and optional 'weight' and "
                       f"'act' (e.g. {{ pattern = 'layers_\\d+/mlp/.*', weight = 'paretoq:2' }});"
                       f" got {r!r}.")
    rules.append(pol.Rule(r["pattern"], parse_spec(r.get("weight"), f"{where}.weight"),
                          parse_spec(r.get("act"), f"{where}.act")))
  gate = cfg.qat_fraction < 1.0 if qat_gate is None else qat_gate
  kw = {} if cfg.exclude is None else {"exclude": tuple(cfg.exclude)}
  return pol.Policy(tuple(rules), qat_gate=gate, kernels=cfg.kernels, **kw)


def qat_optimizer(optim_cfg, quant_cfg, policy: pol.Policy,
                  total_steps: int) -> optax.GradientTransformation:
  """Clipping, then AdamW on weights and Adam (no weight decay) on ParetoQ scales at
  `scale_lr_ratio` times the learning rate; QuEST trust masking of the updates if asked; and
  ParetoQ's FP -> QAT switch when `qat_fraction < 1` (the schedule restarts, with its warmup, at
  the switch, as the authors start QAT from a trained model with a schedule of its own)."""
  from jaxllm.train.optim import decay_mask, make_schedule  # jaxllm.train imports the config
  if quant_cfg.qat_fraction < 1.0:
    fp_steps = round((1.0 - quant_cfg.qat_fraction) * total_steps)
    schedule = optax.join_schedules(
        [make_schedule(optim_cfg, fp_steps), make_schedule(optim_cfg, total_steps - fp_steps)],
        [fp_steps])
  else:
    schedule = make_schedule(optim_cfg, total_steps)
  adam = dict(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  weights = optax.adamw(schedule, weight_decay=optim_cfg.weight_decay, mask=decay_mask, **adam)
  scales = optax.adam(lambda s: quant_cfg.scale_lr_ratio * schedule(s), **adam)
  inner = transforms.with_scale_optimizer(weights, scales)
  if quant_cfg.trust_mask_updates:
    inner = transforms.trust_masked(inner, policy)
  parts = [optax.clip_by_global_norm(optim_cfg.clip_norm), inner]
  if quant_cfg.qat_fraction < 1.0:
    parts.append(transforms.qat_switch(total_steps, policy, quant_cfg.qat_fraction))
  return optax.chain(*parts)

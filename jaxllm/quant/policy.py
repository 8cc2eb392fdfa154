"""Quantization policies: regex rules over module paths, applied to unchanged Linen models.

A `Policy` is an ordered tuple of `Rule(pattern, weight=QuantSpec | None, act=QuantSpec | None)`.
Each `nn.Dense` is identified by its module path joined with "/" (`layers_0/attn/q_proj`); the
FIRST rule whose pattern `re.fullmatch`es the path decides how it is quantized (a rule with neither
spec keeps the layer in full precision). Paths matching `Policy.exclude` (by default `lm_head` and
embeddings, as in the papers) are never quantized.

How it hooks in: `flax.linen.intercept_methods` intercepts `nn.Dense.__call__` while the model runs
and computes a fake-quant matmul instead; the model's code is untouched. `policy.apply(model)`
returns a `QuantizedModel` with the same `init`/`apply` (so `lm_loss_fn`, `ShardedTrainer` and
checkpointing work unchanged); `policy.intercept()` is the bare context manager for composing by
hand.

Where learned state lives: ParetoQ's learned scales are ordinary parameters named `quant_alpha`
(shape `[K // group, out]`, logical axes `(None, <kernel's out axis>)`) created next to the kernel
they scale (`params/layers_0/attn/q_proj/quant_alpha`), initialised from the kernel as the authors
do. Keeping them in `params` means one gradient, one optimizer state and one checkpoint;
`jaxllm.quant.transforms.quant_labels` tells them apart for their own learning rate and no weight
decay. With `Policy(qat_gate=True)` each quantized layer also gets a scalar `qat_gate` parameter
(0 = full precision, 1 = quantized) that `transforms.qat_switch` flips at the switch step.

Packed inference: a Dense whose `kernel` is a `jaxllm.quant.packing.PackedWeight` runs with the
activation quantizer recorded in it; no policy is needed.

Kernels: `Policy.kernels` (and `packed_intercept(kernels=...)`) chooses, explicitly, how the
Hadamard rotations and packed matmuls run: "xla" (default; any backend: the fast Walsh–Hadamard
transform's XLA path, and dequantize + dot), "pallas" (the TPU kernels of `pallas_kernels`: the
packed weight is never dequantized in HBM; symmetric per-token activation quantizers feed the
int8 x low-bit kernel with int32 accumulation), "pallas_gpu" (the same on NVIDIA GPUs: the
Triton variants), or "pallas_interpret" / "pallas_gpu_interpret" (those kernels in interpret mode
on CPU). A combination without a kernel (3-bit codes; on GPU, Hadamard blocks above 16384) raises
an error naming what to set instead rather than falling back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.quant import quantizers as q
from jaxllm.quant.hadamard import hadamard_transform
from pallas_kernels.hadamard import check_impl

QUANT_SCALE = "quant_alpha"
QAT_GATE = "qat_gate"
DEFAULT_EXCLUDE = (r"(.*/)?lm_head", r"(.*/)?embed[^/]*")

_BITS = {
    "paretoq": (1, q.TERNARY, 2, 3, 4),
    "quest": (1, q.TERNARY, 2, 3, 4, 5, 6, 7, 8),
    "bitnet": (q.TERNARY,),
    "absmax": (2, 3, 4, 5, 6, 7, 8),
    "minmax": (2, 3, 4, 5, 6, 7, 8),
    "matquant": (1, 2, 3, 4, 5, 6, 7, 8),
}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one operand (weights or activations) of a matmul is quantized.

  method: "paretoq" (weights only, learned scales), "quest", "bitnet" (weights only),
    "absmax", "minmax", "matquant" (the `bits` slice of an int8 min-max parent code).
  bits: 1, 1.58 (ternary), 2, ..., 8 (see `_BITS` for what each method supports).
  group_size: scales per group of this many contraction-axis elements; None = one per row
    (per output channel for weights, per token for activations).
  per_tensor: one scale for the whole tensor (BitNet's absmean); excludes `group_size`.
  hadamard_block: QuEST's blockwise Hadamard rotation of the contraction axis (None = off).
  trust_scale: QuEST's trust-mask width in half grid steps; None = plain straight-through.
  """

  method: str
  bits: float
  group_size: int | None = None
  per_tensor: bool = False
  hadamard_block: int | None = None
  trust_scale: float | None = 1.0

  def problems(self, role: str) -> list[str]:
    out = []
    if self.method not in _BITS:
      return [f"unknown method {self.method!r}; use one of {sorted(_BITS)}"]
    if self.bits not in _BITS[self.method]:
      out.append(f"{self.method} does not support bits={self.bits}; use one of "
                 f"{list(_BITS[self.method])} (1.58 means ternary)")
    if role == "act" and self.method in ("paretoq", "bitnet"):
      out.append(f"{self.method} quantizes weights only; for activations use "
                 "quest(bits) or absmax(8) (BitNet's int8 per-token activations: bitnet_act())")
    if self.group_size is not None and (self.group_size <= 0 or self.per_tensor):
      out.append(f"group_size={self.group_size} must be positive and not combined with "
                 "per_tensor")
    if self.per_tensor and self.method in ("paretoq", "quest"):
      out.append(f"{self.method} scales are per row or per group; drop per_tensor=True")
    if self.hadamard_block is not None and self.method != "quest":
      out.append("hadamard_block belongs to method='quest'")
    if self.hadamard_block is not None and (self.hadamard_block < 1 or
                                            self.hadamard_block & (self.hadamard_block - 1)):
      out.append(f"hadamard_block={self.hadamard_block} must be a power of two")
    return out


def paretoq(bits: float, group_size: int | None = None) -> QuantSpec:
  """ParetoQ weights: binary, ternary/2-bit SEQ, 3/4-bit LSQ with learned per-row scales."""
  return QuantSpec("paretoq", bits, group_size)


def quest(bits: float, hadamard_block: int | None = 128, trust_scale: float | None = 1.0,
          group_size: int | None = None) -> QuantSpec:
  """QuEST (weights or activations): Hadamard + RMS-scaled Gaussian-optimal grid + trust mask."""
  return QuantSpec("quest", bits, group_size, hadamard_block=hadamard_block,
                   trust_scale=trust_scale)


def bitnet() -> QuantSpec:
  """BitNet b1.58 weights: absmean ternary, one scale per tensor."""
  return QuantSpec("bitnet", q.TERNARY, per_tensor=True)


def bitnet_act() -> QuantSpec:
  """BitNet b1.58 activations: int8 abs-max per token."""
  return QuantSpec("absmax", 8)


def matquant(bits: int, group_size: int | None = None) -> QuantSpec:
  """MatQuant: the `bits`-wide slice (int8 -> int4 -> int2, or any width) of an int8 parent."""
  return QuantSpec("matquant", bits, group_size)


def absmax(bits: float, group_size: int | None = None, per_tensor: bool = False) -> QuantSpec:
  return QuantSpec("absmax", bits, group_size, per_tensor)


def minmax(bits: float, group_size: int | None = None, per_tensor: bool = False) -> QuantSpec:
  return QuantSpec("minmax", bits, group_size, per_tensor)


@dataclasses.dataclass(frozen=True)
class Rule:
  """`pattern` is `re.fullmatch`ed against module paths such as `layers_0/mlp/down_proj`."""

  pattern: str
  weight: QuantSpec | None = None
  act: QuantSpec | None = None


@dataclasses.dataclass(frozen=True)
class Policy:
  rules: tuple[Rule, ...]
  exclude: tuple[str, ...] = DEFAULT_EXCLUDE
  qat_gate: bool = False  # add a `qat_gate` scalar per quantized layer (see transforms.qat_switch)
  kernels: str = "xla"  # "xla" | "pallas" | "pallas_gpu" | "..._interpret" (module docstring)

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    check_impl(self.kernels)
    for i, r in enumerate(self.rules):
      try:
        re.compile(r.pattern)
      except re.error as e:
        raise ValueError(f"{self.describe(i)}: invalid regular expression ({e}).") from None
      for role, spec in (("weight", r.weight), ("act", r.act)):
        if spec is not None and (errs := spec.problems(role)):
          raise ValueError(f"{self.describe(i)}, {role} spec {spec}: " + "; ".join(errs) + ".")
      blocks = {s.hadamard_block for s in (r.weight, r.act) if s is not None and s.hadamard_block}
      if len(blocks) > 1:
        raise ValueError(f"{self.describe(i)}: weight and activation Hadamard blocks differ "
                         f"({sorted(blocks)}); both operands must use the same rotation.")

  def describe(self, i: int) -> str:
    return f"Quantization rule {i} (pattern {self.rules[i].pattern!r})"

  def match(self, path: str) -> tuple[int, Rule] | None:
    """(index, rule) deciding `path`, or None when no rule matches or the path is excluded."""
    if any(re.fullmatch(p, path) for p in self.exclude):
      return None
    for i, r in enumerate(self.rules):
      if re.fullmatch(r.pattern, path):
        return i, r
    return None

  def apply(self, model: nn.Module) -> QuantizedModel:
    return QuantizedModel(model, self)

  @contextlib.contextmanager
  def intercept(self):
    """Context in which every `nn.Dense` call follows this policy (no unused-rule check)."""
    with nn.intercept_methods(_Interceptor(self)):
      yield


def uniform(weight: QuantSpec | None, act: QuantSpec | None = None, pattern: str = ".*",
            **kw) -> Policy:
  """One rule for every Dense (minus the default exclusions)."""
  return Policy((Rule(pattern, weight, act),), **kw)


class QuantizedModel:
  """A Linen model run under a policy. `init` and `apply` are the model's, intercepted; `init`
  also checks that every rule matched at least one `nn.Dense` (else ValueError). Other attributes
  are the wrapped model's."""

  def __init__(self, model: nn.Module, policy: Policy):
    self.model, self.policy = model, policy

  def __getattr__(self, name):
    return getattr(self.model, name)

  def init(self, *args, **kwargs):
    icpt = _Interceptor(self.policy)
    with nn.intercept_methods(icpt):
      out = self.model.init(*args, **kwargs)
    icpt.check_all_rules_matched()
    return out

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(_Interceptor(self.policy)):
      return self.model.apply(*args, **kwargs)


def packed_intercept(kernels: str = "xla"):
  """Context for running a model whose Dense kernels were replaced by `PackedWeight`s, with the
  packed matmuls and rotations on `kernels` ("xla", "pallas", "pallas_gpu", or either
  kernel's "_interpret" form)."""
  check_impl(kernels)
  return nn.intercept_methods(_Interceptor(None, kernels))


# --------------------------------------------------------------------------------- interception
class _Interceptor:

  def __init__(self, policy: Policy | None, kernels: str = "xla"):
    self.policy = policy
    self.kernels = policy.kernels if policy is not None else kernels
    self.matched: set[int] = set()
    self.dense_paths: list[str] = []
    self.excluded: list[str] = []

  def check_all_rules_matched(self):
    for i, r in enumerate(self.policy.rules):
      if i in self.matched:
        continue
      shadow = [p for p in self.dense_paths if re.fullmatch(r.pattern, p)]
      why = (f"its matches {shadow[:4]} are taken by an earlier rule or by "
             f"Policy.exclude={self.policy.exclude}" if shadow else
             f"the model's nn.Dense paths are {self.dense_paths[:6]}"
             f"{' ...' if len(self.dense_paths) > 6 else ''}")
      raise ValueError(f"{self.policy.describe(i)} matched no nn.Dense module: {why}. Fix the "
                       "pattern (it is re.fullmatch-ed against '/'-joined module paths, e.g. "
                       "'layers_\\d+/attn/.*_proj') or remove the rule.")

  def __call__(self, next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__" or not isinstance(mod, nn.Dense):
      return next_fun(*args, **kwargs)
    path = "/".join(mod.path)
    if path not in self.dense_paths:
      self.dense_paths.append(path)
    kernel = mod.get_variable("params", "kernel") if mod.has_variable("params", "kernel") else None
    from jaxllm.quant.packing import PackedWeight
    if isinstance(kernel, PackedWeight):
      return _packed_dense(mod, args[0], kernel, self.kernels)
    found = None if self.policy is None else self.policy.match(path)
    if found is None:
      return next_fun(*args, **kwargs)
    idx, rule = found
    self.matched.add(idx)
    if rule.weight is None and rule.act is None:
      return next_fun(*args, **kwargs)
    return _quant_dense(mod, args[0], rule, f"{self.policy.describe(idx)} at module {path!r}",
                        self.policy.qat_gate, self.kernels)


def hadamard_block_of(rule: Rule) -> int | None:
  for s in (rule.weight, rule.act):
    if s is not None and s.hadamard_block:
      return s.hadamard_block
  return None


def check_dims(spec: QuantSpec | None, k: int, where: str, block: int | None):
  if block and k % block:
    raise ValueError(f"{where}: Hadamard block {block} does not divide the contraction "
                     f"dimension {k}; set hadamard_block to a power of two dividing {k}.")
  if spec is not None and spec.group_size and k % spec.group_size:
    raise ValueError(f"{where}: group_size={spec.group_size} does not divide the contraction "
                     f"dimension {k}; choose a divisor of {k} (e.g. "
                     f"{max(d for d in range(1, spec.group_size + 1) if k % d == 0)}) or None "
                     "for one scale per row.")


def grouped(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """[..., K] -> [..., K // G, G] (G = K for per-row and per-tensor scales)."""
  g = spec.group_size or x.shape[-1]
  return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def init_alpha(w_OK: jax.Array, spec: QuantSpec) -> jax.Array:
  """ParetoQ's scale init for a rotated-or-not [O, K] weight, stored as [K // G, O]."""
  return q.paretoq_init_scale(grouped(w_OK, spec), spec.bits)[..., 0].T


def quantize_weight(w_OK: jax.Array, spec: QuantSpec, alpha_GO: jax.Array | None = None):
  """Fake-quant of an [O, K] weight (already rotated if the rule rotates)."""
  w = grouped(w_OK, spec)
  if spec.method == "paretoq":
    out = q.paretoq_quantize(w, alpha_GO.T[:, :, None], spec.bits, w_OK.size)
  elif spec.method == "quest":
    out = q.quest_quantize(w, spec.bits, spec.trust_scale)
  else:
    out = q.ste_quantize(w, spec.method, spec.bits, spec.per_tensor)
  return out.reshape(w_OK.shape)


def weight_codes(w_OK: jax.Array, spec: QuantSpec, alpha_GO: jax.Array | None = None) -> q.Codes:
  """The integer codes whose decoding is `quantize_weight`'s forward value ([O, K // G, G])."""
  w = grouped(w_OK, spec)
  if spec.method == "paretoq":
    return q.paretoq_codes(w, alpha_GO.T[:, :, None], spec.bits)
  if spec.method == "quest":
    return q.quest_codes(w, spec.bits)
  return q.ste_codes(w, spec.method, spec.bits, spec.per_tensor)


def quantize_act(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """Fake-quant of activations [..., K], per token (or per group of the last axis)."""
  xg = grouped(x, spec)
  if spec.method == "quest":
    out = q.quest_quantize(xg, spec.bits, spec.trust_scale)
  else:
    out = q.ste_quantize(xg, spec.method, spec.bits, spec.per_tensor)
  return out.reshape(x.shape)


def _out_axis_name(mod: nn.Module):
  raw = mod.get_variable("params", "kernel")
  return raw.names[-1] if isinstance(raw, nn.LogicallyPartitioned) else None


def _compute_dtype(mod, x, kernel):
  return mod.dtype or jnp.result_type(x, kernel)


def _matmul(mod, x, w_OK, dtype):
  y = jax.lax.dot_general(x.astype(dtype), w_OK.astype(dtype),
                          (((x.ndim - 1,), (1,)), ((), ())), precision=mod.precision)
  if mod.use_bias:
    bias = mod.param("bias", mod.bias_init, (mod.features,), mod.param_dtype)
    y = y + bias.astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
  return y


def _quant_dense(mod: nn.Dense, x, rule: Rule, where: str, gated: bool, kernels: str):
  k = x.shape[-1]
  kernel = mod.param("kernel", mod.kernel_init, (k, mod.features), mod.param_dtype)
  dtype = _compute_dtype(mod, x, kernel)
  block = hadamard_block_of(rule)
  check_dims(rule.weight, k, where, block)
  check_dims(rule.act, k, where, block)
  w_OK = kernel.astype(jnp.float32).T
  x32 = x.astype(jnp.float32)
  if block:
    w_OK, x32 = hadamard_transform(w_OK, block, kernels), hadamard_transform(x32, block, kernels)
  gate = mod.param(QAT_GATE, nn.initializers.zeros, (), jnp.float32) if gated else None

  def maybe(fq, v):
    return fq if gate is None else jnp.where(gate > 0.5, fq, v)

  if rule.weight is not None:
    alpha = None
    if rule.weight.method == "paretoq":
      names = (None, _out_axis_name(mod))
      alpha = mod.param(
          QUANT_SCALE,
          lambda _, w: nn.LogicallyPartitioned(init_alpha(w, rule.weight), names)
          if names[1] else init_alpha(w, rule.weight), jax.lax.stop_gradient(w_OK))
    w_OK = maybe(quantize_weight(w_OK, rule.weight, alpha), w_OK)
  if rule.act is not None:
    x32 = maybe(quantize_act(x32, rule.act), x32)
  return _matmul(mod, x32, w_OK, dtype)


def _packed_dense(mod: nn.Dense, x, packed, kernels: str):
  dtype = mod.dtype or x.dtype
  x32 = x.astype(jnp.float32)
  if packed.hadamard_block:
    x32 = hadamard_transform(x32, packed.hadamard_block, kernels)
  if kernels == "xla":
    w_OK = packed.dequantize()  # in the rotated domain when the layer rotates
    if packed.act is not None:
      x32 = quantize_act(x32, packed.act)
    return _matmul(mod, x32, w_OK, dtype)
  from pallas_kernels.lowbit_matmul import Layout, lowbit_matmul
  k = packed.shape[0]
  layout = Layout(packed.fmt, packed.codebook, k, packed.group_size)
  integer = (integer_activation(x32, packed.act)
             if packed.act is not None and packed.group_size == k else None)
  if integer is not None:
    y = lowbit_matmul(*integer[:1], packed.codes, packed.scale, packed.zero, integer[1],
                      layout=layout, impl=kernels, out_dtype=jnp.float32)
  else:
    xin = x32 if packed.act is None else quantize_act(x32, packed.act)
    y = lowbit_matmul(xin.astype(dtype), packed.codes, packed.scale, packed.zero, layout=layout,
                      impl=kernels, out_dtype=jnp.float32)
  y = y.astype(dtype)
  if mod.use_bias:
    bias = mod.param("bias", mod.bias_init, (mod.features,), mod.param_dtype)
    y = y + bias.astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
  return y


def integer_activation(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array] | None:
  """Per-token activation quantization as exact int8 values and a scale, `x_q = x_int * s`, for
  symmetric codebooks with one scale per token and no zero point (QuEST's grid, absmax /
  BitNet's int8); None when the quantizer has no such form (grouped, min-max, > 7-bit QuEST)."""
  if spec.group_size not in (None, x.shape[-1]) or spec.per_tensor:
    return None
  xg = grouped(x, spec)
  c = (q.quest_codes(xg, spec.bits) if spec.method == "quest"
       else q.ste_codes(xg, spec.method, spec.bits, spec.per_tensor))
  cb, n = c.codebook, len(c.codebook)
  step = cb[1] - cb[0]
  if c.zero is not None or abs(cb[0] + cb[-1]) > 1e-6 * abs(cb[-1]):
    return None
  two = 1 if n % 2 else 2  # odd n: c - (n-1)/2; even n: 2c - (n-1) (half-integer grid doubled)
  if (n - 1) * two // 2 > 127:
    return None
  x_int = (two * c.codes - (n - 1) * two // 2).astype(jnp.int8)
  return x_int.reshape(x.shape), (c.scale[..., 0] * step / two).reshape(x.shape[:-1])


def dense_paths(model: nn.Module, *example_args: Any, **kw) -> list[str]:
  """'/'-joined paths of every `nn.Dense` the model calls (abstractly, nothing computed)."""
  icpt = _Interceptor(None)

  def run():
    with nn.intercept_methods(icpt):
      return model.init(jax.random.key(0), *example_args, **kw)

  jax.eval_shape(run)
  return icpt.dense_paths


def rules_from(pairs: Sequence[tuple[str, QuantSpec | None]]) -> tuple[Rule, ...]:
  """`[(pattern, weight_spec), ...]` -> weight-only rules (convenience for mixed PTQ)."""
  return tuple(Rule(p, w) for p, w in pairs)

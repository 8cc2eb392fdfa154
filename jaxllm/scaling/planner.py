"""A parallelism planner: mesh degrees and logical rules for a model, a chip count and a batch.

It follows the scaling book's chapter 5 argument and prints it:

1. Memory: the training state (fp32 weights + Adam moments, 12 bytes per parameter) must be
   sharded over enough chips to fit in HBM.
2. FSDP alone is compute-bound when the tokens per chip exceed C / (W_ici M), the chip's
   FLOPs per ICI byte over the M torus axes the collective runs on (2550 on v5p for one axis,
   850 for three).
3. Otherwise combine FSDP over X chips with tensor parallelism over Y = N / X: FSDP moves the
   weights (per chip ~ 1 / Y of them), TP moves activations (~ B / X tokens), the sum is
   smallest at X_opt = sqrt(B M_X N / (F M_Y)), and the mix is compute-bound when the tokens per
   chip exceed 4 alpha^2 / (F M_X M_Y).
4. Candidates (powers of two that divide the model's dimensions and the batch) are scored with
   the step-time model `max(T_math, T_fsdp + T_tp + T_seq)` and the fastest wins.

Sequence parallelism: when the data-parallel degree exceeds the number of sequences in the
batch, the `data` mesh axis shards the sequence (`length`) instead of the batch; attention then
all-gathers keys and values (cheap with GQA: K H << D). jaxllm's mesh axes stay (data, fsdp,
tensor); the plan's rules say which role `data` plays.
"""

from __future__ import annotations

import dataclasses
import math

from jaxllm.models.llama import LlamaConfig
from jaxllm.scaling.accounting import matmul_params
from jaxllm.scaling.chips import Chip
from jaxllm.sharding.mesh import MeshConfig
from jaxllm.sharding.rules import LOGICAL_RULES

STATE_BYTES_PER_PARAM = 12  # fp32 weights + Adam's two fp32 moments
ACT_BYTES = 2  # bf16 activations and gathered bf16 weights on the wire


@dataclasses.dataclass(frozen=True)
class StepModel:
  """Per-step time terms (seconds) of one candidate layout."""

  t_math: float
  t_fsdp: float
  t_tp: float
  t_seq: float

  @property
  def t_comms(self) -> float:
    return self.t_fsdp + self.t_tp + self.t_seq

  @property
  def time(self) -> float:
    return max(self.t_math, self.t_comms)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A proposed layout. `mesh` is jaxllm's (data, fsdp, tensor) mesh; `sequence` is how many
  ways the `data` axis shards the sequence (1: it shards the batch, plain data parallelism)."""

  mesh: MeshConfig
  sequence: int
  rules: tuple[tuple[str, object], ...]
  chips_used: int
  tokens_per_chip: float
  step: StepModel
  reasoning: tuple[str, ...]

  @property
  def data(self) -> int:
    return self.mesh.data

  @property
  def fsdp(self) -> int:
    return self.mesh.fsdp

  @property
  def tensor(self) -> int:
    return self.mesh.tensor

  @property
  def batch_parallel(self) -> int:
    """Ways the batch's sequences are split (data x fsdp, less the sequence-parallel part)."""
    return self.data * self.fsdp // self.sequence

  @property
  def data_parallel(self) -> int:
    """Data-like degree (batch and sequence splits together): data x fsdp."""
    return self.data * self.fsdp

  @property
  def mfu(self) -> float:
    return self.step.t_math / self.step.time

  def __str__(self) -> str:
    return "\n".join(self.reasoning)


def _pow2_divisors(*ns: int) -> list[int]:
  g = math.gcd(*ns)
  return [1 << k for k in range(g.bit_length()) if g % (1 << k) == 0]


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def _rules(data_role: str) -> tuple[tuple[str, object], ...]:
  """jaxllm's rules, with `data` sharding the sequence instead of the batch if asked."""
  if data_role == "batch":
    return LOGICAL_RULES
  changed = {"batch": "fsdp", "length": "data"}
  return tuple((name, changed.get(name, axes)) for name, axes in LOGICAL_RULES)


def step_model(cfg: LlamaConfig, chip: Chip, batch_tokens: int, seq_len: int, fsdp: int,
               tensor: int, data: int = 1, data_role: str = "batch") -> StepModel:
  """Roofline of one training step with the given degrees (the book's chapter-5 terms).

  T_math: 6 x matmul params x tokens (+ causal attention) over all chips' bf16 peak.
  T_fsdp: weights all-gathered in the forward and backward passes and gradients
    reduce-scattered: 3 x 2 bytes x params / tensor, over the torus axes not used by tensor.
  T_tp: per layer and block (attention, MLP), an all-gather and a reduce-scatter of the
    block's input / output activations [B / (data fsdp), D] in bf16, forward and twice backward.
  T_seq: per layer, keys and values all-gathered over the sequence shards (and their gradients
    reduce-scattered).
  `data_role="batch"`: pure data parallelism over `data` adds an all-reduce of the (already
  fsdp x tensor-sharded) gradients. `data_role="length"`: `data` shards the sequence instead.
  """
  if data_role not in ("batch", "length"):
    raise ValueError(f"data_role={data_role!r}; use 'batch' or 'length'.")
  sequence = data if data_role == "length" else 1
  n = data * fsdp * tensor
  L, D = cfg.n_layers, cfg.d_model
  t_math = batch_tokens * cfg.flops_per_token(seq_len) / (n * chip.bf16_flops)
  m_y = 1 if tensor > 1 else 0
  m_x = max(chip.ici_axes - m_y, 1)
  w = chip.ici_bidi_bw
  weights = ACT_BYTES * matmul_params(cfg)

  def frac(x):  # the share of a gathered array that travels
    return (x - 1) / x

  t_fsdp = 3 * weights / tensor * frac(fsdp) / (w * m_x) if fsdp > 1 else 0.0
  dp_batch = data * fsdp  # activations of one tensor-parallel group: batch_tokens / dp_batch
  act = ACT_BYTES * batch_tokens / dp_batch * D
  t_tp = 3 * L * 2 * 2 * act * frac(tensor) / (w * m_y) if tensor > 1 else 0.0
  kv = ACT_BYTES * 2 * batch_tokens / (dp_batch / sequence) * cfg.n_kv_heads * (
      cfg.resolved_head_dim) / max(tensor, 1)
  t_seq = 3 * L * kv * frac(sequence) / (w * m_x) if sequence > 1 else 0.0
  if data_role == "batch" and data > 1:
    t_fsdp += 2 * weights / (fsdp * tensor) * frac(data) / (w * m_x)
  return StepModel(t_math, t_fsdp, t_tp, t_seq)


def plan(model_cfg: LlamaConfig, n_chips: int, chip: Chip, batch_tokens: int,
         seq_len: int = 4096, max_tensor: int = 16, max_sequence: int = 8,
         hbm_fraction: float = 0.5, verbose: bool = True) -> Plan:
  """Proposes (data, fsdp, tensor) degrees and logical rules, and explains why.

  Args:
    model_cfg: the model.
    n_chips: chips available.
    chip: their spec (`jaxllm.scaling.TPU_V5P`, ...).
    batch_tokens: global batch in tokens.
    seq_len: tokens per sequence (`batch_tokens / seq_len` sequences).
    max_tensor: largest tensor-parallel degree considered (the book: ~8-16).
    max_sequence: largest sequence-parallel degree considered.
    hbm_fraction: share of HBM the training state may take (the rest: activations, buffers).
    verbose: print the reasoning.
  """
  cfg, C = model_cfg, chip
  if batch_tokens % seq_len:
    raise ValueError(f"batch_tokens={batch_tokens} is not a whole number of {seq_len}-token "
                     "sequences.")
  n_seqs = batch_tokens // seq_len
  P = cfg.num_params()
  F = cfg.ffn_dim
  alpha = C.bf16_flops / C.ici_bidi_bw
  size = f"{P / 1e9:.1f}e9" if P >= 1e8 else f"{P / 1e6:.2f}e6"
  why = [(f"Plan for a {size}-parameter model on {n_chips} {C.name} chips, batch "
          f"{batch_tokens:,} tokens ({n_seqs} x {seq_len}).")]
  state = STATE_BYTES_PER_PARAM * P
  min_shards = math.ceil(state / (hbm_fraction * C.hbm_bytes))
  why.append(f"1. Memory: the training state is {STATE_BYTES_PER_PARAM} B/param x {size} "
             f"= {state / 1e9:.3g} GB; at {hbm_fraction:.0%} of {C.hbm_bytes / 1e9:.0f} GB HBM it "
             f"needs >= {min_shards} shards (FSDP x TP)"
             + (" - so pure data parallelism is out." if min_shards > 1 else "."))
  b = batch_tokens / n_chips
  why.append(f"2. Tokens per chip: {b:,.0f}. FSDP alone is compute-bound above C / W_ici = "
             f"{alpha:,.0f} (one axis) or {alpha / C.ici_axes:,.0f} ({C.ici_axes} axes): "
             + ("satisfied." if b >= alpha / C.ici_axes else "not satisfied, so add tensor "
                "parallelism."))
  m_x, m_y = max(C.ici_axes - 1, 1), 1
  x_opt = math.sqrt(batch_tokens * m_x * n_chips / (F * m_y))
  b_mix = 4 * alpha**2 / (F * m_x * m_y)
  why.append(f"3. FSDP x TP (M_X={m_x}, M_Y={m_y} torus axes): X_opt = sqrt(B M_X N / (F M_Y)) "
             f"= {x_opt:,.0f}, Y = N / X_opt = {n_chips / x_opt:.1f}; compute-bound when tokens "
             f"per chip > 4 alpha^2 / (F M_X M_Y) = {b_mix:,.0f} "
             + ("(satisfied)." if b >= b_mix else "(not satisfied: expect to be comms-bound)."))

  tensors = [t for t in _pow2_divisors(cfg.n_kv_heads, cfg.n_heads, F, cfg.vocab_size)
             if t <= max_tensor]
  fsdps = _pow2_divisors(cfg.d_model, n_seqs)
  seqs = [s for s in _pow2_divisors(seq_len) if s <= max_sequence]
  candidates = []
  for t in tensors:
    for f in fsdps:
      if f * t < min_shards:
        continue
      for role, datas in (("batch", _divisors(n_seqs // f)), ("length", seqs)):
        for d in datas:
          n = d * f * t
          if n > n_chips or (role == "length" and d == 1):
            continue
          model = step_model(cfg, C, batch_tokens, seq_len, f, t, data=d, data_role=role)
          candidates.append((-n, model.time, model.t_comms, (role, d, f, t), model))
  if not candidates:
    raise ValueError(f"No layout of {n_chips} chips fits: the state needs {min_shards} shards "
                     "but the model's dimensions and batch allow fewer.")
  neg_n, _, _, (role, d, f, t), model = min(candidates)
  chips_used = -neg_n
  s = d if role == "length" else 1
  why.append(f"4. Candidates: tensor in {tensors}; fsdp a power of two dividing D={cfg.d_model} "
             f"and the {n_seqs} sequences; data sharding the batch (any divisor) or the "
             f"sequence ({seqs[1:]}). Among layouts using the most chips, the step-time model "
             "max(T_math, T_fsdp + T_tp + T_seq), ties broken by less communication, picks:")
  why.append(f"   data={d} ({'sharding the sequence' if s > 1 else 'sharding the batch'}) x "
             f"fsdp={f} x tensor={t} = {chips_used} chips")
  if chips_used < n_chips:
    why.append(f"   ({n_chips - chips_used} chips idle: {n_chips} = "
               f"{'x'.join(map(str, _factor(n_chips)))} and the batch, sequence and D split only "
               "by powers of two.)")
  why.append(f"   T_math {model.t_math * 1e3:.0f} ms, T_fsdp {model.t_fsdp * 1e3:.0f} ms, "
             f"T_tp {model.t_tp * 1e3:.0f} ms, T_seq {model.t_seq * 1e3:.0f} ms -> "
             f"{'compute' if model.t_math >= model.t_comms else 'comms'}-bound "
             f"(comms / math = {model.t_comms / model.t_math:.2f}).")
  if s > 1:
    why.append(f"   The batch's {n_seqs} sequences are split {f} ways; the data axis splits each "
               f"sequence {s} ways (sequence parallelism): rules map batch -> fsdp and "
               "length -> data.")
  rules = _rules(role)
  result = Plan(MeshConfig(data=d, fsdp=f, tensor=t), s, rules, chips_used,
                batch_tokens / chips_used, model, tuple(why))
  if verbose:
    print(result)
  return result


def _factor(n: int) -> list[int]:
  out, p = [], 2
  while n > 1:
    while n % p == 0:
      out.append(p)
      n //= p
    p += 1
  twos = [x for x in out if x == 2]
  rest = [x for x in out if x != 2]
  return ([1 << len(twos)] if twos else []) + rest

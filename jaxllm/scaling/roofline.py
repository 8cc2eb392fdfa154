"""Rooflines: a step takes at least as long as its compute, its memory traffic or its comms.

T >= max(T_math, T_mem, T_comms), with T_math = FLOPs / C, T_mem = HBM bytes / W_hbm and
T_comms = bytes sent / W_ici. A computation is compute-bound when its arithmetic intensity
(FLOPs per byte) exceeds the chip's critical intensity C / W.
"""

from __future__ import annotations

import dataclasses

from jaxllm.scaling.chips import Chip


@dataclasses.dataclass(frozen=True)
class Roofline:
  """Lower bounds on the time of one computation, in seconds."""

  t_math: float
  t_mem: float
  t_comms: float = 0.0

  @property
  def time(self) -> float:
    """The roofline bound, assuming perfect overlap: max of the three."""
    return max(self.t_math, self.t_mem, self.t_comms)

  @property
  def bound(self) -> str:
    """`"compute"`, `"memory"` or `"comms"`: whichever term is largest."""
    terms = {"compute": self.t_math, "memory": self.t_mem, "comms": self.t_comms}
    return max(terms, key=terms.get)

  @property
  def mfu(self) -> float:
    """Fraction of peak FLOP/s achieved if the step runs at its bound."""
    return self.t_math / self.time if self.time else 0.0


def arithmetic_intensity(flops: float, bytes_moved: float) -> float:
  """FLOPs per byte."""
  return flops / bytes_moved


def roofline(flops: float, hbm_bytes: float, chip: Chip, comm_bytes: float = 0.0,
             comm_bw: float | None = None, int8: bool = False) -> Roofline:
  """Time bounds of `flops` of work reading/writing `hbm_bytes`, sending `comm_bytes`.

  `comm_bw` defaults to one bidirectional ICI link; `int8=True` uses the int8 peak.
  """
  peak = chip.int8_ops if int8 else chip.bf16_flops
  bw = chip.ici_bidi_bw if comm_bw is None else comm_bw
  return Roofline(flops / peak, hbm_bytes / chip.hbm_bw, comm_bytes / bw if comm_bytes else 0.0)


def matmul_flops(b: int, d: int, f: int) -> float:
  """FLOPs of [B, D] @ [D, F]: one multiply and one add per (b, d, f)."""
  return 2.0 * b * d * f


def matmul_bytes(b: int, d: int, f: int, x_bytes: float = 2, w_bytes: float = 2,
                 out_bytes: float = 2) -> float:
  """HBM bytes of [B, D] @ [D, F]: read both operands, write the output once."""
  return b * d * x_bytes + d * f * w_bytes + b * f * out_bytes


def matmul_roofline(b: int, d: int, f: int, chip: Chip, x_bytes: float = 2, w_bytes: float = 2,
                    out_bytes: float = 2) -> Roofline:
  """Roofline of one [B, D] @ [D, F] matmul on one chip (bf16 compute)."""
  return roofline(matmul_flops(b, d, f), matmul_bytes(b, d, f, x_bytes, w_bytes, out_bytes),
                  chip)


def matmul_intensity(b: int, d: int, f: int, x_bytes: float = 2, w_bytes: float = 2,
                     out_bytes: float = 2) -> float:
  """Arithmetic intensity of [B, D] @ [D, F]; tends to B when B << D, F (bf16 everywhere)."""
  return arithmetic_intensity(matmul_flops(b, d, f),
                              matmul_bytes(b, d, f, x_bytes, w_bytes, out_bytes))


def critical_batch(chip: Chip, w_bytes: float = 2) -> float:
  """Smallest token batch at which a weight-streaming matmul (B << D, F) is compute-bound.

  Intensity ~ 2 B D F / (w_bytes D F) = 2 B / w_bytes, so B* = C / W_hbm x w_bytes / 2:
  ~240 on v5e with bf16 weights, ~120 with int8 weights (still bf16 FLOPs).
  """
  return chip.critical_intensity * w_bytes / 2

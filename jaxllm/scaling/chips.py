"""Accelerator specs: the numbers every roofline in the tutorials starts from.

TPU figures are the table of "How to Scale Your Model" (jax-ml/scaling-book, chapter 2); GPU
figures are NVIDIA's dense (no 2:4 sparsity) SXM numbers. Bandwidths are bytes per second,
compute is operations per second, memory is bytes.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator.

  Attributes:
    name: short name (`"v5p"`, `"H100"`).
    hbm_bytes: high-bandwidth memory capacity.
    hbm_bw: HBM bandwidth, bytes/s.
    bf16_flops: dense bf16 matmul peak, FLOP/s.
    int8_ops: dense int8 matmul peak, OP/s.
    ici_bw: one-way bandwidth of one inter-chip link, bytes/s (TPU ICI; NVLink per GPU for GPUs).
    ici_axes: independent torus axes a collective can use at once (3 on v4p/v5p's 3-D torus, 2 on
      v5e/v6e's 2-D torus, 1 for a GPU's NVLink domain).
    dcn_bw: data-centre network bandwidth per chip, bytes/s (between slices / nodes).
    notes: where a number comes from, or what is achievable in practice.
  """

  name: str
  hbm_bytes: float
  hbm_bw: float
  bf16_flops: float
  int8_ops: float
  ici_bw: float
  ici_axes: int
  dcn_bw: float = 6.25e9
  notes: str = ""

  @property
  def ici_bidi_bw(self) -> float:
    """Bidirectional bandwidth of one link (both directions of a ring used at once)."""
    return 2 * self.ici_bw

  @property
  def critical_intensity(self) -> float:
    """FLOPs per HBM byte at which bf16 compute and memory take equal time (C / W_hbm)."""
    return self.bf16_flops / self.hbm_bw

  @property
  def ici_critical_intensity(self) -> float:
    """FLOPs per byte sent over one bidirectional link at which compute equals comms."""
    return self.bf16_flops / self.ici_bidi_bw


# HBM bandwidth of v5e is 819 GB/s (the book's table rounds it to 8.1e11, its text to 8.2e11).
TPU_V4P = Chip("v4p", 32e9, 1.2e12, 2.75e14, 2.75e14, 4.5e10, 3)
TPU_V5E = Chip("v5e", 16e9, 8.19e11, 1.97e14, 3.94e14, 4.5e10, 2)
TPU_V5P = Chip("v5p", 96e9, 2.8e12, 4.59e14, 9.18e14, 9e10, 3)
TPU_V6E = Chip("v6e", 32e9, 1.6e12, 9.2e14, 1.84e15, 9e10, 2)
H100 = Chip("H100", 80e9, 3.35e12, 989e12, 1979e12, 450e9, 1, dcn_bw=50e9,
            notes="SXM, dense. The book's ~298 FLOPs/byte rounds the peak to 1e15.")
H200 = Chip("H200", 141e9, 4.8e12, 989e12, 1979e12, 450e9, 1, dcn_bw=50e9,
            notes="SXM, dense; the same compute die as H100 with more and faster HBM. "
                  "About 790e12 bf16 FLOP/s is achievable in large matmuls (~80% of peak).")

CHIPS: dict[str, Chip] = {c.name: c for c in (TPU_V4P, TPU_V5E, TPU_V5P, TPU_V6E, H100, H200)}


def chip(name: str) -> Chip:
  """Looks a chip up by name (`"v5e"`, `"v5p"`, `"H100"`, ...)."""
  if name not in CHIPS:
    raise ValueError(f"Unknown chip {name!r}; choose one of {sorted(CHIPS)}.")
  return CHIPS[name]

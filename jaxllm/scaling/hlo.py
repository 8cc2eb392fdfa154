"""Reading compiled HLO: which collectives did XLA insert?"""

from __future__ import annotations

import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collective_counts(hlo_text: str) -> dict[str, int]:
  """Number of each collective instruction in `jit(f).lower(...).compile().as_text()`.

  Counts instructions (`= f32[..] all-gather(`), including async `-start` forms, not fusions or
  metadata that merely mention a name.
  """
  counts = {}
  for name in COLLECTIVES:
    pattern = rf"=\s*\S.*?\s{re.escape(name)}(?:-start)?\("
    counts[name] = len(re.findall(pattern, hlo_text))
  return counts


def compiled_collectives(jitted, *args) -> dict[str, int]:
  """Lowers and compiles `jitted` for `args` (arrays or `jax.ShapeDtypeStruct`s) and counts its
  collectives."""
  return collective_counts(jitted.lower(*args).compile().as_text())

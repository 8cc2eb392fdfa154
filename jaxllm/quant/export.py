"""Saving and loading packed parameter trees as one safetensors file.

Every `PackedWeight` at `a/b/kernel` is stored as the tensors `a/b/kernel.codes`, `.scale` and
(min-max formats) `.zero`, and its static fields (format, codebook, shape, group size, Hadamard
block, activation spec) as JSON in the file's metadata under `jaxllm.packed`; every other leaf
is stored as it is. `load_packed(save_packed(tree))` rebuilds the tree exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from jaxllm.quant.packing import PackedWeight
from jaxllm.quant.policy import QuantSpec

META_KEY = "jaxllm.packed"
FORMAT_VERSION = 1


def _flatten(tree: Mapping[str, Any], prefix: str = ""):
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      yield from _flatten(v, path + "/")
    else:
      yield path, v


def save_packed(tree: Mapping[str, Any], path: str | Path) -> Path:
  """Writes a params tree holding `PackedWeight`s (from `quantize_params`) to `path`."""
  tensors, packed = {}, {}
  for key, leaf in _flatten(tree):
    if isinstance(leaf, PackedWeight):
      tensors[f"{key}.codes"] = leaf.codes
      tensors[f"{key}.scale"] = leaf.scale
      if leaf.zero is not None:
        tensors[f"{key}.zero"] = leaf.zero
      packed[key] = {"fmt": leaf.fmt, "codebook": list(leaf.codebook), "shape": list(leaf.shape),
                     "group_size": leaf.group_size, "hadamard_block": leaf.hadamard_block,
                     "act": None if leaf.act is None else dataclasses.asdict(leaf.act)}
    else:
      tensors[key] = jnp.asarray(leaf)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(path), metadata={
      META_KEY: json.dumps({"version": FORMAT_VERSION, "packed": packed})})
  return path


def load_packed(path: str | Path) -> dict[str, Any]:
  """The params tree written by `save_packed` (PackedWeights rebuilt, other leaves as arrays)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No packed checkpoint at {path}; make one with `jaxllm quantize`.")
  with safe_open(str(path), framework="flax") as f:
    meta = (f.metadata() or {}).get(META_KEY)
    if meta is None:
      raise ValueError(f"{path} is a safetensors file without jaxllm packing metadata "
                       f"({META_KEY!r}); it was not written by `jaxllm quantize`.")
    info = json.loads(meta)
    if info.get("version") != FORMAT_VERSION:
      raise ValueError(f"{path} has packing format version {info.get('version')}; this jaxllm "
                       f"reads version {FORMAT_VERSION}.")
    arrays = {k: f.get_tensor(k) for k in f.keys()}
  tree: dict[str, Any] = {}

  def put(key, value):
    *mods, name = key.split("/")
    node = tree
    for m in mods:
      node = node.setdefault(m, {})
    node[name] = value

  packed = info["packed"]
  for key, spec in packed.items():
    zero = arrays.pop(f"{key}.zero", None)
    put(key, PackedWeight(
        arrays.pop(f"{key}.codes"), arrays.pop(f"{key}.scale"), zero, spec["fmt"],
        tuple(spec["codebook"]), tuple(spec["shape"]), spec["group_size"],
        spec["hadamard_block"], None if spec["act"] is None else QuantSpec(**spec["act"])))
  for key, value in arrays.items():
    put(key, value)
  return tree


def tree_equal(a, b) -> bool:
  """Exact equality of two (packed) params trees: structure, static fields and every array."""
  fa, fb = dict(_flatten(a)), dict(_flatten(b))
  if fa.keys() != fb.keys():
    return False
  for k in fa:
    x, y = fa[k], fb[k]
    if isinstance(x, PackedWeight) != isinstance(y, PackedWeight):
      return False
    if isinstance(x, PackedWeight):
      static = ("fmt", "codebook", "shape", "group_size", "hadamard_block", "act")
      if any(getattr(x, s) != getattr(y, s) for s in static):
        return False
      pairs = [(x.codes, y.codes), (x.scale, y.scale), (x.zero, y.zero)]
    else:
      pairs = [(x, y)]
    for u, v in pairs:
      if (u is None) != (v is None):
        return False
      if u is not None and (np.asarray(u).dtype != np.asarray(v).dtype
                            or not np.array_equal(np.asarray(u), np.asarray(v))):
        return False
  return True

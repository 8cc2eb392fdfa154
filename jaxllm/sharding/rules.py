"""The one table mapping logical axis names to mesh axes, and shardings derived from it.

Model code names axes logically (`embed`, `heads`, `mlp`, ...); only this file knows the mesh.
Parameters: `embed` is sharded over fsdp (ZeRO-3), heads / MLP width / vocabulary over tensor.
Activations: the batch is split over data and fsdp; `act_*` names are the activation versions of
parameter axes (tensor-sharded inside a block, replicated on the residual stream).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` (abstract or not).

  Leaves without logical names (step counters, RNG keys) are replicated.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> None:
  """Raises a ValueError naming the parameter and axis when a dimension does not split evenly."""
  shardings = logical_shardings(boxed_tree, mesh, rules)
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(boxed_tree))
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
    for dim, axes in zip(leaf.shape, sharding.spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      size = 1
      for a in axes:
        size *= mesh.shape[a]
      if dim % size:
        raise ValueError(
            f"Parameter {jax.tree_util.keystr(path)} has a dimension of {dim} that cannot be "
            f"split over mesh axes {axes} of total size {size}: choose mesh sizes that divide "
            "it (e.g. a smaller `mesh.tensor` when heads or KV heads are few).")


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
  """Batches are split along their first axis as the rules map "batch" (data x fsdp)."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

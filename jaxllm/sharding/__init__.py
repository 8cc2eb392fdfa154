"""Meshes, logical-to-mesh rules and the shardings derived from them."""

from jaxllm.sharding.mesh import MESH_AXES, MeshConfig, make_mesh
from jaxllm.sharding.rules import (LOGICAL_RULES, batch_sharding, check_divisible,
                                   logical_shardings, replicated)

__all__ = ["MESH_AXES", "MeshConfig", "make_mesh", "LOGICAL_RULES", "batch_sharding",
           "check_divisible", "logical_shardings", "replicated"]

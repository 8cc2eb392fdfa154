"""Device meshes over the (data, fsdp, tensor) axes."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1 to take the remaining devices.

  data: pure data parallelism (parameters replicated). fsdp: data parallelism with parameters
  and optimizer state sharded (ZeRO-3). tensor: Megatron-style sharding of heads and MLP width.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, ...]:
    sizes = [getattr(self, a) for a in MESH_AXES]
    if sizes.count(-1) > 1:
      raise ValueError(f"MeshConfig {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.")
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"MeshConfig {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1.")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % fixed:
        raise ValueError(f"MeshConfig {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed} "
                         f"devices) do not divide the {num_devices} devices available.")
      sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
      raise ValueError(f"MeshConfig {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                       f"devices but {num_devices} are available; set one axis to -1 or change "
                       "the sizes so their product equals the device count.")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  """A mesh with automatic (GSPMD) axes: shardings come from the logical rules."""
  devices = jax.devices() if devices is None else list(devices)
  shape = cfg.shape(len(devices))
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))

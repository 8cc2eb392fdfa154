"""Collective cost models (scaling book, chapter 3) and ring implementations for `shard_map`.

Cost models: an array of V bytes in total, sharded or to be sharded over a mesh axis of X
devices connected as a ring (a torus axis with wraparound links). Per hop each device passes
one shard of V / X bytes to a neighbour; a bidirectional ring sends a shard each way per hop,
so it needs (X - 1) / 2 hops instead of X - 1:

  AllGather, ReduceScatter   T ~ V (X - 1) / X / W_bidi  ~ V / W_bidi   (independent of X)
  AllReduce                  2 x AllGather (a ReduceScatter followed by an AllGather)
  AllToAll                   AllGather / 4  (each shard travels X / 4 hops on average, not X / 2)

Each hop also costs a latency (~1 us on TPU ICI), which dominates for small arrays. With
`n_axes > 1` the array is split over several torus axes, multiplying the bandwidth.

The `ring_*` functions run inside `jax.shard_map` and build the collectives from
`jax.lax.ppermute` (neighbour sends), the way the hardware does; the tutorials check them
against `jax.lax.all_gather` / `psum_scatter` / `psum` / `all_to_all`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.scaling.chips import Chip

HOP_LATENCY_S = 1e-6  # one ICI hop


@dataclasses.dataclass(frozen=True)
class CollectiveCost:
  """Estimated cost of one collective on one mesh axis."""

  name: str
  time: float  # seconds: hops x max(latency, shard bytes / bandwidth)
  bytes_per_device: float  # bytes each device receives
  hops: float

  @property
  def latency_bound(self) -> bool:
    return self.time <= self.hops * HOP_LATENCY_S * (1 + 1e-9)


def _ring(name: str, v_bytes: float, x: int, link_bw: float, bidirectional: bool, n_axes: int,
          hop_latency: float, traffic_scale: float = 1.0) -> CollectiveCost:
  if x < 1:
    raise ValueError(f"{name}: axis size must be >= 1, got {x}.")
  if x == 1:
    return CollectiveCost(name, 0.0, 0.0, 0.0)
  shard = v_bytes / x
  hops = (x - 1) / 2 if bidirectional else float(x - 1)
  per_hop = max(hop_latency, traffic_scale * shard / (link_bw * n_axes))
  return CollectiveCost(name, hops * per_hop, traffic_scale * shard * (x - 1), hops)


def all_gather_cost(v_bytes: float, x: int, link_bw: float, bidirectional: bool = True,
                    n_axes: int = 1, hop_latency: float = HOP_LATENCY_S) -> CollectiveCost:
  """AllGather of an array whose *gathered* size is `v_bytes` over `x` devices.

  `link_bw` is the one-way bandwidth of one link (`Chip.ici_bw`); a bidirectional ring uses
  both directions, so the bandwidth term is V (X - 1) / X / (2 link_bw n_axes).
  """
  return _ring("all-gather", v_bytes, x, link_bw, bidirectional, n_axes, hop_latency)


def reduce_scatter_cost(v_bytes: float, x: int, link_bw: float, bidirectional: bool = True,
                        n_axes: int = 1, hop_latency: float = HOP_LATENCY_S) -> CollectiveCost:
  """ReduceScatter of an unreduced array of `v_bytes` per device: the transpose of AllGather,
  same cost."""
  return _ring("reduce-scatter", v_bytes, x, link_bw, bidirectional, n_axes, hop_latency)


def all_reduce_cost(v_bytes: float, x: int, link_bw: float, bidirectional: bool = True,
                    n_axes: int = 1, hop_latency: float = HOP_LATENCY_S) -> CollectiveCost:
  """AllReduce = ReduceScatter + AllGather: twice the cost of either."""
  rs = reduce_scatter_cost(v_bytes, x, link_bw, bidirectional, n_axes, hop_latency)
  return CollectiveCost("all-reduce", 2 * rs.time, 2 * rs.bytes_per_device, 2 * rs.hops)


def all_to_all_cost(v_bytes: float, x: int, link_bw: float, bidirectional: bool = True,
                    n_axes: int = 1, hop_latency: float = HOP_LATENCY_S) -> CollectiveCost:
  """AllToAll of an array of `v_bytes` in total: a quarter of an AllGather's bandwidth time
  on a bidirectional ring (each device keeps 1 / X of its data and the rest travels X / 4 hops
  on average)."""
  return _ring("all-to-all", v_bytes, x, link_bw, bidirectional, n_axes, hop_latency, 0.25)


def chip_collective_cost(kind: str, v_bytes: float, x: int, chip: Chip,
                         n_axes: int = 1) -> CollectiveCost:
  """The cost of `kind` ("all-gather", "reduce-scatter", "all-reduce", "all-to-all") on
  `chip`'s ICI."""
  fns = {"all-gather": all_gather_cost, "reduce-scatter": reduce_scatter_cost,
         "all-reduce": all_reduce_cost, "all-to-all": all_to_all_cost}
  if kind not in fns:
    raise ValueError(f"Unknown collective {kind!r}; choose one of {sorted(fns)}.")
  return fns[kind](v_bytes, x, chip.ici_bw, n_axes=n_axes)


# ----------------------------------------------------------------- shard_map implementations
def _shift(x, axis_name: str, n: int, k: int):
  """Sends `x` from device i to device (i + k) % n along `axis_name`."""
  return jax.lax.ppermute(x, axis_name, [(i, (i + k) % n) for i in range(n)])


def ring_all_gather(x: jax.Array, axis_name: str, axis: int = 0) -> jax.Array:
  """AllGather along `axis` by X - 1 neighbour sends (unidirectional ring).

  Equals `jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)`.
  """
  n = jax.lax.axis_size(axis_name)
  idx = jax.lax.axis_index(axis_name)
  received = [x]
  for _ in range(n - 1):
    received.append(_shift(received[-1], axis_name, n, 1))  # hop k holds device (idx - k)'s
  stacked = jnp.stack(received)
  ordered = stacked[(idx - jnp.arange(n)) % n]  # ordered[j] is device j's shard
  return jnp.concatenate(list(ordered), axis=axis)


def ring_reduce_scatter(x: jax.Array, axis_name: str, axis: int = 0) -> jax.Array:
  """ReduceScatter along `axis`: device i ends with the sum over devices of chunk i.

  A partial sum travels around the ring, each device adding its own copy of the chunk before
  passing it on. Equals `jax.lax.psum_scatter(x, axis_name, scatter_dimension=axis,
  tiled=True)`.
  """
  n = jax.lax.axis_size(axis_name)
  idx = jax.lax.axis_index(axis_name)
  chunks = jnp.stack(jnp.split(x, n, axis=axis))  # [n, ...chunk]
  buf = chunks[(idx - 1) % n]
  for s in range(n - 1):
    buf = _shift(buf, axis_name, n, 1) + chunks[(idx - s - 2) % n]
  return buf


def ring_all_reduce(x: jax.Array, axis_name: str, axis: int = 0) -> jax.Array:
  """AllReduce as ReduceScatter then AllGather (what bandwidth-optimal rings do); equals
  `jax.lax.psum(x, axis_name)`. `x.shape[axis]` must divide by the axis size."""
  return ring_all_gather(ring_reduce_scatter(x, axis_name, axis), axis_name, axis)


def ring_all_to_all(x: jax.Array, axis_name: str, axis: int = 0) -> jax.Array:
  """AllToAll: chunk j of device i goes to device j, which stacks what it receives in source
  order. Equals `jax.lax.all_to_all(x, axis_name, axis, axis, tiled=True)`."""
  n = jax.lax.axis_size(axis_name)
  idx = jax.lax.axis_index(axis_name)
  chunks = jnp.stack(jnp.split(x, n, axis=axis))
  out = [None] * n  # out[k]: the chunk from device (idx - k) % n
  for k in range(n):
    out[k] = chunks[(idx + k) % n] if k == 0 else _shift(chunks[(idx + k) % n], axis_name, n, k)
  stacked = jnp.stack(out)
  ordered = stacked[(idx - jnp.arange(n)) % n]
  return jnp.concatenate(list(ordered), axis=axis)

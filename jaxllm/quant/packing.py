"""Packed low-bit weights: integer codes in bytes plus scales, as a pytree.

| format | codes per byte | bytes per weight |
|---|---|---|
| "1" (binary) | 8 | 0.125 |
| "ternary" | 5 trits (3^5 = 243 <= 256) | 0.2 |
| "2" | 4 | 0.25 |
| "3" | 8 codes in 3 bytes | 0.375 |
| "4" | 2 | 0.5 |
| "8" (also 5-7 bits) | 1 | 1 |

Codes are packed along the contraction axis K of a `kernel[K, O]` (zero-padded to a whole number
of bytes): `codes[bytes(K), O]`, little-endian within a byte. Packing and unpacking are jnp
(uint32 intermediates, so no int8 shift overflow on any backend); dequantisation runs through XLA
inside the jitted model (a Pallas packed matmul can replace `PackedWeight.dequantize` later).
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm.quant import quantizers as q
from jaxllm.quant.policy import QuantSpec

# format -> (codes per unit, bytes per unit, max distinct codes)
FORMATS = {"1": (8, 1, 2), "ternary": (5, 1, 3), "2": (4, 1, 4), "3": (8, 3, 8), "4": (2, 1, 16),
           "8": (1, 1, 256)}


def format_for(bits: float) -> str:
  if bits == q.TERNARY:
    return "ternary"
  if bits in (1, 2, 3, 4):
    return str(int(bits))
  if bits in (5, 6, 7, 8):
    return "8"
  raise ValueError(f"No packed format for bits={bits}; supported: 1, 1.58, 2, ..., 8.")


def bytes_per_weight(fmt: str) -> float:
  per, nbytes, _ = FORMATS[fmt]
  return nbytes / per


def pack_codes(codes_KO: jax.Array, fmt: str) -> jax.Array:
  """int codes [K, O] in [0, levels) -> uint8 [ceil(K / per) * bytes_per_unit, O]."""
  per, nbytes, levels = FORMATS[fmt]
  k, o = codes_KO.shape
  units = -(-k // per)
  c = jnp.pad(codes_KO.astype(jnp.uint32), ((0, units * per - k), (0, 0)))
  c = c.reshape(units, per, o)
  if fmt == "ternary":
    word = jnp.sum(c * (3 ** jnp.arange(per, dtype=jnp.uint32))[None, :, None], axis=1)
  else:
    bits = int(math.log2(levels))
    word = jnp.sum(c << (bits * jnp.arange(per, dtype=jnp.uint32))[None, :, None], axis=1)
  out = jnp.stack([(word >> (8 * i)) & 0xFF for i in range(nbytes)], axis=1)  # [units, nbytes, O]
  return out.reshape(units * nbytes, o).astype(jnp.uint8)


def unpack_codes(packed: jax.Array, fmt: str, k: int) -> jax.Array:
  """Inverse of `pack_codes`: uint8 [bytes, O] -> int32 [k, O]."""
  per, nbytes, levels = FORMATS[fmt]
  o = packed.shape[-1]
  b = packed.astype(jnp.uint32).reshape(-1, nbytes, o)
  word = jnp.sum(b << (8 * jnp.arange(nbytes, dtype=jnp.uint32))[None, :, None], axis=1)  # [units, O]
  if fmt == "ternary":
    c = (word[:, None, :] // (3 ** jnp.arange(per, dtype=jnp.uint32))[None, :, None]) % 3
  else:
    bits = int(math.log2(levels))
    c = (word[:, None, :] >> (bits * jnp.arange(per, dtype=jnp.uint32))[None, :, None]) & (levels - 1)
  return c.reshape(-1, o)[:k].astype(jnp.int32)


@flax.struct.dataclass
class PackedWeight:
  """A packed `kernel[K, O]`: value[k, o] = (codebook[code] - zero) * scale of (group(k), o).

  When `hadamard_block` is set the values are the ROTATED weight `W H` and the layer rotates its
  input the same way; `act` is the activation quantizer the layer applies (or None).
  """

  codes: jax.Array  # uint8 [bytes(K), O]
  scale: jax.Array  # [K // group_size, O]
  zero: jax.Array | None  # [K // group_size, O] or None
  fmt: str = flax.struct.field(pytree_node=False)
  codebook: tuple[float, ...] = flax.struct.field(pytree_node=False)
  shape: tuple[int, int] = flax.struct.field(pytree_node=False)  # (K, O)
  group_size: int = flax.struct.field(pytree_node=False)
  hadamard_block: int | None = flax.struct.field(pytree_node=False, default=None)
  act: QuantSpec | None = flax.struct.field(pytree_node=False, default=None)

  def dequantize(self) -> jax.Array:
    """The float weight as [O, K] (the layout the fake-quant matmul uses)."""
    k, o = self.shape
    ng = k // self.group_size
    codes_OK = unpack_codes(self.codes, self.fmt, k).T
    c = q.Codes(codes_OK.reshape(o, ng, self.group_size), self.scale.T[:, :, None],
                None if self.zero is None else self.zero.T[:, :, None], self.codebook)
    return q.decode(c).reshape(o, k)

  @property
  def nbytes(self) -> int:
    return sum(int(x.size * x.dtype.itemsize) for x in jax.tree.leaves(self))

  @property
  def num_weights(self) -> int:
    return self.shape[0] * self.shape[1]


def pack(codes: q.Codes, shape: tuple[int, int], fmt: str, *, hadamard_block=None, act=None,
         scale_dtype=jnp.float32) -> PackedWeight:
  """Codes of an [O, NG, G] weight (from `policy.weight_codes`) -> PackedWeight of kernel [K, O]."""
  k, o = shape
  if len(codes.codebook) > FORMATS[fmt][2]:
    raise ValueError(f"{len(codes.codebook)} levels do not fit format {fmt!r}.")
  _, ng, g = codes.codes.shape
  codes_KO = codes.codes.reshape(o, k).T
  scale = jnp.broadcast_to(codes.scale, (o, ng, 1))[..., 0].T.astype(scale_dtype)
  zero = None if codes.zero is None else codes.zero[..., 0].T.astype(jnp.uint8)  # in [0, 255]
  return PackedWeight(pack_codes(codes_KO, fmt), scale, zero, fmt, codes.codebook, (k, o), g,
                      hadamard_block, act)


def is_packed(x: Any) -> bool:
  return isinstance(x, PackedWeight)

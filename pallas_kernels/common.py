"""What every kernel module shares: the implementation names, pallas_call output types, padding.

`impl` names an implementation explicitly, never chosen by the environment:

- "xla": the pure-XLA path (any backend; the CPU default).
- "pallas": the TPU (Mosaic) kernel.
- "pallas_interpret": the TPU kernel in TPU interpret mode on CPU (race detection on): tests.
- "pallas_gpu": the GPU (Triton) kernel.
- "pallas_gpu_interpret": the GPU kernel in Pallas' generic interpret mode on CPU: tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

IMPLS = ("xla", "pallas", "pallas_interpret", "pallas_gpu", "pallas_gpu_interpret")
TPU_IMPLS = ("pallas", "pallas_interpret")
GPU_IMPLS = ("pallas_gpu", "pallas_gpu_interpret")


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"Unknown kernel implementation {impl!r}; choose one of {IMPLS} "
                     "('xla' on any backend, 'pallas' on TPU, 'pallas_gpu' on NVIDIA GPUs, "
                     "'pallas_interpret' / 'pallas_gpu_interpret' to test those kernels on CPU).")


def check_backend(impl: str) -> None:
  """A kernel for the other accelerator fails here, naming the right one. (On CPU a compiled
  kernel can still be exported for its platform; running it fails in JAX's lowering.)"""
  backend = jax.default_backend()
  if impl == "pallas" and backend == "gpu":
    raise ValueError("impl 'pallas' (quant.kernels) is the TPU Mosaic kernel; on this GPU set "
                     "'pallas_gpu' (the Triton kernel) or 'xla'.")
  if impl == "pallas_gpu" and backend == "tpu":
    raise ValueError("impl 'pallas_gpu' (quant.kernels) is the GPU Triton kernel; on this TPU "
                     "set 'pallas' (the Mosaic kernel) or 'xla'.")


def check_block_sizes(block_sizes, impl: str, tpu_type: type, gpu_type: type) -> None:
  """`block_sizes` (None: the kernel's defaults) must be the dataclass of `impl`'s kernel."""
  want = gpu_type if impl in GPU_IMPLS else tpu_type if impl in TPU_IMPLS else None
  if block_sizes is not None and want is not None and not isinstance(block_sizes, want):
    raise TypeError(f"impl={impl!r} takes block_sizes of type {want.__module__}.{want.__name__}, "
                    f"got {type(block_sizes).__name__}.")


def out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
  """A pallas_call output type that varies over every manual mesh axis any input varies over
  (what `shard_map(check_vma=True)` needs to type the kernel's result)."""
  mats = [jax.typeof(a).mat for a in inputs]
  varying = frozenset().union(*(m.varying for m in mats))
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))


def interpret_params():
  """TPU interpret mode with race detection and NaN-filled uninitialised memory (CPU tests)."""
  return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")


def round_up(v: int, m: int) -> int:
  return -(-v // m) * m


def pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
  """Zero-pads a 2-D array to [rows, cols]; no op (no copy) when it already has that shape."""
  if a.shape == (rows, cols):
    return a
  return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def next_pow2(v: int) -> int:
  return 1 << max(0, int(v) - 1).bit_length()


def pow2_divisor(v: int) -> int:
  """The largest power of two dividing v (v > 0)."""
  return v & -v

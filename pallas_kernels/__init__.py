"""Pallas kernels for jaxllm: the fast Walsh–Hadamard transform, the packed low-bit matmul and the
fused Hadamard rotation + QuEST activation quantization.

Each op's module holds the kernel body, a jitted wrapper (block sizes in a frozen dataclass, the
implementation chosen explicitly by `impl`: see `pallas_kernels.common`) and a pure-jnp
reference. The TPU (Mosaic) kernels live in `hadamard`, `lowbit_matmul` and `rotate_quantize`;
the GPU (Triton) variants in `hadamard_gpu` and `lowbit_matmul_gpu`, reached through the same
wrappers with impl="pallas_gpu".
"""

from pallas_kernels.hadamard import fwht, fwht_reference

__all__ = ["fwht", "fwht_reference"]

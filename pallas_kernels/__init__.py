"""Pallas kernels for jaxllm: the fast Walsh–Hadamard transform and the packed low-bit matmul.

Each module holds the kernel body, a jitted wrapper (block sizes in a frozen dataclass, the
implementation chosen explicitly by `impl`) and a pure-jnp reference.
"""

from pallas_kernels.hadamard import fwht, fwht_reference

__all__ = ["fwht", "fwht_reference"]

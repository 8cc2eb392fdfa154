"""jaxllm: language models and super-resolution models in JAX/Flax, sharded over device meshes."""

__version__ = "0.1.0"

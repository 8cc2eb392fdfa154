"""Test set-up: 8 simulated CPU devices, strict rank promotion, float32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAXLLM_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

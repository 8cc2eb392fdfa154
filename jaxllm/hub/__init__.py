"""Checkpoint import and export in Hugging Face layouts (safetensors)."""

from __future__ import annotations

from jaxllm.hub.deepseek import load_hf_deepseek
from jaxllm.hub.llama import config_from_hf, config_to_hf, load_hf_llama, save_hf_llama

__all__ = ["config_from_hf", "config_to_hf", "load_hf_deepseek", "load_hf_llama",
           "save_hf_llama"]

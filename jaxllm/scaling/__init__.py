"""Back-of-the-envelope scaling: chip specs, rooflines, model accounting, collective costs and
a parallelism planner (after "How to Scale Your Model", jax-ml/scaling-book).

The tutorials under `docs/tutorials/` run every number here against the library.
"""

from jaxllm.scaling.accounting import (ParamBreakdown, attention_flops, forward_flops,
                                       kv_cache_bytes, llama3_70b, matmul_params,
                                       mla_kv_cache_bytes, param_breakdown, param_bytes,
                                       training_days, training_flops)
from jaxllm.scaling.chips import CHIPS, H100, H200, TPU_V4P, TPU_V5E, TPU_V5P, TPU_V6E, Chip, chip
from jaxllm.scaling.collectives import (CollectiveCost, all_gather_cost, all_reduce_cost,
                                        all_to_all_cost, chip_collective_cost, reduce_scatter_cost,
                                        ring_all_gather, ring_all_reduce, ring_all_to_all,
                                        ring_reduce_scatter)
from jaxllm.scaling.hlo import collective_counts, compiled_collectives
from jaxllm.scaling.inference import (DecodeStep, critical_decode_batch, decode_step,
                                      max_kv_tokens, min_chips, prefill_time)
from jaxllm.scaling.planner import Plan, StepModel, plan, step_model
from jaxllm.scaling.roofline import (Roofline, arithmetic_intensity, critical_batch, matmul_bytes,
                                     matmul_flops, matmul_intensity, matmul_roofline, roofline)

__all__ = [
    "CHIPS", "H100", "H200", "TPU_V4P", "TPU_V5E", "TPU_V5P", "TPU_V6E", "Chip", "chip",
    "Roofline", "arithmetic_intensity", "critical_batch", "matmul_bytes", "matmul_flops",
    "matmul_intensity", "matmul_roofline", "roofline",
    "ParamBreakdown", "attention_flops", "forward_flops", "kv_cache_bytes", "llama3_70b",
    "matmul_params", "mla_kv_cache_bytes", "param_breakdown", "param_bytes", "training_days",
    "training_flops",
    "CollectiveCost", "all_gather_cost", "all_reduce_cost", "all_to_all_cost",
    "chip_collective_cost", "reduce_scatter_cost", "ring_all_gather", "ring_all_reduce",
    "ring_all_to_all", "ring_reduce_scatter",
    "collective_counts", "compiled_collectives",
    "DecodeStep", "critical_decode_batch", "decode_step", "max_kv_tokens", "min_chips",
    "prefill_time",
    "Plan", "StepModel", "plan", "step_model",
]

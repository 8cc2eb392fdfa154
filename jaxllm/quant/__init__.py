"""Quantization-aware training and packed export as transforms over unchanged Linen models.

- `quantizers`: ParetoQ, QuEST, BitNet, min-max, abs-max fake-quantizers with custom VJPs.
- `hadamard`: the blockwise Hadamard rotation (`hadamard_transform`).
- `policy`: regex rules over module paths -> `QuantSpec`s; `Policy.apply(model)`.
- `transforms`: optax pieces (trust-mask masking, FP -> QAT switch, scale-parameter optimizer).
- `matquant`: Matryoshka nested int8/4/2 slices, joint multi-width loss, Mix'n'Match.
- `packing`, `ptq`: packed integer codes + scales, post-training quantization, size reports.
"""

from jaxllm.quant import matquant, transforms  # modules; the MatQuant spec is policy.matquant
from jaxllm.quant.hadamard import hadamard_matrix, hadamard_transform
from jaxllm.quant.packing import PackedWeight
from jaxllm.quant.policy import (Policy, QuantizedModel, QuantSpec, Rule, absmax, bitnet,
                                 bitnet_act, minmax, packed_intercept, paretoq, quest, uniform)
from jaxllm.quant.ptq import SizeReport, mixed_precision_policy, quantize_params

__all__ = ["PackedWeight", "Policy", "QuantSpec", "QuantizedModel", "Rule", "SizeReport",
           "absmax", "bitnet", "bitnet_act", "hadamard_matrix", "hadamard_transform", "matquant",
           "minmax", "mixed_precision_policy", "packed_intercept", "paretoq", "quantize_params",
           "quest", "transforms", "uniform"]

"""Packed export: exact round trips, bytes per weight, packed logits == fake-quant logits, PTQ."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import quant
from jaxllm.models import llama
from jaxllm.quant import packing
from jaxllm.quant import policy as pol

BYTES_PER_WEIGHT = {"1": 1 / 8, "ternary": 1 / 5, "2": 1 / 4, "3": 3 / 8, "4": 1 / 2, "8": 1.0}


@pytest.mark.parametrize("fmt", list(packing.FORMATS))
def test_pack_unpack_round_trip_and_bytes(fmt):
  levels = packing.FORMATS[fmt][2]
  for k in (120, 37):  # 120 is a whole number of units for every format; 37 needs padding
    codes = jax.random.randint(jax.random.key(k), (k, 24), 0, levels)
    packed = packing.pack_codes(codes, fmt)
    assert packed.dtype == jnp.uint8
    np.testing.assert_array_equal(packing.unpack_codes(packed, fmt, k), codes)
  assert packed.size / codes.size <= BYTES_PER_WEIGHT[fmt] * 1.1 + 1 / 37
  full = packing.pack_codes(jnp.full((120, 24), levels - 1), fmt)
  assert full.size / (120 * 24) == BYTES_PER_WEIGHT[fmt] == packing.bytes_per_weight(fmt)
  np.testing.assert_array_equal(packing.unpack_codes(full, fmt, 120), levels - 1)


SPECS = [quant.paretoq(1), quant.paretoq(1.58), quant.paretoq(2), quant.paretoq(3),
         quant.paretoq(4, group_size=32), quant.quest(4, 64), quant.quest(1.58, None),
         quant.bitnet(), quant.minmax(4, group_size=16), quant.absmax(8)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}{s.bits}g{s.group_size}")
def test_packed_weight_dequantizes_to_fake_quant(spec):
  kernel = jax.random.normal(jax.random.key(0), (128, 48)) * 0.02
  w_OK = kernel.T
  if spec.hadamard_block:
    w_OK = quant.hadamard_transform(w_OK, spec.hadamard_block)
  alpha = pol.init_alpha(w_OK, spec) * 0.9 if spec.method == "paretoq" else None
  fake = pol.quantize_weight(w_OK, spec, alpha)
  packed = packing.pack(pol.weight_codes(w_OK, spec, alpha), kernel.shape,
                        packing.format_for(spec.bits))
  np.testing.assert_array_equal(packed.dequantize(), fake)
  n_scales = packed.scale.size * (1 if packed.zero is None else 2)
  expected = kernel.size * BYTES_PER_WEIGHT[packed.fmt] + 4 * packed.scale.size + (
      0 if packed.zero is None else packed.zero.size)
  assert packed.nbytes == pytest.approx(expected, rel=0.05), n_scales


POLICY = quant.Policy((
    quant.Rule(r"layers_0/.*", quant.paretoq(4)),
    quant.Rule(r"layers_\d+/attn/.*", quant.quest(4, 64), quant.quest(4, 64)),
    quant.Rule(r"layers_\d+/mlp/(gate|up)_proj", quant.paretoq(1.58)),
    quant.Rule(r"layers_\d+/mlp/down_proj", quant.paretoq(2, group_size=64)),
))


def test_packed_model_logits_equal_fake_quant_and_size():
  cfg = llama.tiny(n_layers=2)
  model = POLICY.apply(llama.Llama(cfg))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16)), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
  # perturb the learned scales, as training would, so the export must use the trained ones
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 0.8 if pol.QUANT_SCALE in jax.tree_util.keystr(p) else v, params)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  fake = apply(params, tokens)
  packed, report = quant.quantize_params(params, POLICY)
  assert isinstance(packed["layers_1"]["attn"]["q_proj"]["kernel"], quant.PackedWeight)
  assert pol.QUANT_SCALE not in packed["layers_0"]["attn"]["q_proj"]
  logits = apply(packed, tokens)
  np.testing.assert_allclose(logits, fake, rtol=1e-3, atol=1e-3 * float(jnp.abs(fake).max()))
  # packed bytes of each quantized kernel: bits/8 x weights + scales (float32), within 5%
  for layer in report.layers:
    if layer.fmt in packing.FORMATS:
      k = _get(packed, layer.path)
      expected = layer.num_weights * BYTES_PER_WEIGHT[layer.fmt] + 4 * k.scale.size
      assert layer.nbytes == pytest.approx(expected, rel=0.05), layer
  # excluded tensors (embeddings, lm_head, norms) are carried over untouched
  np.testing.assert_array_equal(packed["lm_head"]["kernel"], params["lm_head"]["kernel"])
  assert report.layers[0].fmt == "float32" and 2 < report.quantized_bits_per_weight < 5
  assert "whole model" in report.table()


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def test_ptq_mixed_precision_policy_and_report():
  cfg = llama.tiny(n_layers=2)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(jax.jit(llama.Llama(cfg).init)(jax.random.key(0), tokens))["params"]
  policy = quant.mixed_precision_policy(2, high=quant.minmax(8), low=quant.paretoq(1.58))
  packed, report = quant.quantize_params(params, policy)
  fmts = {l.path: l.fmt for l in report.layers}
  assert fmts["layers_0/mlp/up_proj/kernel"] == "8"
  assert fmts["layers_1/attn/o_proj/kernel"] == "8"
  assert fmts["layers_1/mlp/up_proj/kernel"] == "ternary"
  assert fmts["lm_head/kernel"] == "float32"
  logits = jax.jit(lambda p: quant.QuantizedModel(llama.Llama(cfg), policy).apply(
      {"params": p}, tokens)[0])(packed)
  assert bool(jnp.all(jnp.isfinite(logits)))
  with pytest.raises(ValueError, match=r"rule 0 \(pattern 'nope'\) matched no 2-D kernel"):
    quant.quantize_params(params, quant.uniform(quant.paretoq(2), pattern="nope"))

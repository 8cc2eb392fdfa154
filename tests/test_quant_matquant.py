"""MatQuant: slicing identities, joint multi-width loss, any-width extraction, Mix'n'Match."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import quant
from jaxllm.models import llama
from jaxllm.quant import matquant, packing
from jaxllm.quant import quantizers as q
from jaxllm.train.step import lm_loss_fn

S = lambda v, r: int(q.slice_codes(jnp.asarray(v), r))


def test_slicing_identities():
  codes = jnp.arange(256)
  np.testing.assert_array_equal(q.slice_codes(codes, 8), codes)
  assert sorted(set(np.asarray(q.slice_codes(codes, 2)).tolist())) == [0, 64, 128, 192]
  assert S(255, 2) == 192 and S(255, 4) == 240  # clamped, not wrapped to 256
  assert S(S(24, 4), 2) == 64 and S(24, 2) == 0  # always slice from the parent
  for r in range(1, 9):
    s = q.slice_codes(codes, r)
    step = 2 ** (8 - r)
    assert int(jnp.max(s % step)) == 0 and len(set(np.asarray(s).tolist())) == 2 ** r
    inside = codes < 256 - step / 2
    assert int(jnp.max(jnp.abs(s - codes)[inside])) <= step // 2


def test_slices_share_the_parent_scale_and_zero():
  w = jax.random.normal(jax.random.key(0), (16, 64))
  parent = q.minmax_codes(w, 8)
  for r in (8, 4, 2):
    c = q.matquant_codes(w, r)
    np.testing.assert_array_equal(c.scale, parent.scale)
    np.testing.assert_array_equal(c.zero, parent.zero)
    np.testing.assert_array_equal(q.decode(c), q.decode(parent._replace(
        codes=q.slice_codes(parent.codes, r))))
  np.testing.assert_array_equal(q.decode(q.matquant_codes(w, 8)), q.decode(parent))


def test_joint_loss_extraction_and_mix_n_match():
  cfg = llama.tiny(n_layers=1)
  model = llama.Llama(cfg)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 17)), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :-1]))["params"]
  batch = {"tokens": tokens}
  lams = {8: 1.0, 4: 0.5, 2: 2.0}
  joint = jax.jit(jax.value_and_grad(matquant.joint_loss_fn(model, 258, lams), has_aux=True))
  (total, weight), grads = joint(params, batch, None)
  per = jax.jit(lambda p: matquant.per_width_losses(model, p, tokens, 258, (8, 4, 2)))(params)
  assert float(total / weight) == pytest.approx(sum(l * float(per[r]) for r, l in lams.items()),
                                                rel=1e-5)
  assert float(jnp.abs(grads["layers_0"]["mlp"]["up_proj"]["kernel"]).sum()) > 0
  fp = jax.jit(lm_loss_fn(model, 258))(params, batch, None)
  assert float(per[8]) == pytest.approx(float(fp[0] / fp[1]), rel=1e-3)
  # Mix'n'Match (attention at int8, MLP at int2), packed, gives the fake-quant logits
  policy = matquant.width_policy({r"layers_0/attn/.*": 8, r"layers_0/mlp/.*": 2})
  packed, report = quant.quantize_params(params, policy)
  run = jax.jit(lambda p: policy.apply(model).apply({"params": p}, tokens[:, :-1])[0])
  np.testing.assert_allclose(run(packed), run(params), rtol=1e-3, atol=1e-5)
  fmts = {l.path: l.fmt for l in report.layers}
  assert fmts["layers_0/attn/q_proj/kernel"] == "8" and fmts["layers_0/mlp/up_proj/kernel"] == "2"
  k = packed["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert isinstance(k, quant.PackedWeight)
  assert k.codes.size == k.num_weights * packing.bytes_per_weight("2")

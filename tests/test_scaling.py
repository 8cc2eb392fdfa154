"""jaxllm.scaling: accounting against eval_shape, rooflines, collective closed forms, planner."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import scaling
from jaxllm.models import llama


def _eval_shape_params(cfg):
  model = llama.Llama(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  shapes = shapes["params"]  # not the `perturbations` collection
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", ["tiny", "small", "mobilellm_125m", "mobilellm_350m",
                                  "llama3_8b"])
def test_param_breakdown_matches_eval_shape(name):
  cfg = llama.preset(name)
  breakdown = scaling.param_breakdown(cfg)
  assert breakdown.total == cfg.num_params() == _eval_shape_params(cfg)


def test_llama3_70b_accounting():
  cfg = scaling.llama3_70b()
  b = scaling.param_breakdown(cfg)
  # The book adds rounded parts (56.3 + 2.1 + 12.0 = 70.4e9); exactly it is 70.55e9.
  assert b.mlp == pytest.approx(56.37e9, rel=1e-3)
  assert b.embedding == pytest.approx(2.10e9, rel=1e-2)
  assert b.attention == pytest.approx(12.08e9, rel=1e-3)
  assert cfg.num_params() == pytest.approx(70.4e9, rel=0.005)
  flops = scaling.training_flops(cfg, 15e12)
  assert flops == pytest.approx(6.3e24, rel=0.02)
  assert scaling.training_days(flops, 8960, scaling.TPU_V5P, mfu=0.4) == pytest.approx(44, rel=0.02)
  # int8 KV cache per token: 2 x 80 layers x 8 heads x 128 dims = 160 KiB
  assert scaling.kv_cache_bytes(cfg, seq_len=1, bytes_per_elem=1) == 160 * 1024


def test_flops_per_token_consistent():
  cfg = llama.small()
  tokens, seq = 4 * 256, 256
  fwd = scaling.forward_flops(cfg, 4, seq, causal=True)
  # LlamaConfig.flops_per_token counts the norm weights as matmul weights too: 1e-3 apart.
  assert scaling.training_flops(cfg, tokens, seq) == pytest.approx(3 * fwd, rel=1e-3)
  assert scaling.attention_flops(cfg, 4, seq) == 2 * scaling.attention_flops(cfg, 4, seq, True)


def test_kv_cache_mha_gqa_mla():
  mha = scaling.llama3_70b(n_kv_heads=64)
  gqa = scaling.llama3_70b()
  assert scaling.kv_cache_bytes(mha, 1024) == 8 * scaling.kv_cache_bytes(gqa, 1024)
  # DeepSeek-V3: 61 layers, latent 512 + rope 64
  assert scaling.mla_kv_cache_bytes(61, 512, 64, seq_len=1) == 61 * 576 * 2


def test_chip_intensities():
  assert scaling.TPU_V5E.critical_intensity == pytest.approx(240, rel=0.01)
  assert scaling.critical_batch(scaling.TPU_V5E, w_bytes=1) == pytest.approx(120, rel=0.01)
  assert scaling.TPU_V5P.ici_critical_intensity == pytest.approx(2550, rel=1e-3)
  assert scaling.TPU_V5P.ici_critical_intensity / 3 == pytest.approx(850, rel=1e-3)
  assert scaling.H100.critical_intensity == pytest.approx(295, rel=0.01)
  assert scaling.chip("H200").hbm_bytes == 141e9
  with pytest.raises(ValueError, match="Unknown chip"):
    scaling.chip("v99")


def test_matmul_roofline():
  chip = scaling.TPU_V5E
  d = f = 8192
  # intensity tends to B for B << D, F
  assert scaling.matmul_intensity(64, d, f) == pytest.approx(64, rel=0.02)
  assert scaling.matmul_roofline(64, d, f, chip).bound == "memory"
  assert scaling.matmul_roofline(1024, d, f, chip).bound == "compute"
  r = scaling.roofline(1e12, 1e9, chip, comm_bytes=1e9)
  assert r.t_math == pytest.approx(1e12 / 1.97e14)
  assert r.t_comms == pytest.approx(1e9 / 9e10)
  assert r.bound == "comms" and 0 < r.mfu < 1


def test_collective_closed_forms():
  v, w = 1e9, 4.5e10
  for x in (2, 4, 16):
    ag = scaling.all_gather_cost(v, x, w)
    assert ag.time == pytest.approx(v * (x - 1) / x / (2 * w))
    assert ag.hops == (x - 1) / 2
    assert scaling.reduce_scatter_cost(v, x, w).time == pytest.approx(ag.time)
    assert scaling.all_reduce_cost(v, x, w).time == pytest.approx(2 * ag.time)
    assert scaling.all_to_all_cost(v, x, w).time == pytest.approx(ag.time / 4)
    uni = scaling.all_gather_cost(v, x, w, bidirectional=False)
    assert uni.time == pytest.approx(2 * ag.time)
  # ~ V / W_bidi for large X, independent of X; latency-bound for tiny arrays
  assert scaling.all_gather_cost(v, 256, w).time == pytest.approx(v / (2 * w), rel=0.01)
  small = scaling.all_gather_cost(1e3, 16, w)
  assert small.latency_bound and small.time == pytest.approx(7.5e-6)
  assert scaling.all_gather_cost(v, 1, w).time == 0.0
  assert scaling.chip_collective_cost("all-reduce", v, 4, scaling.TPU_V5E, n_axes=2).time == (
      pytest.approx(scaling.all_reduce_cost(v, 4, w).time / 2))


def test_ring_collectives_match_lax():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  x = jax.device_put(jnp.arange(8 * 16 * 3, dtype=jnp.float32).reshape(128, 3),
                     NamedSharding(mesh, P("x")))

  def run(f):
    return np.asarray(jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))(x))

  pairs = [
      (scaling.ring_all_gather, lambda s: jax.lax.all_gather(s, "x", tiled=True)),
      (scaling.ring_reduce_scatter, lambda s: jax.lax.psum_scatter(s, "x", tiled=True)),
      (scaling.ring_all_reduce, lambda s: jax.lax.psum(s, "x")),
      (scaling.ring_all_to_all, lambda s: jax.lax.all_to_all(s, "x", 0, 0, tiled=True)),
  ]
  for ours, ref in pairs:
    np.testing.assert_allclose(run(lambda s, ours=ours: ours(s, "x")), run(ref))


def test_planner_llama3_70b_matches_book(capsys):
  p = scaling.plan(scaling.llama3_70b(), 8960, scaling.TPU_V5P, batch_tokens=4 * 2**20,
                   seq_len=4096)
  printed = capsys.readouterr().out
  assert "X_opt" in printed and "2,550" in printed
  # The book: ~1024-way data/FSDP x 2-way sequence x 4-way tensor.
  assert 512 <= p.batch_parallel <= 2048
  assert 1 <= p.sequence <= 4
  assert 1024 <= p.data_parallel <= 4096
  assert 2 <= p.tensor <= 8
  assert (p.data, p.fsdp, p.tensor, p.sequence) == (2, 1024, 4, 2)
  assert p.chips_used == 8192 and p.step.t_math >= p.step.t_comms
  assert dict(p.rules)["length"] == "data" and dict(p.rules)["batch"] == "fsdp"


def test_planner_small_model_uses_data_parallelism():
  p = scaling.plan(llama.tiny(), 8, scaling.TPU_V5E, batch_tokens=8 * 64, seq_len=64,
                   verbose=False)
  assert (p.data, p.fsdp, p.tensor, p.sequence) == (8, 1, 1, 1)
  assert dict(p.rules)["batch"] == ("data", "fsdp")
  # Big batch per chip: FSDP alone is compute-bound, no tensor parallelism needed.
  q = scaling.plan(llama.llama3_8b(), 64, scaling.TPU_V5P, batch_tokens=2**20 * 4,
                   verbose=False)
  assert q.tensor == 1 and q.step.t_math > q.step.t_comms
  with pytest.raises(ValueError, match="whole number"):
    scaling.plan(llama.tiny(), 8, scaling.TPU_V5E, batch_tokens=100, seq_len=64)

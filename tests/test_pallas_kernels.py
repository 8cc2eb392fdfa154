"""Pallas kernels: every kernel in TPU interpret mode (race detection on) against its pure-jnp
reference, forward and gradients; TPU lowering (Mosaic custom call) on this CPU machine;
shard_map on 8 simulated devices equals one device; the packed model on the kernels equals XLA
(TPU and GPU kernels; the GPU kernels' own tests are in test_pallas_gpu.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import quant
from jaxllm.models import llama
from jaxllm.quant import packing
from pallas_kernels import hadamard as hk
from pallas_kernels import lowbit_matmul as lb
from pallas_kernels import rotate_quantize as rq

S = jax.ShapeDtypeStruct
FORMATS = list(lb.KERNEL_FORMATS)


def _close(y, ref, tol):
  y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
  np.testing.assert_allclose(y, ref, rtol=0, atol=tol * max(1.0, float(np.abs(ref).max())))


def _lowers(fn, *args):
  exp = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  return "tpu_custom_call" in exp.mlir_module()


# ------------------------------------------------------------------------------------- FWHT
# (shape, block): whole axis, butterflies across 128-lane chunks, blocks sharing 128-lane rows,
# rows narrower than 128 lanes, rows that are not a multiple of the 8-row block (padding)
FWHT_CASES = [((3, 5, 64), None), ((2, 3, 1024), None), ((7, 512), 128), ((4, 256), 32),
              ((5, 96), 32), ((1, 2048), 512), ((9, 128), 1)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,block", FWHT_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_fwht_matches_dense_reference_and_its_gradient(shape, block, dtype, impl):
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
  w = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  y = hk.fwht(x, block, impl=impl)
  assert y.dtype == dtype and y.shape == shape
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  _close(y, hk.fwht_reference(x, block), tol)
  loss = lambda f: lambda v: jnp.sum(f(v).astype(jnp.float32) * w)
  g = jax.grad(loss(lambda v: hk.fwht(v, block, impl=impl)))(x)
  g_ref = jax.grad(loss(lambda v: hk.fwht_reference(v, block)))(x)
  _close(g, g_ref, tol)


def test_fwht_is_an_involution_and_the_xla_path_handles_32768():
  n = 32768
  x = jax.random.normal(jax.random.key(0), (2, n))
  y = hk.fwht(x)
  _close(hk.fwht(y), x, 1e-5)
  np.testing.assert_allclose(jnp.sum(y ** 2), jnp.sum(x ** 2), rtol=1e-5)  # orthogonal
  # closed form for a few outputs: H[i, j] = (-1)^popcount(i & j) / sqrt(n)
  i = np.array([0, 1, 777, 12345, n - 1])
  j = np.arange(n)
  signs = np.where(np.array([bin(v).count("1") % 2 for v in (i[:, None] & j).ravel()]).reshape(
      len(i), n), -1.0, 1.0)
  expect = np.asarray(x, np.float64) @ signs.T / np.sqrt(n)
  np.testing.assert_allclose(np.asarray(y)[:, i], expect, rtol=0, atol=1e-4)
  assert hk.kron_factors(4096) == [64, 64] and hk.kron_factors(32768) == [32, 32, 32]


def test_quest_rotation_uses_the_transform():
  x = jax.random.normal(jax.random.key(0), (4, 256))
  dense = x.reshape(4, 2, 128) @ quant.hadamard_matrix(128)
  for impl in ("xla", "pallas_interpret"):
    _close(quant.hadamard_transform(x, 128, impl), dense.reshape(4, 256), 1e-5)


@pytest.mark.parametrize("n,block,dtype", [(128, None, jnp.float32), (4096, None, jnp.bfloat16),
                                           (32768, None, jnp.float32), (512, 128, jnp.bfloat16),
                                           (96, 32, jnp.float32), (1024, 64, jnp.float32)])
def test_fwht_lowers_for_tpu(n, block, dtype):
  assert _lowers(lambda x: hk.fwht(x, block, impl="pallas"), S((16, n), dtype))


def test_fwht_bad_input():
  with pytest.raises(ValueError, match="power of two"):
    hk.fwht(jnp.ones((2, 48)))
  with pytest.raises(ValueError, match="does not divide"):
    hk.fwht(jnp.ones((2, 96)), 64)
  with pytest.raises(ValueError, match="choose one of"):
    hk.fwht(jnp.ones((2, 64)), impl="cuda")
  with pytest.raises(TypeError, match="floating"):
    hk.fwht(jnp.ones((2, 64), jnp.int32))
  with pytest.raises(ValueError, match="multiple of 8"):
    hk.BlockSizes(block_rows=12)


# ------------------------------------------------------------------ fused rotate + quantize
# (bits, shape, block, dtype): blocks of 128 (one MXU chunk each), of 32 sharing 128-lane
# chunks, of 256 (butterflies across chunks), and a 96-wide row (one narrow chunk); row padding
RQ_CASES = [(4, (5, 256), 128, jnp.float32), (2, (3, 4, 256), 32, jnp.bfloat16),
            (quant.quantizers.TERNARY, (7, 512), 256, jnp.float32), (1, (6, 96), 32, jnp.float32)]


def _same_codes_up_to_ties(codes, ref, x, block, levels, alpha, step):
  """Codes equal the reference's, except by one grid step where the exact value is a tie."""
  y = np.asarray(hk.fwht_reference(x.astype(jnp.float32), block), np.float64)
  y = y.reshape(-1, y.shape[-1])
  s = alpha * (np.sqrt(np.mean(y ** 2, axis=-1, keepdims=True)) + rq.EPS)
  u = (y / s + 1) * ((levels - 1) / 2)
  diff = (np.asarray(codes, np.int32) - np.asarray(ref, np.int32)).reshape(u.shape)
  tie = np.abs(u - np.floor(u) - 0.5) < 1e-4
  assert np.all((diff == 0) | ((np.abs(diff) == step) & tie))


@pytest.mark.parametrize("bits,shape,block,dtype", RQ_CASES, ids=lambda v: str(v))
def test_rotate_quantize_equals_hadamard_then_quantize(bits, shape, block, dtype):
  x = (3 * jax.random.normal(jax.random.key(0), shape, jnp.float32)).astype(dtype)
  levels, alpha = quant.quantizers.num_levels(bits), quant.quantizers.quest_alpha(bits)
  # what packed QuEST inference computes unfused: rotate, then the int8 form of the quantizer
  ref_codes, ref_scale = quant.policy.integer_activation(
      quant.hadamard_transform(x.astype(jnp.float32), block), quant.quest(bits, None))
  oracle = rq.rotate_quantize_reference(x, block, levels, alpha)
  step = 1 if levels % 2 else 2
  for impl in ("xla", "pallas_interpret"):
    codes, scale = rq.rotate_quantize(x, block, levels, alpha, impl=impl)
    assert codes.dtype == jnp.int8 and codes.shape == shape and scale.shape == shape[:-1]
    _same_codes_up_to_ties(codes, ref_codes, x, block, levels, alpha, step)
    _same_codes_up_to_ties(codes, oracle[0], x, block, levels, alpha, step)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    np.testing.assert_allclose(scale, oracle[1], rtol=1e-6)


@pytest.mark.parametrize("k,block,dtype", [(4096, 128, jnp.bfloat16), (1024, 1024, jnp.float32),
                                           (256, 32, jnp.float32), (96, 32, jnp.bfloat16)])
def test_rotate_quantize_lowers_for_tpu(k, block, dtype):
  assert _lowers(lambda x: rq.rotate_quantize(x, block, 16, 2.51393, impl="pallas"),
                 S((64, k), dtype))


def test_rotate_quantize_bad_input():
  with pytest.raises(ValueError, match="no GPU kernel: use impl='xla'"):
    rq.rotate_quantize(jnp.ones((2, 128)), 128, 16, 2.5, impl="pallas_gpu_interpret")
  with pytest.raises(ValueError, match="no int8 form"):
    rq.rotate_quantize(jnp.ones((2, 128)), 128, 256, 3.9)
  with pytest.raises(ValueError, match="multiple of 32"):
    rq.BlockSizes(block_rows=8)


# ---------------------------------------------------------------------------- low-bit matmul
def _packed(fmt, k, n, group, *, zero=False, seed=0, codebook=None):
  levels = lb.Layout(fmt, (0.0, 1.0), k, k).levels
  rng = np.random.default_rng(seed)
  codes = packing.pack_codes(jnp.asarray(rng.integers(0, levels, (k, n))), fmt)
  cb = codebook or tuple(float(-1 + 2 * i / (levels - 1)) for i in range(levels))
  scale = jnp.asarray(rng.uniform(0.5, 1.5, (k // group, n)), jnp.float32)
  z = jnp.asarray(rng.integers(0, levels, (k // group, n)), jnp.uint8) if zero else None
  return codes, scale, z, lb.Layout(fmt, cb, k, group)


# (M, K, N, group): everything padded (M, K, N off the blocks); whole blocks; per-group scales
MATMUL_CASES = [(5, 200, 130, None), (16, 1280, 256, None), (3, 640, 136, 80)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m,k,n,group", MATMUL_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("fmt", FORMATS)
def test_lowbit_matmul_matches_reference_and_gradients(fmt, m, k, n, group, dtype):
  codes, scale, zero, layout = _packed(fmt, k, n, group or k, zero=group is not None)
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dtype)
  ref = lb.lowbit_matmul_reference(x, codes, scale, zero, None, layout)
  y = lb.lowbit_matmul(x, codes, scale, zero, layout=layout, impl="pallas_interpret")
  assert y.dtype == dtype and y.shape == (m, n)
  tol = 2e-6 if dtype == jnp.float32 else 1e-2
  _close(y, ref, tol)
  if dtype == jnp.bfloat16 and (m, k, n, group) != MATMUL_CASES[0]:
    return  # bf16 gradients: checked on the padded shape (the f32 ones on every shape)
  w = jax.random.normal(jax.random.key(2), (m, n))

  def loss(f):
    return lambda x, s: jnp.sum(f(x, s).astype(jnp.float32) * w)

  kern = loss(lambda x, s: lb.lowbit_matmul(x, codes, s, zero, layout=layout,
                                            impl="pallas_interpret"))
  refl = loss(lambda x, s: lb.lowbit_matmul_reference(x, codes, s, zero, None, layout))
  gx, gs = jax.grad(kern, argnums=(0, 1))(x, scale)
  rx, rs = jax.grad(refl, argnums=(0, 1))(x.astype(jnp.float32), scale)
  assert gx.dtype == dtype
  _close(gx, rx, tol)
  _close(gs, rs, tol)  # (bf16: the cotangent of a bf16 output is itself rounded to bf16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_activations_accumulate_exactly_in_int32(fmt):
  m, k, n = 8, 1280, 256
  codes, scale, _, layout = _packed(fmt, k, n, k, seed=3)
  x = jax.random.randint(jax.random.key(4), (2, m // 2, k), -127, 128).astype(jnp.int8)
  xs = jax.random.uniform(jax.random.key(5), (2, m // 2), minval=0.01, maxval=0.02)
  y = lb.lowbit_matmul(x, codes, scale, None, xs, layout=layout, impl="pallas_interpret")
  assert y.dtype == jnp.float32 and y.shape == (2, m // 2, n)
  # exact integer reference: int64 dot of the signed codes, then the affine epilogue in float64
  c = np.asarray(lb.unpack(codes, layout), np.int64)
  xi = np.asarray(x, np.int64).reshape(m, k)
  a, b = layout.affine
  w = (a + b * c) * np.asarray(scale, np.float64)
  ref = (xi @ w) * np.asarray(xs, np.float64).reshape(m, 1)
  np.testing.assert_allclose(np.asarray(y).reshape(m, n), ref, rtol=2e-6,
                             atol=2e-6 * np.abs(ref).max())


LOWER_CASES = [(1, 8192, 8192, None, jnp.bfloat16), (64, 1280, 512, 160, jnp.float32),
               (32, 1280, 512, None, jnp.int8)]


@pytest.mark.parametrize("m,k,n,group,dtype", LOWER_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("fmt", FORMATS)
def test_lowbit_matmul_lowers_for_tpu(fmt, m, k, n, group, dtype):
  layout = lb.Layout(fmt, (0.0, 1.0), k, group or k)
  integer = dtype == jnp.int8
  args = (S((m, k), dtype), S((layout.units, n), jnp.uint8), S((k // layout.group_size, n),
          jnp.float32), S((m,), jnp.float32) if integer else None)

  def fn(x, c, s, xs):
    return lb.lowbit_matmul(x, c, s, None, xs, layout=layout, impl="pallas")

  assert _lowers(fn, *args)


def test_lowbit_matmul_bad_input():
  codes, scale, _, layout = _packed("2", 256, 128, 256)
  x = jnp.ones((4, 256))
  with pytest.raises(ValueError, match="No low-bit matmul kernel for format '3'"):
    lb.Layout("3", tuple(map(float, range(8))), 256, 256)
  with pytest.raises(ValueError, match="affine codebook"):
    lb.Layout("2", (-1.0, -0.2, 0.1, 1.0), 256, 256)
  with pytest.raises(ValueError, match="features but the packed weight has K = 256"):
    lb.lowbit_matmul(jnp.ones((4, 128)), codes, scale, layout=layout)
  with pytest.raises(ValueError, match="per-token x_scale"):
    lb.lowbit_matmul(x.astype(jnp.int8), codes, scale, layout=layout)
  with pytest.raises(ValueError, match=r"scale \(and zero\) must be \[1, 128\]"):
    lb.lowbit_matmul(x, codes, scale[:, :64], layout=layout)
  with pytest.raises(ValueError, match="choose one of"):
    lb.lowbit_matmul(x, codes, scale, layout=layout, impl="triton")
  with pytest.raises(ValueError, match="multiple of 128"):
    lb.BlockSizes(bn=100)
  grouped = lb.Layout("ternary", (-1.0, 0.0, 1.0), 240, 24)  # 24 is not a multiple of 5 codes
  with pytest.raises(ValueError, match="multiple of the 5 codes per byte"):
    lb.lowbit_matmul(jnp.ones((2, 240)), jnp.zeros((48, 128), jnp.uint8),
                     jnp.ones((10, 128)), layout=grouped, impl="pallas_interpret")


# ------------------------------------------------------------------------- sharded and in models
@pytest.mark.parametrize("impl", ["pallas_interpret", "pallas_gpu_interpret"])
def test_kernels_under_shard_map_on_8_devices_equal_one_device(impl):
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  codes, scale, zero, layout = _packed("2", 512, 256, 128, zero=True)
  x = jax.random.normal(jax.random.key(0), (32, 512))

  def mm(x, c, s, z):
    return lb.lowbit_matmul(x, c, s, z, layout=layout, impl=impl)

  # JAX's generic interpreter (GPU interpret mode) loses the manual-axis types of its grid loop's
  # carry under check_vma; the compiled GPU kernel keeps them (test_pallas_gpu exports it for
  # CUDA under shard_map with check_vma on)
  vma = impl != "pallas_gpu_interpret"
  specs = (P("data"), P(None, "model"), P(None, "model"), P(None, "model"))
  args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, codes, scale, zero), specs)]
  sharded = jax.jit(jax.shard_map(mm, mesh=mesh, in_specs=specs, out_specs=P("data", "model"),
                                  check_vma=vma))
  out = sharded(*args)
  assert len(out.sharding.device_set) == 8
  _close(out, mm(x, codes, scale, zero), 1e-6)

  def rot(x):
    return hk.fwht(x, 128, impl=impl)

  rows = P(("data", "model"))
  xs = jax.device_put(x, NamedSharding(mesh, rows))
  _close(jax.jit(jax.shard_map(rot, mesh=mesh, in_specs=rows, out_specs=rows, check_vma=vma))(xs),
         rot(x), 1e-6)


POLICIES = {  # weight-only: the whole model must agree (activation quantizers amplify float
    # rounding differences into code flips, so layers with them are compared one by one below)
    "paretoq_quest_grouped": quant.Policy((
        quant.Rule(r"layers_0/.*", quant.paretoq(4)),
        quant.Rule(r"layers_\d+/attn/.*", quant.quest(4, 64)),
        quant.Rule(r"layers_\d+/mlp/(gate|up)_proj", quant.paretoq(1.58)),
        quant.Rule(r"layers_\d+/mlp/down_proj", quant.paretoq(2, group_size=64)))),
    "bitnet": quant.uniform(quant.bitnet()),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_packed_model_on_kernels_equals_xla(name):
  policy = POLICIES[name]
  model = policy.apply(llama.Llama(llama.tiny(n_layers=2)))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16)), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
  packed, _ = quant.quantize_params(params, policy)
  logits = {}
  for kernels in ("xla", "pallas_interpret", "pallas_gpu_interpret"):
    m = dataclasses.replace(policy, kernels=kernels).apply(model.model)
    logits[kernels] = jax.jit(lambda p, t, m=m: m.apply({"params": p}, t)[0])(packed, tokens)
  ref = logits["xla"]
  _close(logits["pallas_interpret"], ref, 1e-5)
  _close(logits["pallas_gpu_interpret"], ref, 1e-5)
  with quant.packed_intercept("pallas_interpret"):
    again = jax.jit(lambda p, t: model.model.apply({"params": p}, t)[0])(packed, tokens)
  _close(again, ref, 1e-5)


@pytest.mark.parametrize("weight,act", [(quant.quest(4, 64), quant.quest(4, 64)),
                                        (quant.bitnet(), quant.bitnet_act())],
                         ids=["quest_w4a4", "bitnet_w1.58a8"])
def test_packed_dense_integer_path_equals_xla(weight, act):
  """QuEST W4A4 and BitNet W1.58A8: int8 activations x packed codes, int32 accumulation."""
  dense = nn.Dense(96, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 16, 128))
  params = dense.init(jax.random.key(1), x)["params"]
  packed, _ = quant.quantize_params({"proj": params}, quant.uniform(weight, act,
                                                                     pattern="proj"))
  assert isinstance(packed["proj"]["kernel"], quant.PackedWeight)
  xq = quant.hadamard_transform(x, act.hadamard_block) if act.hadamard_block else x
  assert quant.policy.integer_activation(xq, act) is not None  # the int8 path applies
  out = {}
  for kernels in ("xla", "pallas_interpret", "pallas_gpu_interpret"):
    with quant.packed_intercept(kernels):
      out[kernels] = jax.jit(lambda p, x: dense.apply({"params": p}, x))(packed["proj"], x)
  _close(out["pallas_interpret"], out["xla"], 1e-5)
  _close(out["pallas_gpu_interpret"], out["xla"], 1e-5)


def test_integer_activation_form_is_exact():
  x = jax.random.normal(jax.random.key(0), (3, 64))
  for spec in (quant.quest(4, None), quant.bitnet_act(), quant.quest(2, None)):
    x_int, xs = quant.policy.integer_activation(x, spec)
    assert x_int.dtype == jnp.int8
    np.testing.assert_allclose(x_int.astype(jnp.float32) * xs[:, None],
                               quant.policy.quantize_act(x, spec), rtol=1e-6, atol=1e-7)
  assert quant.policy.integer_activation(x, quant.minmax(4)) is None  # zero point: float path


def test_kernels_choice_is_explicit_in_config():
  from jaxllm.config import QuantConfig
  cfg = QuantConfig(rules=({"pattern": ".*", "weight": "quest:4"},), kernels="pallas")
  assert cfg.policy().kernels == "pallas" and QuantConfig().kernels == "xla"
  gpu = dataclasses.replace(cfg, kernels="pallas_gpu")
  assert gpu.policy().kernels == "pallas_gpu"
  with pytest.raises(ValueError, match="quant.kernels='gpu'"):
    QuantConfig(kernels="gpu")
  with pytest.raises(ValueError, match="choose one of"):
    quant.Policy((), kernels="auto")


def test_kernel_benchmark_script_runs(capsys):
  import importlib.util
  from pathlib import Path
  spec = importlib.util.spec_from_file_location(
      "bench_kernels", Path(__file__).parents[1] / "experiments" / "bench" / "kernels.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rows = bench.main(["--quick"])
  assert {r["op"] for r in rows} == {"fwht", "matmul_2"}
  for r in rows:
    assert r["ms"] > 0 and 0 < r["roofline"] and r["bytes"] > 0
  # bytes moved by a packed 2-bit weight: a quarter byte per weight plus the scales
  mm = next(r for r in rows if r["op"] == "matmul_2" and r["shape"] == "1x1024x1024")
  assert mm["bytes"] == 1024 * 1024 // 4 + 1024 * 4 + 2 * 1024 + 2 * 1024
  assert "roofline" in capsys.readouterr().out
  # the GPU device check's own code path, on the GPU kernels in interpret mode at tiny shapes
  rows = bench.main(["--quick", "--device-check"])
  assert bench.failures(rows) == 0 and not any("error" in r for r in rows)
  kern = [r for r in rows if r["impl"] == "pallas_gpu_interpret"]
  assert {r["op"] for r in kern} == {"gemv_2", "gemv_4_a8", "gemm_2", "fwht"}
  assert all(r["err"] < 1e-2 and r["us"] > 0 for r in kern)
  gemv = next(r for r in kern if r["op"] == "gemv_2")
  assert gemv["bytes"] == 256 * 256 // 4 + 256 * 4 + 2 * 256 + 2 * 256 and gemv["speedup"] > 0
  assert all(r["vs_copy"] > 0 for r in kern if r["op"] == "fwht")
  assert "target: packed 2-bit GEMV" in capsys.readouterr().out

"""GPU (Pallas Triton) kernels: each in interpret mode on CPU against its pure-jnp reference,
forward and gradients, every bit width, f32 and bf16, shapes that need padding; and lowered for
CUDA on this CPU machine, the Triton module inside the custom call parsed and verified."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir
from jax._src.lib import version as jaxlib_version
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as tt_dialect
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.quant import packing
from pallas_kernels import hadamard as hk
from pallas_kernels import hadamard_gpu as hg
from pallas_kernels import lowbit_matmul as lb
from pallas_kernels import lowbit_matmul_gpu as lg

S = jax.ShapeDtypeStruct
FORMATS = list(lb.KERNEL_FORMATS)
TRITON_CALL = "__gpu$xla.gpu.triton"


def _close(y, ref, tol):
  y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
  np.testing.assert_allclose(y, ref, rtol=0, atol=tol * max(1.0, float(np.abs(ref).max())))


def _triton_modules(fn, *args) -> list[str]:
  """Exports `fn` for CUDA and returns the verified text of every Triton module it launches.

  jaxlib 0.10.2 lowers a Pallas GPU kernel to the custom call `__gpu$xla.gpu.triton` carrying
  the Triton MLIR module (XLA compiles it to PTX when the program is compiled on a GPU), so the
  lowering needs no GPU; `verify()` runs the Triton dialect's op verifiers on it. (PTX itself
  needs the CUDA plugin's compiler: `jax._src.lib.triton.has_compilation_handler("cuda")` is
  False on a CPU-only jaxlib.) From jax 0.11 the lowering reads the compute capability from a GPU
  device (jax/_src/pallas/triton/pallas_call_registration.py), which a CPU-only machine lacks."""
  if jaxlib_version > (0, 10, 2) and jax.default_backend() != "gpu":
    pytest.skip("from jax 0.11 lowering a Triton kernel for CUDA needs a GPU device to read its "
                "compute capability; this check runs on jaxlib 0.10.2 or on a GPU")
  allow = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]  # no stable ABI: ours only
  exp = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=allow)(*args)
  blobs = []

  def walk(op):
    if (op.name == "stablehlo.custom_call"
        and ir.StringAttr(op.attributes["call_target_name"]).value == TRITON_CALL):
      config = ir.DictAttr(op.attributes["mhlo.backend_config"])
      blobs.append(ir.StringAttr(config["ir"]).value_bytes)
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          walk(child.operation)

  with mlir.make_ir_context():
    walk(ir.Module.parse(exp.mlir_module()).operation)
  ctx = ir.Context()
  ctx.append_dialect_registry(mlir.upstream_dialects)
  tt_dialect.register_dialect(ctx)
  ctx.load_all_available_dialects()
  texts = []
  with ctx:
    for blob in blobs:
      module = ir.Module.parse(blob)
      assert module.operation.verify()
      texts.append(str(module))
  return texts


# ------------------------------------------------------------------------------------- FWHT
# (shape, block, block sizes): 64 and 32 wide (one dot, rows padded to the block), blocks of 4
# sharing 16-wide rows (block count padded), 128 (QuEST), 1024 = 32 x 32 (two dots, a program per
# row), 2048 = 32 x 64 with two rows per program and an odd row count (padding)
FWHT_CASES = [((3, 5, 64), None, None), ((5, 96), 32, None), ((9, 8), 4, None),
              ((7, 512), 128, None), ((2, 3, 1024), None, None),
              ((3, 2048), None, hg.BlockSizes(block_rows=2))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,block,bs", FWHT_CASES, ids=lambda v: str(v))
def test_fwht_gpu_matches_dense_reference_and_its_gradient(shape, block, bs, dtype):
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
  w = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
  y, vjp = jax.vjp(lambda v: hk.fwht(v, block, impl="pallas_gpu_interpret", block_sizes=bs), x)
  y_ref, vjp_ref = jax.vjp(lambda v: hk.fwht_reference(v, block), x)
  assert y.dtype == dtype and y.shape == shape
  tol = 2e-6 if dtype == jnp.float32 else 1e-2
  _close(y, y_ref, tol)
  _close(vjp(w)[0], vjp_ref(w)[0], tol)


@pytest.mark.parametrize("n,block,dtype", [(128, None, jnp.float32), (96, 32, jnp.bfloat16),
                                           (64, 4, jnp.float32), (4096, None, jnp.bfloat16),
                                           (16384, None, jnp.float32)])
def test_fwht_gpu_lowers_for_cuda(n, block, dtype):
  [text] = _triton_modules(lambda x: hk.fwht(x, block, impl="pallas_gpu"), S((16, n), dtype))
  assert "tt.dot" in text and "tt.store" in text
  assert "extern" not in text  # +-1 matrices from integer ops, no intrinsics


def test_fwht_gpu_bad_input():
  with pytest.raises(ValueError, match="up to 16384.*impl='xla'"):
    hk.fwht(jnp.ones((1, 32768)), impl="pallas_gpu_interpret")
  with pytest.raises(TypeError, match="hadamard_gpu.BlockSizes"):
    hk.fwht(jnp.ones((2, 64)), impl="pallas_gpu_interpret", block_sizes=hk.BlockSizes())
  with pytest.raises(ValueError, match="power of two >= 16"):
    hk.fwht(jnp.ones((2, 64)), impl="pallas_gpu_interpret",
            block_sizes=hg.BlockSizes(block_rows=24))
  assert [hg.split_factors(b) for b in (256, 2048, 16384)] == [(16, 16), (32, 64), (128, 128)]


# ---------------------------------------------------------------------------- low-bit matmul
def _packed(fmt, k, n, group, *, zero=False, seed=0):
  levels = lb.Layout(fmt, (0.0, 1.0), k, k).levels
  rng = np.random.default_rng(seed)
  codes = packing.pack_codes(jnp.asarray(rng.integers(0, levels, (k, n))), fmt)
  cb = tuple(float(-1 + 2 * i / (levels - 1)) for i in range(levels))
  scale = jnp.asarray(rng.uniform(0.5, 1.5, (k // group, n)), jnp.float32)
  z = jnp.asarray(rng.integers(0, levels, (k // group, n)), jnp.uint8) if zero else None
  return codes, scale, z, lb.Layout(fmt, cb, k, group)


def _group(fmt):
  return 16 * lb.KERNEL_FORMATS[fmt][0]  # 16 code bytes: a power of two, as the kernel needs


# (M, K, N, grouped, block sizes, dtypes): the default GEMV (M = 1) and GEMM (M = 5), padded in
# M, K and N; per-group scales with zero points on the tensor-core path; a 2-row GEMV over
# groups with K split over two programs
MATMUL_CASES = [(1, 200, 130, False, None, "f32 bf16"), (5, 200, 130, False, None, "f32 bf16"),
                (3, 640, 136, True, None, "f32"),
                (2, 640, 136, True, lg.BlockSizes(bm=1, bku=16, split_k=2), "f32")]
MATMUL_PARAMS = [(fmt, *case[:5], dt) for fmt in FORMATS for case in MATMUL_CASES
                 for dt in case[5].split()]


@pytest.mark.parametrize("fmt,m,k,n,grouped,bs,dt", MATMUL_PARAMS, ids=lambda v: str(v))
def test_lowbit_matmul_gpu_matches_reference_and_gradients(fmt, m, k, n, grouped, bs, dt):
  dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dt]
  codes, scale, zero, layout = _packed(fmt, k, n, _group(fmt) if grouped else k, zero=grouped)
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dtype)
  w = jax.random.normal(jax.random.key(2), (m, n), jnp.float32).astype(dtype)

  def kern(x, s):
    return lb.lowbit_matmul(x, codes, s, zero, layout=layout, impl="pallas_gpu_interpret",
                            block_sizes=bs)

  y, vjp = jax.vjp(kern, x, scale)
  y_ref, vjp_ref = jax.vjp(lambda x, s: lb.lowbit_matmul_reference(x, codes, s, zero, None,
                                                                   layout), x, scale)
  assert y.dtype == dtype and y.shape == (m, n)
  # f32: sums in another order than the reference's, and the GEMV's values 1 + c / 2^bits
  # (lowbit_matmul_gpu._codes) give up a bit or two to cancellation: ~1e-6 of the output's scale
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  _close(y, y_ref, tol)
  (gx, gs), (rx, rs) = vjp(w), vjp_ref(w.astype(jnp.float32))
  assert gx.dtype == dtype
  _close(gx, rx, tol)
  _close(gs, rs, tol)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lowbit_matmul_gpu_int8_activations_are_exact(fmt):
  """int8 x codes in int32 (tensor-core dot at M = 8, GEMV at M = 1; per-group for 4-bit, groups
  of 32 bytes: int8 dots take at least 32 along K)."""
  k, n = 640, 128
  group = 2 * _group(fmt) if fmt == "4" else k
  codes, scale, _, layout = _packed(fmt, k, n, group, seed=3)
  c = np.asarray(lb.unpack(codes, layout), np.int64)
  a, b = layout.affine
  w = ((a + b * c).reshape(k // group, group, n) * np.asarray(scale, np.float64)[:, None]
       ).reshape(k, n)
  for m in (8, 1):
    x = jax.random.randint(jax.random.key(m), (m, k), -127, 128).astype(jnp.int8)
    xs = jax.random.uniform(jax.random.key(5), (m,), minval=0.01, maxval=0.02)
    y = lb.lowbit_matmul(x, codes, scale, None, xs, layout=layout, impl="pallas_gpu_interpret")
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    ref = (np.asarray(x, np.int64) @ w) * np.asarray(xs, np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())


LOWER_CASES = [(1, 8192, 8192, False, jnp.bfloat16, None),  # the decode GEMV of the benchmark
               (64, 1280, 512, True, jnp.float32, None),
               (32, 1280, 512, False, jnp.int8, None),
               (1, 1280, 512, False, jnp.int8, lg.BlockSizes(bm=1, split_k=4))]


@pytest.mark.parametrize("m,k,n,grouped,dtype,bs", LOWER_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("fmt", FORMATS)
def test_lowbit_matmul_gpu_lowers_for_cuda(fmt, m, k, n, grouped, dtype, bs):
  layout = lb.Layout(fmt, (0.0, 1.0), k, _group(fmt) if grouped else k)
  integer = dtype == jnp.int8
  args = (S((m, k), dtype), S((layout.units, n), jnp.uint8),
          S((k // layout.group_size, n), jnp.float32), S((m,), jnp.float32) if integer else None)

  def fn(x, c, s, xs):
    return lb.lowbit_matmul(x, c, s, None, xs, layout=layout, impl="pallas_gpu", block_sizes=bs)

  [text] = _triton_modules(fn, *args)
  gemv = m == 1
  assert ("tt.dot" in text) != gemv  # tensor-core dots for M > 1, CUDA-core GEMV for M = 1
  assert "scf.for" in text  # the loop over K inside the program
  dots = [line for line in text.splitlines() if "tt.dot" in line]
  assert all(("xi8>" in line) == integer for line in dots)  # int8 x int8 -> int32 dots


def test_kernels_lower_for_cuda_under_shard_map_with_typed_manual_axes():
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  layout = lb.Layout("2", (0.0, 1.0, 2.0, 3.0), 512, 128)
  specs = (P("data"), P(None, "model"), P(None, "model"))
  args = [S(shape, dtype, sharding=NamedSharding(mesh, spec)) for shape, dtype, spec in
          zip(((32, 512), (128, 256), (4, 256)), (jnp.bfloat16, jnp.uint8, jnp.float32), specs)]

  def mm(x, c, s):
    return hk.fwht(lb.lowbit_matmul(x, c, s, layout=layout, impl="pallas_gpu"), 128,
                   impl="pallas_gpu")

  sharded = jax.shard_map(mm, mesh=mesh, in_specs=specs, out_specs=P("data", "model"),
                          check_vma=True)
  assert len(_triton_modules(sharded, *args)) == 2


def test_lowbit_matmul_gpu_bad_input():
  codes, scale, _, layout = _packed("2", 640, 128, 40)  # a group is 10 bytes: steps of 2
  x = jnp.ones((4, 640))
  with pytest.raises(ValueError, match="multiple of 64, block_sizes with bm=1"):
    lb.lowbit_matmul(x, codes, scale, layout=layout, impl="pallas_gpu_interpret")
  y = lb.lowbit_matmul(x[:1], codes, scale, layout=layout, impl="pallas_gpu_interpret")
  _close(y, lb.lowbit_matmul_reference(x[:1], codes, scale, None, None, layout), 1e-5)
  with pytest.raises(TypeError, match="lowbit_matmul_gpu.BlockSizes"):
    lb.lowbit_matmul(x, codes, scale, layout=layout, impl="pallas_gpu_interpret",
                     block_sizes=lb.BlockSizes())
  for bad in (dict(bm=8), dict(bn=96), dict(bku=8), dict(split_k=0)):
    with pytest.raises(ValueError, match="must be"):
      lg.BlockSizes(**bad)
  assert lg.BlockSizes.for_shape(1, 8192, 2048) == lg.BlockSizes(bm=1, bn=64, bku=128)
  # 16 column blocks: K split 4 ways (each split keeps 4 steps of 128 bytes)
  assert lg.BlockSizes.for_shape(1, 1024, 2048).split_k == 4


def test_kernel_for_the_other_accelerator_fails_naming_the_right_one(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="set 'pallas_gpu'"):
    hk.fwht(jnp.ones((3, 64)), impl="pallas")
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  codes, scale, _, layout = _packed("4", 64, 128, 64)
  with pytest.raises(ValueError, match="set 'pallas'"):
    lb.lowbit_matmul(jnp.ones((3, 64)), codes, scale, layout=layout, impl="pallas_gpu")

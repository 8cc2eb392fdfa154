"""Kernel benchmark: the fast Walsh–Hadamard transform and the packed low-bit matmul.

For each op and shape this prints, measured in this one run with interleaved repeats (medians,
because shared machines are noisy):
  - the time of each implementation and its ratio to the op's XLA reference run alongside it;
  - the bytes it must move (inputs read once + output written once) and the FLOPs;
  - the fraction of this backend's roofline it reaches, where the roofline time is
    max(bytes / copy bandwidth, FLOPs / matmul FLOP/s), both MEASURED here first (a plain copy of
    a large array, and a dense matmul in the op's dtype).

Default rows (any backend):
  fwht   n in {128 (QuEST block), 1024, 4096, 32768}: the XLA Kronecker path ("xla") against
         the dense Hadamard matmul (the reference, skipped above n = 8192 where the dense matrix
         alone is 4 GiB) and against a plain copy of the same bytes.
  matmul M in {1, 16, 256} x K = N = 8192, packed 2-bit / 4-bit / ternary, per-channel
         scales: the packed path against a dense bf16 dot of the same shape.
The accelerator's Pallas kernels are timed too: "pallas" on a TPU, "pallas_gpu" (Triton) on a
GPU. On CPU only the XLA paths are timed (interpret mode is a simulator, not a speed); on CPU,
`--device-check --quick` runs the device check's code path on the GPU kernels in interpret mode
at tiny shapes (the test suite does), so that it cannot fail on a GPU for a reason visible here.

--device-check (GPU or TPU; the issue's accelerator targets, well under 5 minutes on an H100):
  gemv   M = 1, K = N = 8192, packed 1 / ternary / 2 / 4 / 8-bit and int8 activations x 4-bit,
         against the bf16 XLA dot (target: 2-bit >= 4x; the bytes allow 8x), with a sweep of the
         GEMV kernel's block sizes for 2 and 4 bits; M = 16 and 256 for context.
  fwht   n in {128, 1024, 4096, 16384}, 2^25 elements, against a plain copy of the same bytes
         (target: within 2x), with a sweep of rows per program.
  Every kernel's output is also checked against the XLA path on the device ("err" column; rows
  that fail to compile or disagree are marked and make the exit status 1). Each timing runs the
  op over several copies of its inputs inside one jitted program (more bytes than the L2 cache,
  one dispatch for all), so it measures HBM traffic, not L2 hits or Python dispatch.

    python experiments/bench/kernels.py [--quick] [--repeats 7] [--json out.json]
    PYTHONPATH=. python3 experiments/bench/kernels.py --device-check --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.quant import packing
from pallas_kernels import hadamard as hk
from pallas_kernels import hadamard_gpu as hg
from pallas_kernels import lowbit_matmul as lb
from pallas_kernels import lowbit_matmul_gpu as lg

L2_BYTES = 64 << 20  # more than an H100's / H200's L2 (50 / 60 MB): rotate inputs past it

# GEMV block sizes tried by --device-check (2 and 4 bits, M = 1): the default first
GEMV_SWEEP = [lg.BlockSizes(bm=1, bn=bn, bku=bku, split_k=sk, num_warps=nw, num_stages=ns)
              for bn, bku, sk, nw, ns in [(64, 128, 1, 4, 2), (32, 128, 1, 4, 2),
                                          (128, 64, 1, 4, 2), (64, 256, 1, 8, 2),
                                          (64, 128, 2, 4, 3), (32, 256, 2, 4, 3),
                                          (128, 128, 1, 8, 3), (64, 64, 4, 4, 2)]]
# rows per program tried for the transform: (n, BlockSizes)
FWHT_SWEEP = [(128, hg.BlockSizes(block_rows=br, num_warps=nw)) for br, nw in
              [(16, 4), (64, 4), (32, 8), (64, 8)]] + \
             [(1024, hg.BlockSizes(block_rows=br)) for br in (4, 16)] + \
             [(4096, hg.BlockSizes(block_rows=br, num_warps=nw)) for br, nw in
              [(2, 4), (4, 4), (1, 8), (4, 8)]] + \
             [(16384, hg.BlockSizes(num_warps=8))]


def _timer(fn, *args):
  out = fn(*args)
  jax.block_until_ready(out)

  def once():
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t

  return once


def interleaved(timers: dict, repeats: int) -> dict:
  """Median seconds of each timer, the timers run round-robin `repeats` times."""
  times = {k: [] for k in timers}
  for _ in range(repeats):
    for k, t in timers.items():
      times[k].append(t())
  return {k: statistics.median(v) for k, v in times.items()}


def machine_peaks(repeats: int, quick: bool, accelerator: bool = False) -> dict:
  """Measured copy bandwidth (bytes/s) and dense matmul FLOP/s (f32 and bf16) of this backend."""
  n = 1 << (22 if quick else 28 if accelerator else 25)  # 16 MiB, 1 GiB or 128 MiB of float32
  x = jnp.ones((n,), jnp.float32)
  copy = jax.jit(lambda v: v * 1.0001)  # read + write every byte once (not elided like a copy)
  d = 512 if quick else 8192 if accelerator else 2048
  a32 = jnp.ones((d, d), jnp.float32)
  a16 = a32.astype(jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  t = interleaved({"copy": _timer(copy, x), "mm32": _timer(mm, a32), "mm16": _timer(mm, a16)},
                  repeats)
  return {"bandwidth": 2 * 4 * n / t["copy"], "flops_f32": 2 * d ** 3 / t["mm32"],
          "flops_bf16": 2 * d ** 3 / t["mm16"]}


def roofline_fraction(seconds, bytes_moved, flops, peaks, dtype="f32"):
  ideal = max(bytes_moved / peaks["bandwidth"], flops / peaks[f"flops_{dtype}"])
  return ideal / seconds


def kernel_impl(backend: str, device_check_quick: bool) -> str | None:
  """The Pallas implementation this run times: the backend's own, or on CPU (--device-check
  --quick only) the GPU kernels in interpret mode (runs the GPU code path of this script; those
  times mean nothing)."""
  return {"tpu": "pallas", "gpu": "pallas_gpu"}.get(
      backend, "pallas_gpu_interpret" if device_check_quick else None)


# ------------------------------------------------------------------------------ default rows
def bench_fwht(sizes, rows_total, peaks, repeats, impl):
  out = []
  for n in sizes:
    rows = max(8, rows_total // n)
    x = jax.random.normal(jax.random.key(0), (rows, n), jnp.float32)
    timers = {"xla": _timer(jax.jit(lambda v, n=n: hk.fwht(v, n, impl="xla")), x),
              "copy": _timer(jax.jit(lambda v: v * 1.0001), x)}
    if n <= 8192:
      timers["dense"] = _timer(jax.jit(lambda v, n=n: hk.fwht_reference(v, n)), x)
    if impl and (impl != "pallas_gpu" and impl != "pallas_gpu_interpret"
                 or n <= hg.MAX_GPU_SIZE):
      timers[impl] = _timer(jax.jit(lambda v, n=n: hk.fwht(v, n, impl=impl)), x)
    t = interleaved(timers, repeats)
    nbytes = 2 * x.size * 4
    flops = x.size * (2 * sum(hk.kron_factors(n)))  # the XLA path's matmul FLOPs
    for name in [k for k in ("xla", impl) if k in t]:
      out.append({
          "op": "fwht", "shape": f"{rows}x{n}", "impl": name, "ms": 1e3 * t[name],
          "vs_dense": t["dense"] / t[name] if "dense" in t else None,
          "vs_copy": t[name] / t["copy"], "bytes": nbytes, "flops": flops,
          "roofline": roofline_fraction(t[name], nbytes, flops, peaks)})
  return out


def _packed_weight(fmt, k, n, seed=1):
  levels = lb.Layout(fmt, (0.0, 1.0), k, k).levels
  codes = jax.random.randint(jax.random.key(seed), (k, n), 0, levels)
  packed = packing.pack_codes(codes, fmt)
  cb = tuple(float(i - levels // 2) for i in range(levels))
  scale = jnp.full((1, n), 0.01, jnp.float32)
  return packed, scale, lb.Layout(fmt, cb, k, k)


def bench_matmul(ms, k, n, fmts, peaks, repeats, impl):
  out = []
  w16 = jax.random.normal(jax.random.key(2), (k, n), jnp.bfloat16)
  for fmt in fmts:
    codes, scale, layout = _packed_weight(fmt, k, n)
    for m in ms:
      x = jax.random.normal(jax.random.key(3), (m, k), jnp.bfloat16)
      timers = {"dense_bf16": _timer(jax.jit(lambda a, b: a @ b), x, w16)}
      for name in ("xla",) + ((impl,) if impl else ()):
        timers[name] = _timer(jax.jit(
            lambda a, c, s, name=name, layout=layout: lb.lowbit_matmul(
                a, c, s, layout=layout, impl=name)), x, codes, scale)
      t = interleaved(timers, repeats)
      flops = 2 * m * k * n
      nbytes = codes.size + scale.size * 4 + 2 * m * k + 2 * m * n
      dense_bytes = 2 * k * n + 2 * m * k + 2 * m * n
      for name in [i for i in ("xla", impl) if i in t]:
        out.append({
            "op": f"matmul_{fmt}", "shape": f"{m}x{k}x{n}", "impl": name, "ms": 1e3 * t[name],
            "vs_dense": t["dense_bf16"] / t[name], "bytes": nbytes, "dense_bytes": dense_bytes,
            "flops": flops, "roofline": roofline_fraction(t[name], nbytes, flops, peaks, "bf16"),
            "dense_roofline": roofline_fraction(t["dense_bf16"], dense_bytes, flops, peaks,
                                                "bf16")})
  return out


def print_default(rows):
  print(f"{'op':<16}{'shape':<18}{'impl':<22}{'ms':>9}{'x vs ref':>10}{'/ copy':>8}"
        f"{'MB moved':>10}{'roofline':>10}")
  for r in rows:
    ratio = "-" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}x"
    copy = f"{r['vs_copy']:.2f}" if "vs_copy" in r else "-"
    print(f"{r['op']:<16}{r['shape']:<18}{r['impl']:<22}{r['ms']:>9.3f}{ratio:>10}{copy:>8}"
          f"{r['bytes'] / 1e6:>10.2f}{r['roofline']:>10.1%}")
  print("x vs ref: the reference's time / this time (fwht: dense Hadamard matmul; matmul: dense "
        "bf16 dot of the same shape). / copy: time / a plain copy of the same bytes.")


# ------------------------------------------------------------------------------- device check
class DeviceCheck:
  """Times ops over rotating input copies in one jitted program; records failures as rows."""

  def __init__(self, impl: str, peaks: dict, repeats: int, deadline: float):
    self.impl, self.peaks, self.repeats, self.deadline = impl, peaks, repeats, deadline
    self.rows: list[dict] = []

  @staticmethod
  def copies(make, nbytes: int, quick: bool) -> list:
    """Enough input copies (from `make(seed)`) to exceed the L2 cache (2 when --quick)."""
    count = 2 if quick else max(2, math.ceil(4 * L2_BYTES / nbytes))
    return [make(seed) for seed in range(count)]


  def row(self, op_name, shape, impl, config, fn, arg_sets, nbytes, flops, *, ref_s=None,
          copy_s=None, ref_out=None, tol=None, dtype="bf16", sweep=False):
    """Times `fn` over `arg_sets`; with `ref_out`, first checks `fn(*arg_sets[0])` against it."""
    r = {"op": op_name, "shape": shape, "impl": impl, "config": config, "bytes": nbytes}
    if sweep and time.monotonic() > self.deadline:
      r["error"] = "skipped (time budget)"
      return self._done(r)
    try:
      many = jax.jit(lambda sets: [fn(*a) for a in sets])  # one program, back to back
      first = np.asarray(many(arg_sets)[0], np.float32)  # compiles; checked before timing
      if ref_out is not None:
        ref = np.asarray(ref_out, np.float32)
        r["err"] = float(np.abs(first - ref).max() / max(1e-30, np.abs(ref).max()))
        r["wrong"] = not r["err"] <= tol
      s = interleaved({"t": _timer(many, arg_sets)}, self.repeats)["t"] / len(arg_sets)
    except Exception as e:  # noqa: BLE001 -- a kernel that fails to build is a row, not a crash
      r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
      return self._done(r)
    r["us"] = 1e6 * s
    r["roofline"] = roofline_fraction(s, nbytes, flops, self.peaks, dtype)
    if ref_s is not None:
      r["speedup"] = ref_s / s
    if copy_s is not None:
      r["vs_copy"] = s / copy_s
    return self._done(r)

  def _done(self, r):
    self.rows.append(r)
    print(format_device_row(r), flush=True)  # as it comes: a run cut short still reports
    return r


def _config(bs) -> str:
  if bs is None:
    return "default"
  if isinstance(bs, lg.BlockSizes):
    return (f"bm{bs.bm} bn{bs.bn} bku{bs.bku} sk{bs.split_k} w{bs.num_warps} "
            f"st{bs.num_stages}")
  return f"rows{bs.block_rows} w{bs.num_warps} st{bs.num_stages}"


def check_matmul(dc: DeviceCheck, m, k, n, fmt, quick, *, int8=False, sweep=()):
  """One matmul shape: bf16 dot (the reference), the XLA packed path, the kernel (+ sweep)."""
  x = jax.random.normal(jax.random.key(3), (m, k), jnp.float32)
  xs = None
  if int8:
    xs = jnp.max(jnp.abs(x), axis=-1) / 127
    x = jnp.round(x / xs[:, None]).astype(jnp.int8)
  else:
    x = x.astype(jnp.bfloat16)
  _, _, layout = _packed_weight(fmt, k, n)
  packed_bytes = layout.units * n + 4 * n
  act_bytes = x.size * x.dtype.itemsize + 2 * m * n
  weights = dc.copies(lambda s: _packed_weight(fmt, k, n, seed=s)[:2], packed_bytes, quick)
  dense = dc.copies(lambda s: jax.random.normal(jax.random.key(100 + s), (k, n), jnp.bfloat16),
                    2 * k * n, quick)
  flops = 2 * m * k * n
  shape = f"{m}x{k}x{n}"
  op = f"{'gemv' if m == 1 else 'gemm'}_{fmt}" + ("_a8" if int8 else "")
  x16 = x.astype(jnp.bfloat16) if int8 else x
  ref = dc.row(op, shape, "bf16 dot", "-", lambda a, w: a @ w, [(x16, w) for w in dense],
               2 * k * n + act_bytes, flops)
  ref_s = ref.get("us", math.nan) * 1e-6

  def packed(impl, bs):
    def fn(a, c, s):
      return lb.lowbit_matmul(a, c, s, None, xs, layout=layout, impl=impl, block_sizes=bs,
                              out_dtype=jnp.bfloat16)
    return fn

  y_ref = lb.lowbit_matmul_reference(x, *weights[0], None, xs, layout)
  args = [(x, c, s) for c, s in weights]
  dc.row(op, shape, "xla", "dequant+dot", packed("xla", None), args, packed_bytes + act_bytes,
         flops, ref_s=ref_s)
  for i, bs in enumerate((None, *sweep)):
    dc.row(op, shape, dc.impl, _config(bs), packed(dc.impl, bs), args, packed_bytes + act_bytes,
           flops, ref_s=ref_s, ref_out=y_ref, tol=1e-2, sweep=i > 0)


def check_fwht(dc: DeviceCheck, n, elements, dtype, quick, sweep=()):
  rows = max(1, elements // n)
  itemsize = jnp.dtype(dtype).itemsize
  nbytes = 2 * rows * n * itemsize
  xs = dc.copies(lambda s: jax.random.normal(jax.random.key(s), (rows, n), jnp.float32
                                             ).astype(dtype), nbytes // 2, quick)
  args = [(x,) for x in xs]
  shape = f"{rows}x{n} {jnp.dtype(dtype).name}"
  copy = dc.row("fwht", shape, "copy", "x * 1.0001", lambda v: v * 1.0001, args, nbytes, 0)
  copy_s = copy.get("us", math.nan) * 1e-6
  flops = rows * n * 2 * sum(hk.kron_factors(n))
  dc.row("fwht", shape, "xla", "kronecker", lambda v: hk.fwht(v, n, impl="xla"), args, nbytes,
         flops, copy_s=copy_s, dtype="f32")
  y_ref = hk.fwht_reference(xs[0], n)
  tol = 2e-5 if dtype == jnp.float32 else 1e-2
  for i, bs in enumerate((None, *sweep)):
    dc.row("fwht", shape, dc.impl, _config(bs),
           lambda v, bs=bs: hk.fwht(v, n, impl=dc.impl, block_sizes=bs), args, nbytes, flops,
           copy_s=copy_s, ref_out=y_ref, tol=tol, dtype="f32", sweep=i > 0)


def device_check(impl: str, peaks: dict, repeats: int, quick: bool, budget_s: float):
  dc = DeviceCheck(impl, peaks, repeats, time.monotonic() + budget_s)
  print(DEVICE_HEADER, flush=True)
  gpu = impl.startswith("pallas_gpu")
  k = n = 256 if quick else 8192
  sweep = (GEMV_SWEEP[1:2] if quick else GEMV_SWEEP[1:]) if gpu else ()
  check_matmul(dc, 1, k, n, "2", quick, sweep=sweep)
  for fmt in ([] if quick else ["4", "1", "ternary", "8"]):
    check_matmul(dc, 1, k, n, fmt, quick, sweep=sweep if fmt == "4" else ())
  check_matmul(dc, 1, k, n, "4", quick, int8=True)
  for m in ([16] if quick else [16, 256]):
    check_matmul(dc, m, k, n, "2", quick)
  elements = 1 << (12 if quick else 25)
  sizes = [128] if quick else [128, 1024, 4096, 16384]
  for size in sizes:
    fs = [bs for s, bs in FWHT_SWEEP if s == size] if gpu else []
    check_fwht(dc, size, elements, jnp.float32, quick, sweep=fs[:1] if quick else fs)
  check_fwht(dc, 128, elements, jnp.bfloat16, quick)
  return dc.rows


DEVICE_HEADER = (f"{'op':<11}{'shape':<21}{'impl':<11}{'config':<27}{'us':>9}{'x ref':>7}"
                 f"{'/copy':>7}{'roof':>6}{'MB':>8}{'err':>9}")


def format_device_row(r) -> str:
  head = f"{r['op']:<11}{r['shape']:<21}{r['impl'][:10]:<11}{r['config']:<27}"
  if "error" in r:
    return f"{head}  FAILED {r['error']}"
  sp = f"{r['speedup']:.2f}" if "speedup" in r else "-"
  vc = f"{r['vs_copy']:.2f}" if "vs_copy" in r else "-"
  err = (f"{r['err']:.1e}" + ("!" if r["wrong"] else "")) if "err" in r else "-"
  return (f"{head}{r['us']:>9.1f}{sp:>7}{vc:>7}{r['roofline']:>6.0%}{r['bytes'] / 1e6:>8.1f}"
          f"{err:>9}")


def print_device_summary(rows, impl):
  print("x ref: bf16 XLA dot time / this time. /copy: time / a copy of the same bytes. roof: "
        "fraction of the measured copy-bandwidth (or matmul) roofline. err: max |kernel - XLA "
        "path| / max |XLA path| ('!' = above tolerance).")
  mine = [r for r in rows if r["impl"] == impl and "us" in r]
  gemv2 = [r for r in mine if r["op"] == "gemv_2"]
  if gemv2:
    best = max(gemv2, key=lambda r: r["speedup"])
    print(f"target: packed 2-bit GEMV >= 4x the bf16 dot (memory limit 8x): best "
          f"{best['speedup']:.2f}x ({best['config']}); default {gemv2[0]['speedup']:.2f}x")
  for size in (128, 4096):
    fw = [r for r in mine if r["op"] == "fwht" and r["shape"].endswith(f"x{size} float32")]
    if fw:
      best = min(fw, key=lambda r: r["vs_copy"])
      print(f"target: FWHT n={size} within 2x of a copy: best {best['vs_copy']:.2f}x "
            f"({best['config']}); default {fw[0]['vs_copy']:.2f}x")


def failures(rows) -> int:
  return sum(1 for r in rows if ("error" in r and not r["error"].startswith("skipped"))
             or r.get("wrong"))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="small shapes (a smoke test, seconds)")
  ap.add_argument("--device-check", action="store_true",
                  help="the GPU/TPU targets: GEMV and FWHT kernels vs bf16 dot and copy, block "
                       "size sweeps, correctness on the device (with --quick on CPU: the same "
                       "code path on the GPU kernels in interpret mode, tiny shapes)")
  ap.add_argument("--budget", type=float, default=200.0,
                  help="seconds after which --device-check skips the remaining sweep rows")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--json", default=None, help="also write the rows to this file")
  args = ap.parse_args(argv)
  backend = jax.default_backend()
  impl = kernel_impl(backend, args.quick and args.device_check)
  repeats = 3 if args.quick else args.repeats
  if args.device_check and impl is None:
    ap.error("--device-check needs a GPU or TPU (on CPU add --quick to run its code path on the "
             "GPU kernels in interpret mode)")
  peaks = machine_peaks(repeats, args.quick, accelerator=backend != "cpu")
  print(f"backend {backend} ({jax.devices()[0].device_kind}); jax {jax.__version__}; measured "
        f"copy bandwidth {peaks['bandwidth'] / 1e9:.1f} GB/s, matmul "
        f"{peaks['flops_f32'] / 1e9:.0f} GFLOP/s f32, {peaks['flops_bf16'] / 1e9:.0f} GFLOP/s "
        "bf16")
  if args.device_check:
    rows = device_check(impl, peaks, 1 if args.quick else repeats, args.quick, args.budget)
    print_device_summary(rows, impl)
  elif args.quick:
    rows = bench_fwht([128, 1024], 1 << 16, peaks, repeats, impl)
    rows += bench_matmul([1, 16], 1024, 1024, ["2"], peaks, repeats, impl)
    print_default(rows)
  else:
    rows = bench_fwht([128, 1024, 4096, 32768], 1 << 20, peaks, repeats, impl)
    rows += bench_matmul([1, 16, 256], 8192, 8192, ["2", "4", "ternary"], peaks, repeats,
                         impl)
    print_default(rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"backend": backend, "device": jax.devices()[0].device_kind,
                 "jax": jax.__version__, "peaks": peaks, "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  out = main()
  sys.exit(1 if failures(out) else 0)

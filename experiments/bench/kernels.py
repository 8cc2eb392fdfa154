"""Kernel benchmark: the fast Walsh–Hadamard transform and the packed low-bit matmul.

For each op and shape this prints, measured in this one run with interleaved repeats (medians,
because shared machines are noisy):
  - the time of each implementation and its ratio to the op's XLA reference run alongside it;
  - the bytes it must move (inputs read once + output written once) and the FLOPs;
  - the fraction of this backend's roofline it reaches, where the roofline time is
    max(bytes / copy bandwidth, FLOPs / matmul FLOP/s), both MEASURED here first (a plain copy of
    a large array, and a dense matmul in the op's dtype).

Rows:
  fwht   n in {128 (QuEST block), 1024, 4096, 32768}: the XLA Kronecker path ("xla") against
         the dense Hadamard matmul (the reference, skipped above n = 8192 where the dense matrix
         alone is 4 GiB) and against a plain copy of the same bytes.
  matmul M in {1, 16, 256} x K = N = 8192, packed 2-bit / 4-bit / ternary, per-channel
         scales: the packed path against a dense bf16 dot of the same shape.
On a TPU the Pallas kernels ("pallas") are timed too; on CPU and GPU only the XLA paths run (the
Mosaic kernels only run on TPU; interpret mode is a simulator, not a speed).

    python experiments/bench/kernels.py [--quick] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.quant import packing
from pallas_kernels import hadamard as hk
from pallas_kernels import lowbit_matmul as lb


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


def machine_peaks(repeats: int, quick: bool) -> dict:
  """Measured copy bandwidth (bytes/s) and dense matmul FLOP/s (f32 and bf16) of this backend."""
  n = 1 << (22 if quick else 25)  # 16 MiB or 128 MiB of float32
  x = jnp.ones((n,), jnp.float32)
  copy = jax.jit(lambda v: v * 1.0001)  # read + write every byte once (not elided like a copy)
  d = 512 if quick else 2048
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


def bench_fwht(sizes, rows_total, peaks, repeats, on_tpu):
  out = []
  for n in sizes:
    rows = max(8, rows_total // n)
    x = jax.random.normal(jax.random.key(0), (rows, n), jnp.float32)
    timers = {"xla": _timer(jax.jit(lambda v, n=n: hk.fwht(v, n, impl="xla")), x),
              "copy": _timer(jax.jit(lambda v: v * 1.0001), x)}
    if n <= 8192:
      timers["dense"] = _timer(jax.jit(lambda v, n=n: hk.fwht_reference(v, n)), x)
    if on_tpu:
      timers["pallas"] = _timer(jax.jit(lambda v, n=n: hk.fwht(v, n, impl="pallas")), x)
    t = interleaved(timers, repeats)
    nbytes = 2 * x.size * 4
    flops = x.size * (2 * sum(hk.kron_factors(n)))  # the XLA path's matmul FLOPs
    for impl in [k for k in ("xla", "pallas") if k in t]:
      out.append({
          "op": "fwht", "shape": f"{rows}x{n}", "impl": impl, "ms": 1e3 * t[impl],
          "vs_dense": t["dense"] / t[impl] if "dense" in t else None,
          "vs_copy": t[impl] / t["copy"], "bytes": nbytes, "flops": flops,
          "roofline": roofline_fraction(t[impl], nbytes, flops, peaks)})
  return out


def _packed_weight(fmt, k, n):
  levels = lb.Layout(fmt, (0.0, 1.0), k, k).levels
  codes = jax.random.randint(jax.random.key(1), (k, n), 0, levels)
  packed = packing.pack_codes(codes, fmt)
  cb = tuple(float(i - levels // 2) for i in range(levels))
  scale = jnp.full((1, n), 0.01, jnp.float32)
  return packed, scale, lb.Layout(fmt, cb, k, k)


def bench_matmul(ms, k, n, fmts, peaks, repeats, on_tpu):
  out = []
  w16 = jax.random.normal(jax.random.key(2), (k, n), jnp.bfloat16)
  for fmt in fmts:
    codes, scale, layout = _packed_weight(fmt, k, n)
    for m in ms:
      x = jax.random.normal(jax.random.key(3), (m, k), jnp.bfloat16)
      timers = {"dense_bf16": _timer(jax.jit(lambda a, b: a @ b), x, w16)}
      for impl in ("xla",) + (("pallas",) if on_tpu else ()):
        timers[impl] = _timer(jax.jit(
            lambda a, c, s, impl=impl, layout=layout: lb.lowbit_matmul(
                a, c, s, layout=layout, impl=impl)), x, codes, scale)
      t = interleaved(timers, repeats)
      flops = 2 * m * k * n
      nbytes = codes.size + scale.size * 4 + 2 * m * k + 2 * m * n
      dense_bytes = 2 * k * n + 2 * m * k + 2 * m * n
      for impl in [i for i in ("xla", "pallas") if i in t]:
        out.append({
            "op": f"matmul_{fmt}", "shape": f"{m}x{k}x{n}", "impl": impl, "ms": 1e3 * t[impl],
            "vs_dense": t["dense_bf16"] / t[impl], "bytes": nbytes, "dense_bytes": dense_bytes,
            "flops": flops, "roofline": roofline_fraction(t[impl], nbytes, flops, peaks, "bf16"),
            "dense_roofline": roofline_fraction(t["dense_bf16"], dense_bytes, flops, peaks,
                                                "bf16")})
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="small shapes (a smoke test, seconds)")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--json", default=None, help="also write the rows to this file")
  args = ap.parse_args(argv)
  backend = jax.default_backend()
  on_tpu = backend == "tpu"
  repeats = 3 if args.quick else args.repeats
  peaks = machine_peaks(repeats, args.quick)
  print(f"backend {backend} ({jax.devices()[0].device_kind}); measured copy bandwidth "
        f"{peaks['bandwidth'] / 1e9:.1f} GB/s, matmul {peaks['flops_f32'] / 1e9:.0f} GFLOP/s f32, "
        f"{peaks['flops_bf16'] / 1e9:.0f} GFLOP/s bf16")
  if args.quick:
    rows = bench_fwht([128, 1024], 1 << 16, peaks, repeats, on_tpu)
    rows += bench_matmul([1, 16], 1024, 1024, ["2"], peaks, repeats, on_tpu)
  else:
    rows = bench_fwht([128, 1024, 4096, 32768], 1 << 20, peaks, repeats, on_tpu)
    rows += bench_matmul([1, 16, 256], 8192, 8192, ["2", "4", "ternary"], peaks, repeats,
                         on_tpu)
  print(f"{'op':<16}{'shape':<18}{'impl':<8}{'ms':>9}{'x vs ref':>10}{'/ copy':>8}"
        f"{'MB moved':>10}{'roofline':>10}")
  for r in rows:
    ratio = "-" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}x"
    copy = f"{r['vs_copy']:.2f}" if "vs_copy" in r else "-"
    print(f"{r['op']:<16}{r['shape']:<18}{r['impl']:<8}{r['ms']:>9.3f}{ratio:>10}{copy:>8}"
          f"{r['bytes'] / 1e6:>10.2f}{r['roofline']:>10.1%}")
  print("x vs ref: the reference's time / this time (fwht: dense Hadamard matmul; matmul: dense "
        "bf16 dot of the same shape). / copy: time / a plain copy of the same bytes.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"backend": backend, "peaks": peaks, "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()

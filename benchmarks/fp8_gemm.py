"""FP8 block-scaled GEMM benchmark (issue 3): XLA bf16, XLA dequantize-then-bf16, Pallas Triton
fp8, Pallas Mosaic GPU fp8 on DeepSeek-V3's projection shapes.

    python3 benchmarks/fp8_gemm.py [--ms 1,16,64,128,4096] [--shapes 2112x7168,...]
                                   [--methods ...] [--sweep none|mosaic|all]
                                   [--json out.json]

Timing: every method is run on R distinct input sets (32 where they fit in ~12 GB, else enough
to exceed the 50 MB L2 three times over, at least 8), all R calls inside ONE jitted program so
that they queue back to back on the GPU; the program is timed warm, 7 times, and the median
divided by R ("queued wall"). The same program's kernels are also timed on the device with
CUPTI (median of 3, summed over its kernels, divided by R: "device").
Errors are ‖C − ref‖ / ‖ref‖ against ref = x · wᵀ in float32 from the UNQUANTIZED operands;
"q-operand" is the same error for the float32 product of the quantized operands (the floor that
FP8 storage alone imposes). Effective GB/s counts the bytes each method must read (A, B, scales)
and write (C) once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import fp8_gemm_mosaic as mg  # noqa: E402
from pallas_kernels import fp8_gemm_triton as tr  # noqa: E402
from pallas_kernels.act_quant import act_quant, act_quant_reference  # noqa: E402
from pallas_kernels.weight_dequant import weight_quant_reference  # noqa: E402

SHAPES = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
MS = [1, 16, 64, 128, 4096]
L2_BYTES = 50e6


def _median_time(fn, sets, reps=7):
  """Seconds per call of fn over the input sets, all calls in one jitted program: the median
  wall time of the program (after a warm run) over len(sets), and the median CUPTI sum of its
  kernels' device durations over len(sets) (None where CUPTI is unavailable)."""
  prog = jax.jit(lambda sets: [fn(*s) for s in sets])
  jax.block_until_ready(prog(sets))                      # compile + warm
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(prog(sets))
    times.append((time.perf_counter() - t0) / len(sets))
  try:
    from jax.experimental.mosaic.gpu import profiler
    _, dev = profiler.measure(prog, iterations=3)(sets)
    dev = statistics.median(dev) / 1e3 / len(sets)
  except Exception:  # noqa: BLE001 (CUPTI is optional)
    dev = None
  return statistics.median(times), times, dev


def _rel(c, ref):
  c = c.astype(jnp.float32)
  return float(jnp.linalg.norm(c - ref) / jnp.linalg.norm(ref))


@dataclasses.dataclass
class Row:
  m: int
  n: int
  k: int
  method: str
  config: str
  seconds: float
  tflops: float
  gbps: float
  err: float
  q_err: float
  spread: float
  device_seconds: float | None
  device_tflops: float | None
  device_gbps: float | None


def bench_shape(m, n, k, methods, sweep, log):
  flops = 2.0 * m * n * k
  kb, nb = k // 128, math.ceil(n / 128)
  fp8_bytes = m * k + n * k + 4 * (m * kb + nb * kb) + 2 * m * n
  set_bytes = 2 * m * k + 2 * n * k + fp8_bytes
  # Distinct input sets, one per queued call: 32 where they fit in ~12 GB, else enough to
  # exceed the L2 three times over (at least 8).
  reps = 32 if 32 * set_bytes < 12e9 else int(max(8, math.ceil(3 * L2_BYTES / set_bytes)))
  key = jax.random.key(m * 7919 + n * 31 + k)
  quant, wquant, x16, w16 = [], [], [], []
  wq = jax.jit(weight_quant_reference)
  for i in range(reps):
    kx, kw = jax.random.split(jax.random.fold_in(key, i))
    x = jax.random.normal(kx, (m, k), jnp.float32)
    w = jax.random.normal(kw, (n, k), jnp.float32) * 0.02
    quant.append(act_quant_reference(x))
    wquant.append(wq(w))
    x16.append(x.astype(jnp.bfloat16))
    w16.append(w.astype(jnp.bfloat16))
    if i == 0:
      xs, ws = [x], [w]
  fp8_sets = [(a, sa, b, sb) for (a, sa), (b, sb) in zip(quant, wquant)]
  ref = jnp.dot(xs[0], ws[0].T, precision=jax.lax.Precision.HIGHEST)
  a0, sa0, b0, sb0 = fp8_sets[0]
  q_err = _rel(tr.fp8_gemm_reference(a0, sa0, b0, sb0, out_dtype=jnp.float32), ref)
  w_err = _rel(jnp.dot(xs[0], tr.dequantize_weight(b0, sb0).T,
                       precision=jax.lax.Precision.HIGHEST), ref)
  bf16_err = _rel(jnp.dot(xs[0].astype(jnp.bfloat16).astype(jnp.float32),
                          ws[0].astype(jnp.bfloat16).astype(jnp.float32).T,
                          precision=jax.lax.Precision.HIGHEST), ref)
  del xs, ws
  rows = []

  def run(method, cfg_name, fn, sets, nbytes, qe, err_fn=None):
    try:
      sec, times, dev = _median_time(fn, sets)
      err = (err_fn or (lambda c: _rel(c, ref)))(fn(*sets[0]))
    except Exception as e:  # keep going: one failing variant must not hide the others
      log(f"  {method:12s} {cfg_name}: FAILED {type(e).__name__}: {str(e)[:300]}")
      traceback.print_exc(limit=3, file=sys.stdout)
      return None
    row = Row(m, n, k, method, cfg_name, sec, flops / sec / 1e12, nbytes / sec / 1e9, err, qe,
              (max(times) - min(times)) / sec, dev, dev and flops / dev / 1e12,
              dev and nbytes / dev / 1e9)
    devs = f"| dev {dev * 1e6:8.1f} us {row.device_tflops:7.1f} TF/s {row.device_gbps:6.0f} GB/s" \
        if dev else ""
    log(f"  {method:11s} {cfg_name[:44]:44s} {sec * 1e6:8.1f} us {row.tflops:6.1f} TF/s "
        f"{row.gbps:6.0f} GB/s {devs} err {err:.2e} (q {qe:.2e}) spread {row.spread:.0%}")
    rows.append(row)
    return row

  if "xla_bf16" in methods:
    run("xla_bf16", "-", lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32)
        .astype(jnp.bfloat16), list(zip(x16, w16)), 2 * (m * k + n * k + m * n), bf16_err)
  if "xla_dequant" in methods:
    from dsv3_jax.layers import dequantize_blocks
    run("xla_dequant", "-", lambda x, b, sb: jnp.dot(
        x, dequantize_blocks(b, sb, jnp.bfloat16).T, preferred_element_type=jnp.float32)
        .astype(jnp.bfloat16), [(x, b, sb) for x, (b, sb) in zip(x16, wquant)],
        2 * m * k + n * k + 4 * nb * kb + 2 * m * n, w_err)
  if "act_quant" in methods:
    # error: of the dequantized activations against the bf16 input
    run("act_quant", "-", lambda x: act_quant(x), [(x,) for x in x16], 2 * m * k + m * k
        + 4 * m * kb, float("nan"),
        err_fn=lambda qs: _rel(tr.dequantize_activations(*qs), x16[0].astype(jnp.float32)))
  if "xla_bf16_same" in methods:
    # ANCHORS.md's way: 20 calls dispatched back to back from Python on the SAME inputs.
    f = jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32)
                .astype(jnp.bfloat16))
    jax.block_until_ready(f(x16[0], w16[0]))
    ts = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready([f(x16[0], w16[0]) for _ in range(20)])
      ts.append((time.perf_counter() - t0) / 20)
    sec = statistics.median(ts)
    log(f"  xla_bf16 same inputs x20 (ANCHORS.md's method): {sec * 1e6:8.1f} us "
        f"{flops / sec / 1e12:6.1f} TF/s {2 * (m * k + n * k + m * n) / sec / 1e9:6.0f} GB/s")
    rows.append(Row(m, n, k, "xla_bf16_same", "20 calls, same inputs", sec, flops / sec / 1e12,
                    2 * (m * k + n * k + m * n) / sec / 1e9, float("nan"), float("nan"),
                    (max(ts) - min(ts)) / sec, None, None, None))
  if "triton" in methods:
    cfgs = {"default": tr.default_config(m, n, k)}
    if sweep == "all":
      for bm, bn, w, st in ([(16, 32, 4, 8), (16, 64, 4, 6), (32, 64, 4, 6), (64, 64, 4, 4)]
                            if m <= 128 else
                            [(128, 64, 4, 4), (128, 64, 4, 5), (256, 64, 8, 3), (128, 128, 4, 3),
                             (64, 64, 4, 5)]):
        if bm <= max(16, 2 ** math.ceil(math.log2(m))):
          cfgs[f"bm{bm} bn{bn} w{w} s{st}"] = tr.TuningConfig(block_m=bm, block_n=bn, num_warps=w,
                                                              num_stages=st)
    for name, cfg in cfgs.items():
      run("triton_fp8", f"{name}: {cfg}" if name == "default" else name,
          functools.partial(tr.fp8_gemm_triton, config=cfg), fp8_sets, fp8_bytes, q_err)
  if "mosaic" in methods:
    sms = mg.num_sms()
    cfgs = {"default": mg.default_config(m, n, k, sms)}
    if sweep == "mosaic" and m > 64:
      for tn, wgd in [(64, "m"), (128, "m")]:
        cfgs[f"{mg.WG_M * (2 if wgd == 'm' else 1)}x{tn} st4"] = mg.TuningConfig(
            tile_n=tn, wg_dimension=wgd, max_concurrent_steps=4)
    if sweep == "all":
      if m > 64:
        for tn, steps, width, minor in [(128, 4, 4, "n"), (128, 6, 8, "m"), (128, 4, 16, "n"),
                                        (64, 6, 4, "n"), (64, 6, 8, "m")]:
          cfgs[f"128x{tn} st{steps} snake{minor}{width}"] = mg.TuningConfig(
              tile_n=tn, wg_dimension="m", max_concurrent_steps=steps, grid_tile_width=width,
              grid_minor_dim=minor)
      else:
        for tn, splits, steps in [(32, 1, 12), (64, 1, 10), (32, 2, 10), (64, 2, 10),
                                  (16, 1, 12), (32, 4, 8)]:
          if kb % splits == 0:
            cfgs[f"64x{2 * tn} split{splits} st{steps}"] = mg.TuningConfig(
                tile_n=tn, wg_dimension="n", k_splits=splits, max_concurrent_steps=steps)
    for name, cfg in cfgs.items():
      run("mosaic_fp8", f"{name}: {cfg}" if name == "default" else name,
          functools.partial(mg.fp8_gemm_mosaic, config=cfg), fp8_sets, fp8_bytes, q_err)
  return rows


def render(paths: list[str]) -> str:
  """A markdown table (best queued-wall config per method) from one or more --json files;
  later files override earlier ones for the same (M, N, K, method)."""
  best = {}
  for path in paths:
    seen = {}
    for r in json.loads(Path(path).read_text()):
      key = (r["n"], r["k"], r["m"], r["method"])
      if key not in seen or r["seconds"] < seen[key]["seconds"]:
        seen[key] = r
    best.update(seen)
  methods = ["xla_bf16", "xla_dequant", "triton_fp8", "mosaic_fp8"]
  out = ["| N×K | M | " + " | ".join(methods) + " | err: bf16 / dequant / triton / mosaic (q-operand) |",
         "|---|---|" + "---|" * (len(methods) + 1)]
  for n, k in SHAPES:
    for m in MS:
      cells, errs = [], []
      for meth in methods:
        r = best.get((n, k, m, meth))
        if r is None:
          cells.append("–")
          errs.append("–")
          continue
        unit = (f"{r['tflops']:.0f} TF/s" if m >= 128 else f"{r['gbps']:.0f} GB/s")
        dev = ""
        if r.get("device_seconds"):
          dev = (f" [{r['device_tflops']:.0f}]" if m >= 128 else f" [{r['device_gbps']:.0f}]")
        cells.append(f"{r['seconds'] * 1e6:.1f} µs · {unit}{dev}")
        errs.append(f"{r['err']:.2e}")
      q = best.get((n, k, m, "mosaic_fp8")) or best.get((n, k, m, "triton_fp8"))
      out.append(f"| {n}×{k} | {m} | " + " | ".join(cells) + " | " + " / ".join(errs)
                 + (f" ({q['q_err']:.2e})" if q else "") + " |")
  return "\n".join(out)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--ms", default=",".join(map(str, MS)))
  p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
  p.add_argument("--methods", default="xla_bf16,xla_dequant,act_quant,triton,mosaic")
  p.add_argument("--sweep", default="none", choices=["none", "mosaic", "all"],
                 help="also time a few tile configs")
  p.add_argument("--json", default=None)
  p.add_argument("--render", nargs="+", default=None,
                 help="print a markdown table from --json result files and exit")
  args = p.parse_args()
  if args.render:
    print(render(args.render))
    return
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}, {getattr(dev, 'core_count', '?')} SMs, "
        f"cc {getattr(dev, 'compute_capability', '?')}), jax {jax.__version__}", flush=True)
  methods = set(args.methods.split(","))
  rows = []
  for shape in args.shapes.split(","):
    n, k = map(int, shape.split("x"))
    for m in map(int, args.ms.split(",")):
      print(f"== M={m} N={n} K={k}", flush=True)
      rows += bench_shape(m, n, k, methods, args.sweep, lambda s: print(s, flush=True))
      if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
  print("\nsummary (best config per method, by queued wall time): M N K | method | us | TFLOP/s |"
        " GB/s | device us | device TFLOP/s | device GB/s | err | q-err | config")
  best = {}
  for r in rows:
    key = (r.m, r.n, r.k, r.method)
    if key not in best or r.seconds < best[key].seconds:
      best[key] = r
  for r in best.values():
    d = (f"{r.device_seconds * 1e6:.1f} | {r.device_tflops:.0f} | {r.device_gbps:.0f}"
         if r.device_seconds else "- | - | -")
    print(f"{r.m} {r.n} {r.k} | {r.method} | {r.seconds * 1e6:.1f} | {r.tflops:.0f} | "
          f"{r.gbps:.0f} | {d} | {r.err:.2e} | {r.q_err:.2e} | {r.config[:60]}")


if __name__ == "__main__":
  main()

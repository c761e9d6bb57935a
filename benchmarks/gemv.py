"""Decode-time projections (few rows): pallas_kernels.gemv against what the model ran before it
— XLA's dot for bf16 weights, act_quant + the FP8 GEMM (fp8_ops.fp8_linear) for e4m3 weights.

    python3 benchmarks/gemv.py [--ms 1 8] [--sweep] [--json out.json]

Shapes: every projection of one DeepSeek-V2-Lite decoder layer and its output head. Each method
runs on R distinct weights (together ≥ 3× the 50 MB L2) inside one jitted program, timed as in
benchmarks/fp8_gemm.py: "device" is the CUPTI sum of the program's kernels over R (no launch
gaps), "wall" the queued wall time over R. GB/s = weight bytes (+ scales) / device time.
--sweep times the kernel's tiles and K splits at each shape (the first M only) and marks the
default config's row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.fp8_gemm import _median_time  # noqa: E402
from pallas_kernels.fp8_ops import fp8_linear, resolve_backend  # noqa: E402
from pallas_kernels.gemv import TuningConfig, default_config, gemv, gemv_reference  # noqa: E402
from pallas_kernels.weight_dequant import weight_quant_reference  # noqa: E402

# (name, N, K) of V2-Lite (hidden 2048, 16 heads, kv_lora 512, 2 shared experts of 1408)
SHAPES = [("q_proj", 3072, 2048), ("kv_a_proj", 576, 2048), ("o_proj", 2048, 2048),
          ("shared gate/up", 2816, 2048), ("shared down", 2048, 2816), ("lm_head", 102400, 2048)]
L2_BYTES = 50e6


def _sets(m, n, k, fp8, r):
  keys = jax.random.split(jax.random.key(n + k + m), 2 * r)
  out = []
  for i in range(r):
    x = jax.random.normal(keys[2 * i], (m, k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(keys[2 * i + 1], (n, k), jnp.float32) * 0.05
    out.append((x, *weight_quant_reference(w)) if fp8 else (x, w.astype(jnp.bfloat16)))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ms", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--shapes", nargs="+", help="subset of the shape names (default: all)")
  ap.add_argument("--sweep", action="store_true", help="time tiles × K splits at the first M")
  ap.add_argument("--json", help="write the rows here")
  args = ap.parse_args()
  dev = jax.devices()[0]
  sms = getattr(dev, "core_count", 0) or 132
  backend = resolve_backend("auto")
  print(f"{dev.device_kind}, {sms} SMs; fp8 backend {backend}", flush=True)
  rows = []
  for name, n, k in SHAPES:
    if args.shapes and name not in args.shapes:
      continue
    for fp8 in (False, True):
      wbytes = n * k * (1 if fp8 else 2) + (math.ceil(n / 128) * (k // 128) * 4 if fp8 else 0)
      r = max(4, min(32, math.ceil(3 * L2_BYTES / wbytes)))
      for mi, m in enumerate(args.ms):
        sets = _sets(m, n, k, fp8, r)
        if fp8:
          methods = {"act_quant + fp8 GEMM": lambda x, w, s: fp8_linear(x, w, s, backend=backend)}
        else:
          methods = {"xla dot": lambda x, w: jnp.einsum("mk,nk->mn", x, w,
                                                        preferred_element_type=jnp.float32
                                                        ).astype(x.dtype)}
        default = default_config(m, n, k, sms)
        configs = [default]
        if args.sweep and mi == 0:
          configs += [TuningConfig(block_n=bn, k_splits=s, num_warps=nw)
                      for bn in ((4, 8, 16) if m == 1 else (16, 32)) for s in (1, 2, 4)
                      for nw in (1, 4) if s <= k // 128]
        for c in dict.fromkeys(configs):
          methods[f"gemv n{c.block_n} s{c.k_splits} u{c.slabs} w{c.num_warps}"
                  + (" (default)" if c == default else "")] = (
              lambda x, w, s=None, c=c: gemv(x, w, s, config=c))
        ref = gemv_reference(*sets[0], out_dtype=jnp.float32)
        for method, fn in methods.items():
          try:
            wall, _, dev_s = _median_time(fn, sets)
            got = fn(*sets[0]).astype(jnp.float32)
            err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
          except Exception as e:  # noqa: BLE001 (report and go on)
            print(f"  {name} m={m} {method}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
          t = dev_s or wall
          row = dict(shape=name, n=n, k=k, m=m, weights="e4m3" if fp8 else "bf16",
                     method=method, device_us=None if dev_s is None else dev_s * 1e6,
                     wall_us=wall * 1e6, gb_s=wbytes / t / 1e9, rel_err=err)
          rows.append(row)
          print(f"{name:>15} {n:>6}x{k:<5} m={m:<2} {row['weights']:>4} {method:<32} "
                f"device {row['device_us'] or float('nan'):8.2f} us  wall {wall * 1e6:8.2f} us  "
                f"{row['gb_s']:7.0f} GB/s  err {err:.1e}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=dev.device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

"""The bf16 grouped matmul of the MoE layers on a Hopper GPU: XLA's ragged_dot against the Mosaic
kernels of pallas_kernels.ragged_dot_hopper, forward and forward + backward, and a small sweep of
each kernel's tiles.

Shapes: one expert matrix of the 1B training config (configs/bench_1b.json: 16,384 tokens × top-4
= 65,536 rows, E = 32, gate/up [E, 512, 2048] and down [E, 2048, 512]) and of DeepSeek-V2-Lite
(E = 64, top-6, gate [64, 1408, 2048], down [64, 2048, 1408]) at 512 and 4096 prompt tokens.
Rows are assigned to experts uniformly at random (top-k without repeats per token).

Timing: each jitted function runs `reps` times back to back on the same inputs (all far larger
than the 50 MB L2 except V2-Lite at 512 tokens); wall time / reps, median of 5. TF/s counts
2·M·N·K per product (one for the forward, three for forward + backward).

  python benchmarks/grouped_matmul.py [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import ragged_dot_hopper as rdh  # noqa: E402

SHAPES = [  # name, rows, E, N, K, top-k
    ("1b gate/up", 65536, 32, 512, 2048, 4),
    ("1b down", 65536, 32, 2048, 512, 4),
    ("v2lite gate 512tok", 3072, 64, 1408, 2048, 6),
    ("v2lite down 512tok", 3072, 64, 2048, 1408, 6),
    ("v2lite gate 4096tok", 24576, 64, 1408, 2048, 6),
    ("v2lite down 4096tok", 24576, 64, 2048, 1408, 6),
]


def timeit(f, *args, reps: int = 10) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return float(np.median(times))


def operands(m, e, n, k, topk, seed=0):
  rng = np.random.default_rng(seed)
  tokens = m // topk
  experts = np.stack([rng.permutation(e)[:topk] for _ in range(tokens)]).reshape(-1)
  sizes = jnp.asarray(np.bincount(experts, minlength=e), jnp.int32)
  kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  w = (jax.random.normal(kw, (e, n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
  dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
  return x, w, sizes, dy


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def xla(x, w, g):
  return jax.lax.ragged_dot_general(x, w, g, rdh._DIMS,
                                    preferred_element_type=jnp.float32).astype(x.dtype)


def fwd_bwd(fn):
  """y and both gradients for a given cotangent: the three products of a training step."""
  def f(x, w, g, dy):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, g), x, w)
    return (y, *vjp(dy))
  return jax.jit(f)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sweep", action="store_true", help="also time other tiles of each kernel")
  ap.add_argument("--no-xla", action="store_true", help="skip XLA's ragged_dot (slow)")
  ap.add_argument("--json", help="write the records here")
  args = ap.parse_args()
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
  recs = []
  for name, m, e, n, k, topk in SHAPES:
    x, w, g, dy = operands(m, e, n, k, topk)
    flop = 2 * m * n * k
    hop = lambda x, w, g: rdh.ragged_dot_hopper(x, w, g)
    # accuracy: float32 autodiff of ragged_dot on the same operands
    f32 = lambda a: a.astype(jnp.float32)
    ref = fwd_bwd(lambda x, w, g: jax.lax.ragged_dot_general(x, w, g, rdh._DIMS))(
        f32(x), f32(w), g, f32(dy))
    got = fwd_bwd(hop)(x, w, g, dy)
    errs = [rel(a, b) for a, b in zip(got, ref)]
    del ref, got
    rec = dict(shape=name, rows=m, experts=e, n=n, k=k, err_y=errs[0], err_dx=errs[1],
               err_dw=errs[2])
    reps = 3 if m > 20000 else 10
    variants = [("hopper", hop)] + ([] if args.no_xla else [("xla", xla)])
    for label, fn in variants:
      r = 1 if label == "xla" and m > 20000 else reps
      t_f = timeit(jax.jit(fn), x, w, g, reps=r)
      t_fb = timeit(fwd_bwd(fn), x, w, g, dy, reps=r)
      rec[f"{label}_fwd_ms"], rec[f"{label}_fwdbwd_ms"] = t_f * 1e3, t_fb * 1e3
      rec[f"{label}_fwd_tflops"] = flop / t_f / 1e12
      rec[f"{label}_fwdbwd_tflops"] = 3 * flop / t_fb / 1e12
    print(f"{name:>20}: err y/dx/dw {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e} | " + "  ".join(
        f"{lb} fwd {rec[f'{lb}_fwd_ms']:.3f} ms ({rec[f'{lb}_fwd_tflops']:.0f} TF/s) fwd+bwd "
        f"{rec[f'{lb}_fwdbwd_ms']:.3f} ms ({rec[f'{lb}_fwdbwd_tflops']:.0f} TF/s)"
        for lb, _ in variants), flush=True)
    if args.sweep and m > 60000:
      rec["sweep"] = sweep(x, w, g, dy, flop)
    recs.append(rec)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(recs, f, indent=1)


def sweep(x, w, g, dy, flop):
  """Each kernel alone with other tiles (block_m, block_n, block_k, stages, grid_block_n)."""
  out = []
  ragged_tiles = [(128, 128, 64, 4, 1), (128, 128, 64, 4, 2), (128, 128, 64, 4, 4),
                  (128, 128, 64, 4, 8), (128, 128, 64, 4, 16), (128, 128, 64, 6, 4),
                  (128, 128, 128, 3, 4)]
  trans_tiles = [(128, 128, 64, 4, 1), (128, 128, 64, 4, 4), (128, 128, 64, 6, 2),
                 (128, 128, 64, 6, 4), (128, 128, 64, 6, 8), (128, 128, 128, 3, 4)]
  kernels = [("fwd", ragged_tiles, lambda c: jax.jit(lambda x, w, g, dy: rdh.mosaic_ragged(
                 x, w, g, transpose_rhs=True, config=c))),
             ("dx", ragged_tiles, lambda c: jax.jit(lambda x, w, g, dy: rdh.mosaic_ragged(
                 dy, w, g, transpose_rhs=False, config=c))),
             ("dw", trans_tiles, lambda c: jax.jit(lambda x, w, g, dy: rdh.mosaic_transposed(
                 dy, x, g, config=c)))]
  for kind, tiles, make in kernels:
    for t in tiles:
      c = rdh.TuningConfig(block_m=t[0], block_n=t[1], block_k=t[2], max_concurrent_steps=t[3],
                           grid_block_n=t[4])
      try:
        ms = timeit(make(c), x, w, g, dy, reps=5) * 1e3
        line = f"{ms:.3f} ms {flop / ms / 1e9:.0f} TF/s"
      except Exception as err:  # e.g. too much shared memory: report and go on
        ms, line = None, f"failed: {str(err).splitlines()[0][:120]}"
      out.append(dict(kernel=kind, tiles=t, ms=ms))
      print(f"    sweep {kind:>3} {t}: {line}", flush=True)
  return out


if __name__ == "__main__":
  main()

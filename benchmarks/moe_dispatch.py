"""Times ways to apply the routed experts of one MoE layer (bf16), at decode and prefill sizes.

Variants: `ragged` (sort by expert + jax.lax.ragged_dot, the model's dispatch for many rows),
`gather` (gather each row's expert weights, then a batched dot), `fused` (the gather fused into
a multiply + reduce: the model's dispatch when M·K ≤ E), `dense`
(every expert on every row, then the top-k weights: the all-experts product).

  python benchmarks/moe_dispatch.py [--config configs/deepseek_v2_lite_16b.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dsv3_jax import load_config  # noqa: E402
from dsv3_jax.moe import grouped_matmul  # noqa: E402


def bench(f, *args, iters=20):
  out = f(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(iters):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/deepseek_v2_lite_16b.json")
  args = ap.parse_args()
  cfg = load_config(args.config)
  e, k, d, f = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
  key = jax.random.key(0)
  wg = (jax.random.normal(key, (e, f, d), jnp.float32) * 0.02).astype(jnp.bfloat16)
  wd = (jax.random.normal(key, (e, d, f), jnp.float32) * 0.02).astype(jnp.bfloat16)

  def sort_rows(x, idx):
    """(token, slot) rows sorted by expert, and the rows per expert."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat)
    return x[order // k], jnp.bincount(flat, length=e).astype(jnp.int32)

  @jax.jit
  def ragged(x, idx, wg, wd):
    xs, sizes = sort_rows(x, idx)
    h = jax.nn.silu(grouped_matmul(xs, wg, sizes))
    return grouped_matmul(h, wd, sizes)

  @jax.jit
  def gather(x, idx, wg, wd):
    h = jax.nn.silu(jnp.einsum("md,mkfd->mkf", x, wg[idx]))
    return jnp.einsum("mkf,mkdf->mkd", h, wd[idx])

  @jax.jit
  def fused(x, idx, wg, wd):  # the model's few-rows path: gather fused into multiply + reduce
    xf = x.astype(jnp.float32)[:, None, None, :]
    h = jax.nn.silu((xf * wg[idx].astype(jnp.float32)).sum(-1)).astype(jnp.bfloat16)
    return (h.astype(jnp.float32)[:, :, None, :] * wd[idx].astype(jnp.float32)).sum(-1)

  def pallas(cfg_):
    from pallas_kernels.moe_gemv import moe_gemv

    @jax.jit
    def f(x, idx, wg, wd):
      rows = jnp.repeat(x, k, axis=0)
      ids = idx.reshape(-1).astype(jnp.int32)
      h = jax.nn.silu(moe_gemv(rows, ids, wg, config=cfg_, out_dtype=jnp.float32))
      return moe_gemv(h.astype(jnp.bfloat16), ids, wd, config=cfg_)
    return f

  def mosaic_ragged(**tiles):
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import ragged_dot as rd

    @jax.jit
    def f(x, idx, wg, wd):
      xs, sizes = sort_rows(x, idx)
      h = jax.nn.silu(rd(xs, wg, group_sizes=sizes, transpose_rhs=True, **tiles))
      return rd(h, wd, group_sizes=sizes, transpose_rhs=True, **tiles)
    return f

  @jax.jit
  def dense(x, idx, wg, wd):
    h = jax.nn.silu(jnp.einsum("md,efd->mef", x, wg))
    return jnp.einsum("mef,edf->med", h, wd)

  print(f"{jax.devices()[0].device_kind}; E={e} K={k} D={d} F={f}; two of the three expert "
        "matrices (gate, down) per variant")
  print(f"{'tokens':>7} {'variant':>8} {'time us':>9} {'GB/s (chosen experts)':>22}")
  for m in (1, 8, 32, 512, 4096):
    x = jax.random.normal(key, (m, d), jnp.bfloat16)
    idx = jax.random.randint(jax.random.key(m), (m, k), 0, e)
    unique = len(set(idx.reshape(-1).tolist()))
    need = unique * 2 * f * d * 2
    variants = [("ragged", ragged), ("gather", gather), ("fused", fused), ("dense", dense)]
    if jax.devices()[0].platform == "gpu":
      from pallas_kernels.moe_gemv import TuningConfig
      variants += [(f"gemv{bn}w{nw}", pallas(TuningConfig(block_n=bn, num_warps=nw)))
                   for bn in (16, 32, 64) for nw in (2, 4)]
      variants += [(f"mgpu{bm}", mosaic_ragged(block_m=bm, block_n=128, block_k=64,
                                              max_concurrent_steps=4, grid_block_n=1))
                   for bm in (64, 128)]
    for name, fn in variants:
      if m > 512 and (name in ("dense", "gather", "fused") or name.startswith("gemv")):
        continue
      if (m > 64 and name.startswith("gemv")) or (m < 512 and name.startswith("mgpu")):
        continue
      try:
        if name.startswith("mgpu"):  # same row order as `ragged`: check it against XLA
          ref = ragged(x, idx, wg, wd).astype(jnp.float32)
          err = jnp.linalg.norm(fn(x, idx, wg, wd).astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
          print(f"{m:>7} {name:>8} relative error vs XLA ragged_dot: {float(err):.1e}")
        t = bench(fn, x, idx, wg, wd)
      except Exception as err:  # report and go on: one failing variant must not hide the rest
        print(f"{m:>7} {name:>8} failed: {str(err)[:200]}")
        continue
      print(f"{m:>7} {name:>8} {t * 1e6:>9.1f} {need / t / 1e9:>22.0f}")


if __name__ == "__main__":
  main()

"""FP8 training recipe vs bf16: each projection's forward + backward (Fprop, Dgrad, Wgrad) at
training shapes, and the whole train step, on one GPU.

GEMM level: for every projection of the config (attention, dense MLP; experts as one grouped
product of E equal buckets, as the capacity dispatch runs them) at M = batch × seq tokens,
`jax.vjp` of y = x · Wᵀ → (y, dx, dW):
  bf16          the bf16 training path: x bf16, the float32 master cast to bf16, XLA dots
  fp8/<kind>    pallas_kernels.fp8_train_ops (online quantization included) on <kind> kernels;
                experts through fp8_train_batched (mosaic: batched kernels; triton: grouped);
                operands quantized in one pass per operand (pallas_kernels.dual_quant)
  fp8/<kind>/xlaquant  (--xla-quant) the same with XLA's quantization fusions
Timing: all R calls on distinct inputs inside one jitted program (benchmarks/fp8_gemm.py's
queued wall time), TFLOP/s over the three GEMMs (6·M·N·K).

Step level: the full train step (forward, backward, AdamW, bias update) on random tokens with
the capacity dispatch and cuDNN attention, bf16 vs --precision fp8.

  python benchmarks/fp8_train.py [--config configs/bench_fp8_270m.json] [--batch 16] \\
      [--seq-len 1024] [--kinds mosaic,triton] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.fp8_gemm import _median_time  # noqa: E402
from benchmarks.train import time_train_step  # noqa: E402
from dsv3_jax import load_config  # noqa: E402
from dsv3_jax.expert_parallel import ExpertParallel  # noqa: E402
from dsv3_jax.flops import peak_flops, train_flops_per_token  # noqa: E402
from dsv3_jax.sharding import make_mesh  # noqa: E402
from pallas_kernels import fp8_train_ops as F  # noqa: E402
from pallas_kernels.fp8_ops import Fp8Backend  # noqa: E402


def projections(cfg, tokens: int, capacity_factor: float):
  """(name, M, N, K, groups) of every GEMM family; groups > 0: a grouped expert product."""
  d, n = cfg.hidden_size, cfg.num_attention_heads
  qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
  out = []
  if cfg.q_lora_rank:
    out += [("q_a_proj", tokens, cfg.q_lora_rank, d, 0),
            ("q_b_proj", tokens, n * qk, cfg.q_lora_rank, 0)]
  else:
    out += [("q_proj", tokens, n * qk, d, 0)]
  out += [("kv_a_proj", tokens, cfg.kv_lora_rank + cfg.qk_rope_head_dim, d, 0),
          ("kv_b_proj", tokens, n * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, 0),
          ("o_proj", tokens, d, n * cfg.v_head_dim, 0),
          ("dense gate/up", tokens, cfg.intermediate_size, d, 0),
          ("dense down", tokens, d, cfg.intermediate_size, 0)]
  if cfg.n_routed_experts:
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    cap = -(-int(capacity_factor * tokens * k) // e)
    f = cfg.moe_intermediate_size
    out += [("experts gate/up", e * cap, f, d, e), ("experts down", e * cap, d, f, e)]
  return out


def kernel_breakdown(fn, args, top: int = 8) -> list[tuple[str, float]]:
  """Device milliseconds per kernel name of one call of fn (CUPTI), largest first."""
  from jax.experimental.mosaic.gpu import profiler
  _, timings = profiler.measure(jax.jit(fn), aggregate=False)(*args)
  totals = {}
  for kname, ms in timings or []:
    totals[kname] = totals.get(kname, 0.0) + ms
  return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def bench_gemm(name, m, n, k, groups, kinds, reps_sets: int, seed: int = 0,
               breakdown: bool = False, xla_quant: bool = False):
  keys = jax.random.split(jax.random.key(seed), 3 * reps_sets)
  sets = []
  for i in range(reps_sets):
    x = jax.random.normal(keys[3 * i], (m, k), jnp.bfloat16)
    wshape = (groups, n, k) if groups else (n, k)
    w = 0.02 * jax.random.normal(keys[3 * i + 1], wshape, jnp.float32)
    dy = jax.random.normal(keys[3 * i + 2], (m, n), jnp.bfloat16)
    sets.append((x, w, dy))

  def bf16(x, w, dy):
    if groups:
      f = (lambda x, w: jnp.einsum("ecd,efd->ecf", x.reshape(groups, -1, k), w.astype(x.dtype))
           .reshape(m, n))
    else:
      f = lambda x, w: jnp.einsum("mk,nk->mn", x, w.astype(x.dtype))
    y, pull = jax.vjp(f, x, w)
    return (y, *pull(dy))

  def fp8(kind):
    kind, _, quant = kind.partition("/")   # "<kind>/xlaquant": XLA's quantization fusions
    be = Fp8Backend(kind, training=True, dual_quant=quant != "xlaquant",
                    interpret=jax.devices()[0].platform != "gpu")   # CPU: a smoke test only

    def run(x, w, dy):
      if groups:   # equal buckets, as the capacity dispatch runs them (_fp8_buckets)
        f = lambda x, w: F.fp8_train_batched(x.reshape(groups, -1, k), w, backend=be).reshape(m, n)
      else:
        f = lambda x, w: F.fp8_train_linear(x, w, backend=be)
      y, pull = jax.vjp(f, x, w)
      return (y, *pull(dy))
    return run

  flops = 6 * m * n * k
  rows = []
  methods = [("bf16", bf16)] + [(f"fp8/{kd}", fp8(kd)) for kd in kinds]
  methods += [(f"fp8/{kd}/xlaquant", fp8(f"{kd}/xlaquant")) for kd in kinds if xla_quant]
  ref = None
  for label, fn in methods:
    try:
      wall, _, dev = _median_time(fn, sets)
      out = jax.jit(fn)(*sets[0])
      if ref is None:
        ref = [o.astype(jnp.float32) for o in out]
      err = [float(jnp.linalg.norm(o.astype(jnp.float32) - r) / jnp.linalg.norm(r))
             for o, r in zip(out, ref)]
      rows.append({"gemm": name, "M": m, "N": n, "K": k, "groups": groups, "method": label,
                   "ms": wall * 1e3, "tflops": flops / wall / 1e12,
                   "device_ms": dev * 1e3 if dev else None, "rel_err_vs_bf16": err})
      if breakdown:
        try:
          rows[-1]["kernels_ms"] = kernel_breakdown(fn, sets[0])
        except Exception as e:  # noqa: BLE001 (CUPTI is optional)
          rows[-1]["kernels_ms"] = [(f"breakdown failed: {type(e).__name__}: {e}"[:200], 0.0)]
    except Exception as e:  # noqa: BLE001
      rows.append({"gemm": name, "method": label, "error": f"{type(e).__name__}: {e}"[:400]})
      traceback.print_exc(limit=2)
  return rows


def bench_step(cfg, precision: str, args, mesh) -> dict:
  dispatch = ExpertParallel(mesh, capacity_factor=args.capacity_factor)
  kind = precision.split("/")[-1] if precision != "bf16" else "auto"
  *_, m, compile_s, dt = time_train_step(
      cfg, mesh, batch=args.batch, seq_len=args.seq_len, steps=args.steps, warmup=2,
      expert_dispatch=dispatch, remat=args.remat, attn_impl=args.attn_impl,
      fp8_training=precision != "bf16", fp8_backend=kind)
  tokens = args.batch * args.seq_len
  flops = train_flops_per_token(cfg, args.seq_len) * tokens / dt
  peak = peak_flops(jax.devices()[0].device_kind)
  mem = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  # the process-wide peak: includes the variants run before this one (train.py's log has each
  # precision's own peak, one process per run)
  return {"precision": precision, "step_ms": dt * 1e3, "tokens_per_s": tokens / dt,
          "mfu_vs_bf16_peak": flops / peak if peak else None, "loss": float(m["loss"]),
          "compile_and_first_step_s": compile_s,
          "process_peak_memory_gib": mem / 2**30 if mem else None}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/bench_fp8_270m.json")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=1024)
  ap.add_argument("--capacity-factor", type=float, default=1.25)
  ap.add_argument("--kinds", default="mosaic,triton", help="FP8 kernel backends to time")
  ap.add_argument("--sets", type=int, default=4, help="distinct input sets per GEMM timing")
  ap.add_argument("--steps", type=int, default=10, help="timed train steps")
  ap.add_argument("--attn-impl", default="cudnn", help="training attention (cudnn, xla)")
  ap.add_argument("--remat", help="jax.checkpoint_policies name per layer (default: none)")
  ap.add_argument("--skip-gemm", action="store_true")
  ap.add_argument("--breakdown", action="store_true",
                  help="GEMM level: also each kernel's device time (CUPTI) for one call")
  ap.add_argument("--xla-quant", action="store_true",
                  help="GEMM level: also each kind with XLA's quantization fusions instead of "
                       "the one-pass kernel (method fp8/<kind>/xlaquant)")
  ap.add_argument("--skip-step", action="store_true")
  ap.add_argument("--json", help="append JSON records here")
  args = ap.parse_args()
  cfg = load_config(args.config)
  kinds = [k for k in args.kinds.split(",") if k]
  dev = jax.devices()[0]
  print(f"{dev.device_kind}; jax {jax.__version__}; {args.config}; batch {args.batch} × "
        f"seq {args.seq_len}", flush=True)
  records = []
  if not args.skip_gemm:
    print(f"{'gemm':>16} {'M':>6} {'N':>5} {'K':>5} {'method':>11} {'ms':>8} {'TF/s':>7} "
          f"{'err y/dx/dw vs bf16':>24}", flush=True)
    for i, (name, m, n, k, g) in enumerate(projections(cfg, args.batch * args.seq_len,
                                                       args.capacity_factor)):
      for r in bench_gemm(name, m, n, k, g, kinds, args.sets, seed=i, breakdown=args.breakdown,
                          xla_quant=args.xla_quant):
        records.append(r)
        if "error" in r:
          print(f"{name:>16} {r['method']:>11} FAILED {r['error']}", flush=True)
          continue
        print(f"{name:>16} {m:>6} {n:>5} {k:>5} {r['method']:>11} {r['ms']:8.3f} "
              f"{r['tflops']:7.1f} {'/'.join(f'{e:.1e}' for e in r['rel_err_vs_bf16']):>24}",
              flush=True)
        for kname, ms in r.get("kernels_ms", []):
          print(f"{'':>20}{ms:8.3f} ms  {kname[:90]}", flush=True)
      gc.collect()
  if not args.skip_step:
    mesh = make_mesh(data=jax.device_count())
    for precision in ["bf16"] + [f"fp8/{k}" for k in kinds]:
      try:
        r = bench_step(cfg, precision, args, mesh)
        print(f"step {precision:>11}: {r['step_ms']:8.1f} ms {r['tokens_per_s']:>10,.0f} tok/s "
              f"MFU(bf16 peak) {r['mfu_vs_bf16_peak'] or 0:6.1%} (compile+1st "
              f"{r['compile_and_first_step_s']:.0f}s, loss {r['loss']:.3f})", flush=True)
      except Exception as e:  # noqa: BLE001
        r = {"precision": precision, "error": f"{type(e).__name__}: {e}"[:400]}
        print(f"step {precision}: FAILED {r['error']}", flush=True)
        traceback.print_exc(limit=3)
      records.append(r)
      gc.collect()
      jax.clear_caches()
  for r in records:
    r.update(device=dev.device_kind, batch=args.batch, seq_len=args.seq_len, config=args.config)
  if args.json:
    with open(args.json, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()

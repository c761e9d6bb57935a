"""Training throughput (tokens/s) and MFU of the full train step (forward, backward, AdamW,
bias update) for a ~1B-parameter DeepSeek-style config, over random tokens.

A variant is `dispatch/attention[/remat][/bBATCH][/unstacked][/bf16adam][/castonce]`:
  dispatch   capacity: expert buckets of ceil(1.25·M·K/E) rows (ExpertParallel, one batched
             matmul); dropless: the model's sorted dispatch into moe.grouped_matmul (on Hopper
             the Mosaic grouped matmul of pallas_kernels.ragged_dot_hopper, else ragged_dot)
  attention  cudnn (jax.nn.dot_product_attention, fused), cudnn_mla (the same kernel in cuDNN's
             MLA form: value head dim 128 unpadded) or einsum (mla.py's own form)
  remat      per layer: full (nothing_saveable), dots (dots_with_no_batch_dims_saveable),
             dotsk (dots_and_kernels: dots plus the grouped-matmul, expert-row and fused
             attention outputs, dsv3_jax.remat), none, or any jax.checkpoint_policies name;
             default --remat
  bBATCH     sequences per step (default --batch)
  unstacked  every decoder layer with arrays of its own (Transformer.unstack_layers), run
             unrolled instead of under lax.scan: no slicing of stacked weights and no stacking
             of residuals and weight gradients into [L] buffers; longer compile. Default:
             scanned. The record's `unstacked_layers` says which.
  bf16adam   AdamW's moments stored in bf16 (OptimizerConfig.moment_dtype; update in float32,
             as in the DeepSeek-V3 report); record: `adam_moments`
  castonce   the float32 weights of the layers' and MTP block's bf16 products cast once per
             step, before the layer loop, not at each use and again in remat's recomputation
             (Transformer(cast_weights_once=True); bit-identical); record: `cast_weights_once`
MFU = tokens/s × FLOPs/token (dsv3_jax.flops: 6·active matmul params + causal attention) / peak;
rematerialised work is not counted.

  python benchmarks/train.py [--config configs/bench_1b.json] [--batch 8] [--seq-len 2048] \\
      [--variants capacity/cudnn/full,dropless/cudnn/dots/b16/bf16adam/castonce] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dsv3_jax import load_config  # noqa: E402
from dsv3_jax.expert_parallel import ExpertParallel  # noqa: E402
from dsv3_jax.flops import peak_flops, train_flops_per_token  # noqa: E402
from dsv3_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from dsv3_jax.train_step import (OptimizerConfig, init_train_state, make_train_step,  # noqa: E402
                                 state_shardings)


REMAT = {"full": "nothing_saveable", "dots": "dots_with_no_batch_dims_saveable",
         "dotsk": "dots_and_kernels", "none": None}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
  dispatch: str          # capacity | dropless
  attention: str         # cudnn | cudnn_mla | einsum
  remat: str | None      # a jax.checkpoint_policies name, or None
  batch: int
  unstacked: bool
  bf16_adam: bool
  cast_once: bool


FLAGS = ("unstacked", "bf16adam", "castonce")


def parse_variant(name: str, args) -> Variant:
  """`dispatch/attention[/remat][/bBATCH][/unstacked][/bf16adam][/castonce]`, options after
  the first two in any order; remat and batch default to --remat and --batch."""
  usage = (f"expected capacity|dropless/cudnn|cudnn_mla|einsum[/remat][/bN]"
           f"[/{'][/'.join(FLAGS)}]")
  parts = name.split("/")
  if len(parts) < 2 or parts[0] not in ("capacity", "dropless") or (
      parts[1] not in ("cudnn", "cudnn_mla", "einsum")):
    raise ValueError(f"variant {name!r}: {usage}")
  options = parts[2:]
  remat = [p for p in options if p not in FLAGS and not re.fullmatch(r"b\d+", p)]
  batch = [p for p in options if re.fullmatch(r"b\d+", p)]
  if len(remat) > 1 or len(batch) > 1 or len(set(options)) < len(options):
    raise ValueError(f"variant {name!r}: an option is given twice; {usage}")
  remat = remat[0] if remat else args.remat
  return Variant(dispatch=parts[0], attention=parts[1], remat=REMAT.get(remat, remat),
                 batch=int(batch[0][1:]) if batch else args.batch,
                 unstacked="unstacked" in options, bf16_adam="bf16adam" in options,
                 cast_once="castonce" in options)


def time_train_step(cfg, mesh, *, batch: int, seq_len: int, steps: int, warmup: int,
                    moment_dtype: str = "float32", **model_kw):
  """Builds the train state and step (model_kw: init_train_state's keyword arguments;
  moment_dtype: AdamW's), runs it on 4 rotating random batches: (step, state, batches, last
  metrics, compile + first step seconds, seconds per timed step)."""
  oc = OptimizerConfig(lr=1e-4, warmup_steps=10, total_steps=1000, moment_dtype=moment_dtype)
  t0 = time.perf_counter()
  graphdef, state = init_train_state(cfg, oc, seed=0, mesh=mesh, dtype=jnp.bfloat16, **model_kw)
  step = make_train_step(graphdef, oc, shardings=state_shardings(state))
  keys = jax.random.split(jax.random.key(1), 4)
  batches = [jax.device_put(jax.random.randint(k, (batch, seq_len + 1), 0, cfg.vocab_size),
                            batch_sharding(mesh)) for k in keys]
  state, m = step(state, batches[0])  # compile + first step
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, m = step(state, batches[i % 4])
  jax.block_until_ready(m)
  t1 = time.perf_counter()
  for i in range(steps):
    state, m = step(state, batches[i % 4])
  jax.block_until_ready((state, m))
  return step, state, batches, m, compile_s, (time.perf_counter() - t1) / steps


def run_variant(cfg, name: str, args, mesh) -> dict:
  v = parse_variant(name, args)
  batch = v.batch
  dispatch = (ExpertParallel(mesh, capacity_factor=args.capacity_factor)
              if v.dispatch == "capacity" else None)
  step, state, batches, m, compile_s, dt = time_train_step(
      cfg, mesh, batch=batch, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
      expert_dispatch=dispatch, remat=v.remat, unstack_layers=v.unstacked,
      attn_impl=None if v.attention == "einsum" else v.attention,
      moment_dtype="bfloat16" if v.bf16_adam else "float32", cast_weights_once=v.cast_once)
  trace = None
  if args.profile:  # two more steps under the profiler, summarized by benchmarks/trace_summary.py
    from benchmarks.trace_summary import find_trace
    log_dir = os.path.join(args.profile, name.replace("/", "_"))
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level, opts.host_tracer_level = 0, 1  # device activity; a small trace
    with jax.profiler.trace(log_dir, profiler_options=opts):
      for i in range(2):
        state, m = step(state, batches[i % 4])
      jax.block_until_ready((state, m))
    trace = find_trace(log_dir)
  tokens = batch * args.seq_len
  flops = train_flops_per_token(cfg, args.seq_len) * tokens / dt
  peak = peak_flops(jax.devices()[0].device_kind)
  mem = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  return {"variant": name, "remat": v.remat, "batch": batch, "unstacked_layers": v.unstacked,
          "adam_moments": "bfloat16" if v.bf16_adam else "float32",
          "cast_weights_once": v.cast_once,
          "step_ms": dt * 1e3,
          "tokens_per_s": tokens / dt,
          "tflops_per_s": flops / 1e12, "mfu": flops / (peak * mesh.size) if peak else None,
          "loss": float(m["loss"]), "load_imbalance": float(m["load_imbalance"]),
          "compile_and_first_step_s": compile_s, "peak_memory_gib": mem / 2**30 if mem else None,
          "trace": trace}


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/bench_1b.json")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--steps", type=int, default=10, help="timed steps")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  ap.add_argument("--variants", default="capacity/cudnn,dropless/cudnn,capacity/einsum",
                  help="comma-separated dispatch/attention[/remat][/bBATCH][/unstacked]"
                  "[/bf16adam][/castonce], e.g. dropless/cudnn/dots/b16,"
                  "dropless/cudnn/dots/b16/bf16adam/castonce (see above)")
  ap.add_argument("--capacity-factor", type=float, default=1.25)
  ap.add_argument("--remat", help="default remat of the variants: full, dots, none or a "
                  "jax.checkpoint_policies name (default: none)")
  ap.add_argument("--budget-s", type=float, default=1e9,
                  help="skip the remaining variants once this much time has passed")
  ap.add_argument("--json", help="append one JSON record per variant here")
  ap.add_argument("--profile", help="profile two extra steps of each variant into DIR/<variant> "
                  "and print where the GPU time went")
  ap.add_argument("--profile-top", type=int, default=25, help="kernels listed per trace line")
  args = ap.parse_args()
  cfg = load_config(args.config)
  mesh = make_mesh(data=jax.device_count())
  dev = jax.devices()[0]
  print(f"{dev.device_kind} × {jax.device_count()}; jax {jax.__version__}; {args.config}: "
        f"batch {args.batch} × seq {args.seq_len}; "
        f"{train_flops_per_token(cfg, args.seq_len) / 1e9:.3f} GFLOP/token", flush=True)
  start = time.perf_counter()
  for name in args.variants.split(","):
    if time.perf_counter() - start > args.budget_s:
      print(f"{name}: skipped (time budget spent)", flush=True)
      continue
    try:
      rec = run_variant(cfg, name, args, mesh)
      print(f"{name:>28}: {rec['step_ms']:8.1f} ms/step {rec['tokens_per_s']:>10,.0f} tok/s "
            f"{rec['tflops_per_s']:7.1f} TFLOP/s  MFU {rec['mfu'] or 0:6.1%}  "
            f"(compile+1st {rec['compile_and_first_step_s']:.0f}s, peak mem "
            f"{rec['peak_memory_gib'] or 0:.1f} GiB, loss {rec['loss']:.3f})", flush=True)
      if rec["trace"]:
        from benchmarks.trace_summary import summarize
        print(summarize(rec["trace"], top=args.profile_top, steps=2), flush=True)
    except Exception as e:  # an OOM or an unsupported kernel: report and go on
      rec = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}
      print(f"{name}: FAILED {rec['error']}", flush=True)
      traceback.print_exc(limit=3)
    rec.setdefault("batch", args.batch)
    rec.setdefault("unstacked_layers", "unstacked" in name.split("/")[2:])
    rec.setdefault("adam_moments", "bfloat16" if "bf16adam" in name.split("/")[2:] else "float32")
    rec.setdefault("cast_weights_once", "castonce" in name.split("/")[2:])
    rec.update(device=dev.device_kind, devices=jax.device_count(), seq_len=args.seq_len,
               config=args.config)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(rec) + "\n")
    gc.collect()
    jax.clear_caches()


if __name__ == "__main__":
  main()

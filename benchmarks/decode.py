"""Decode throughput of a DeepSeek-V2-Lite-shaped model (random weights) against the HBM roofline.

For bf16 and FP8 weights (Pallas kernels, or XLA dequantization) and each batch size: a 512-token prompt, then 256 greedy tokens through
dsv3_jax.generate.Engine (bucketed prefill, chunked decode over the compressed MLA cache).
Reported: decode tok/s (all rows), ms per decode step, and the roofline time of one step =
bytes actually read (weights used by the step: everything but the embedding table and the routed
experts no row chose, expected count for random routing; plus the cache) / measured copy
bandwidth. `--hf` instead times HF transformers (torch, eager, bf16) on the same shapes.

  python benchmarks/decode.py --out results.json              # JAX (this project)
  python benchmarks/decode.py --hf --out hf.json              # HF transformers baseline
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "deepseek_v2_lite_16b.json")


def copy_bandwidth() -> float:
  """Bytes read + written per second by a 2 GiB device-to-device copy (20 queued copies)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((1 << 30,), jnp.bfloat16)
  f = jax.jit(lambda a: a * 1)
  jax.block_until_ready(f(x))
  t0 = time.perf_counter()
  for _ in range(20):
    y = f(x)
  jax.block_until_ready(y)
  return 2 * x.nbytes * 20 / (time.perf_counter() - t0)


def random_model(cfg, dtype, fp8: bool, fp8_backend: str = "auto"):
  """Random weights straight in their storage dtype, one parameter at a time (no fp32 copy)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from dsv3_jax.model import Transformer

  make = lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype, fp8=fp8,
                             fp8_backend=fp8_backend)
  graphdef, state = nnx.split(nnx.eval_shape(make))
  flat = nnx.to_flat_state(state)
  for i, (path, var) in enumerate(flat):
    sds = var.get_value()

    @jax.jit
    def init(key, shape=sds.shape, dt=sds.dtype, scale=path[-1].endswith("scale_inv")):
      if scale:
        return jax.random.uniform(key, shape, jnp.float32, 1e-4, 2e-4)
      std = 1.0 if dt == jnp.float8_e4m3fn else 0.02
      return (jax.random.normal(key, shape, jnp.float32) * std).astype(dt)

    var.set_value(init(jax.random.key(i)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def bytes_per_step(cfg, model, batch: int, context: int) -> float:
  """Bytes one decode step must read: used weights + the compressed cache."""
  import jax
  from flax import nnx
  _, state = nnx.split(model)
  routed = other = 0
  for path, var in nnx.to_flat_state(state):
    if path[0] == "mtp" or path[:1] == ("embed_tokens",):
      continue
    v = var.get_value()
    n = v.size * v.dtype.itemsize
    if "experts" in path and "shared_experts" not in path:
      routed += n
    else:
      other += n
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  used = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per layer
  cache = batch * context * cfg.cache_values_per_token * cfg.num_hidden_layers * 2
  return other + routed * used / e + cache


def run_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dsv3_jax import load_config
  from dsv3_jax.generate import Engine
  from dsv3_jax.moe import Experts

  cfg = load_config(args.config)
  bw = copy_bandwidth()
  dev = jax.devices()[0]
  print(f"{dev.device_kind}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
  rows = []
  model = built = None      # variants of one precision share the model (built: its precision)
  for precision, layers in [(p, l) for p in args.precisions for l in args.layers]:
    gemv = layers != "scanned-gather"
    dense_gemv = layers != "scanned-xla-dense"
    if built != precision:
      model = None
      t0 = time.perf_counter()
      model = random_model(cfg, jnp.bfloat16, fp8=precision.startswith("fp8"),
                           fp8_backend="xla" if precision.endswith("-xla") else "auto")
      print(f"{precision}: random model built in {time.perf_counter() - t0:.0f}s", flush=True)
    built = None if layers == "unstacked" else precision      # unstacking is not undone
    model.use_expert_gemv(gemv, min_rows=1 if layers == "scanned-gemv1"
                          else Experts.gemv_min_rows)
    engine = Engine(model, chunk=args.chunk, unstack=layers == "unstacked", expert_gemv=gemv,
                    dense_gemv=dense_gemv, attention_kernel=layers == "scanned-attn-kernel",
                    absorb_kernel=layers != "scanned-xla-absorb",
                    merged_shared=layers in ("scanned-shared", "scanned-fused-shared"),
                    fused_input=layers in ("scanned-fused", "scanned-fused-shared"))
    max_len = args.prompt + args.new_tokens + 64
    for batch in args.batches:
      rng = np.random.default_rng(batch)
      prompts = rng.integers(100, cfg.vocab_size, (batch, args.prompt)).tolist()
      t0 = time.perf_counter()
      engine.generate(prompts, max_new_tokens=2 * args.chunk + 1, max_len=max_len)  # compile
      compile_s = time.perf_counter() - t0
      runs = [engine.generate(prompts, max_new_tokens=args.new_tokens, max_len=max_len)[1]
              for _ in range(args.repeats)]
      st = sorted(runs, key=lambda r: r.decode_tok_s)[len(runs) // 2]       # the median run
      if args.profile:
        with jax.profiler.trace(os.path.join(args.profile, f"{precision}_{layers}_b{batch}")):
          engine.generate(prompts, max_new_tokens=args.profile_steps + 1, max_len=max_len)
      step_ms = 1e3 * batch / st.decode_tok_s
      need = bytes_per_step(cfg, model, batch, args.prompt + args.new_tokens // 2)
      roof_ms = 1e3 * need / bw
      row = dict(precision=precision, layers=layers, batch=batch, decode_tok_s=st.decode_tok_s,
                 tok_s_per_seq=st.decode_tok_s / batch, step_ms=step_ms,
                 roofline_ms=roof_ms, roofline_frac=roof_ms / step_ms,
                 ttft_s=st.time_to_first_token_s, prefill_tok_s=st.prefill_tok_s,
                 gb_per_step=need / 1e9, warmup_s=compile_s,
                 decode_tok_s_runs=[r.decode_tok_s for r in runs])
      rows.append(row)
      print(f"{precision} {layers} batch {batch:>2}: {st.decode_tok_s:8.1f} tok/s "
            f"({row['tok_s_per_seq']:.1f}/seq), {step_ms:.2f} ms/step, roofline "
            f"{roof_ms:.2f} ms ({row['roofline_frac']:.0%}), prefill {st.prefill_tok_s:.0f} tok/s, "
            f"first call (compiles) {compile_s:.0f}s"
            + (f"; runs {', '.join(f'{r.decode_tok_s:.1f}' for r in runs)}"
               if len(runs) > 1 else ""), flush=True)
    del engine
  stats = dev.memory_stats() or {}
  return dict(device=dev.device_kind, copy_tb_s=bw / 1e12, rows=rows,
              peak_bytes=stats.get("peak_bytes_in_use"))


def run_hf(args) -> dict:
  import torch
  import transformers

  with open(args.config) as f:
    raw = json.load(f)
  raw.pop("architectures", None)
  config = transformers.DeepseekV2Config(**{k: v for k, v in raw.items()
                                            if k not in ("model_type", "transformers_version")})
  torch.manual_seed(0)
  t0 = time.perf_counter()
  with torch.device("cuda"):
    model = transformers.DeepseekV2ForCausalLM(config).to(torch.bfloat16).eval()
  print(f"HF {transformers.__version__}: model built in {time.perf_counter() - t0:.0f}s",
        flush=True)
  rows = []
  for batch in args.batches:
    ids = torch.randint(100, config.vocab_size, (batch, args.prompt), device="cuda")

    def gen(n):
      torch.cuda.synchronize()
      t = time.perf_counter()
      with torch.no_grad():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
      torch.cuda.synchronize()
      return time.perf_counter() - t

    gen(2)
    t_short, t_long = gen(1), gen(1 + args.hf_tokens)
    tok_s = batch * args.hf_tokens / (t_long - t_short)
    rows.append(dict(batch=batch, decode_tok_s=tok_s, tok_s_per_seq=tok_s / batch))
    print(f"HF batch {batch:>2}: {tok_s:8.1f} tok/s ({tok_s / batch:.1f}/seq)", flush=True)
  return dict(device=torch.cuda.get_device_name(), transformers=transformers.__version__,
              rows=rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--hf", action="store_true", help="time HF transformers (torch) instead")
  ap.add_argument("--config", default=CONFIG, help="model shape (default: V2-Lite 16B)")
  ap.add_argument("--precisions", nargs="+", default=["bf16", "fp8", "fp8-xla"],
                  choices=["bf16", "bf16-xla", "fp8", "fp8-xla"],
                  help="bf16: bf16 weights on the auto backend (sorted expert rows through the "
                  "Mosaic grouped matmul on Hopper); bf16-xla: through jax.lax.ragged_dot; fp8: FP8 "
                  "weights on the auto kernel backend; fp8-xla: dequantize in XLA")
  ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
  ap.add_argument("--prompt", type=int, default=512)
  ap.add_argument("--new-tokens", type=int, default=256)
  ap.add_argument("--hf-tokens", type=int, default=32, help="decode tokens timed for HF")
  ap.add_argument("--chunk", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=1,
                  help="timed generate calls per case; the median's numbers are reported")
  ap.add_argument("--layers", nargs="+", default=["scanned"],
                  choices=["scanned", "scanned-gather", "scanned-xla-dense",
                           "scanned-attn-kernel", "scanned-xla-absorb", "scanned-gemv1",
                           "scanned-shared", "scanned-fused", "scanned-fused-shared",
                           "unstacked"],
                  help="scanned: lax.scan over the stacked layers, routed experts of 2+ rows and "
                  "the projections of ≤ 16 rows through the GEMV kernels, which read the stacked "
                  "weights in place, and the W_UK absorption through pallas_kernels.mla_absorb "
                  "(generate.Engine's GPU default); scanned-gather: routed "
                  "experts through XLA's gather; scanned-xla-dense: projections through XLA's "
                  "dot / act_quant + FP8 GEMM (the earlier default); scanned-attn-kernel: decode "
                  "attention through pallas_kernels.mla_decode; scanned-xla-absorb: the W_UK "
                  "absorption through XLA (the earlier default); scanned-gemv1: routed "
                  "experts of one token through the GEMV kernels too; scanned-shared: one "
                  "token's shared experts read in the routed experts' fused gather "
                  "(Engine(merged_shared=True)); scanned-fused: each attention block's input norm "
                  "and q/kv_a projections in one GEMV launch (Engine(fused_input=True)); "
                  "scanned-fused-shared: both; unstacked: every layer has arrays of its own")
  ap.add_argument("--profile", metavar="DIR",
                  help="after each timing, trace --profile-steps more decode steps into "
                  "DIR/<precision>_"
                  "<layers>_b<batch> (read it with benchmarks/trace_summary.py)")
  ap.add_argument("--profile-steps", type=int, default=16,
                  help="decode steps in each profile (after the prompt's prefill)")
  ap.add_argument("--out", help="write the results as JSON here")
  args = ap.parse_args()
  res = run_hf(args) if args.hf else run_jax(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()

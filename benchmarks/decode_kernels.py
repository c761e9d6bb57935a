"""Kernels one decode step launches on an H100, counted from a deviceless compile (no GPU).

One step of generate._decode (plain) or generate._decode_mtp (2 verified tokens + the MTP
draft), built from abstract weights (nnx.eval_shape: nothing large is allocated) exactly as
generate.Engine builds it on a GPU (GEMV kernels on, the FP8 backend resolved for sm_90), and
compiled for the H100 by benchmarks/gpu_hlo.py. Prints per variant the kernels per step and
per iteration of the scanned MoE stack (one MoE layer), memcpys apart.

  python benchmarks/decode_kernels.py                                  # the standard variants
  python benchmarks/decode_kernels.py --variants bf16/b1 fp8/b1/mtp bf16/b8/unstacked
  python benchmarks/decode_kernels.py --variants bf16/b1 --list        # launches in order

A variant is precision/b<batch>[/mtp][/unstacked][/attnkernel][/xlaabsorb][/shared][/gemv1][/fusedin];
precision bf16 or
fp8 (e4m3 weights with block scales, as benchmarks/decode.py builds them). MTP variants of a
config without an MTP module (V2-Lite) get one, as DeepSeek-V3 has (num_nextn_predict_layers =
1). /attnkernel decodes attention through pallas_kernels.mla_decode
(Engine(attention_kernel=True)) instead of XLA; /xlaabsorb keeps the W_UK absorption on XLA
(Engine(absorb_kernel=False)); /shared reads one token's shared experts in the routed experts'
fused gather (Engine(merged_shared=True)); /gemv1 sends one token's routed experts through the
GEMV kernels too (Experts.gemv_min_rows = 1); /fusedin runs each attention block's input norm and
q/kv_a projections in one GEMV launch (Engine(fused_input=True)).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_hlo  # noqa: E402  (sets JAX_PLATFORMS=cpu before JAX starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "deepseek_v2_lite_16b.json")
VARIANTS = ("bf16/b1", "bf16/b1/attnkernel", "bf16/b8", "fp8/b1", "fp8/b8", "bf16/b1/mtp",
            "bf16/b1/unstacked")


def parse_variant(v: str) -> dict:
  parts = v.split("/")
  if len(parts) < 2 or parts[0] not in ("bf16", "fp8") or not parts[1].startswith("b") or any(
      p not in ("mtp", "unstacked", "attnkernel", "xlaabsorb", "shared", "gemv1", "fusedin")
      for p in parts[2:]):
    raise ValueError(f"variant {v!r}: expected precision/b<batch>[/mtp][/unstacked][/attnkernel]"
                     "[/xlaabsorb][/shared][/gemv1][/fusedin], "
                     "precision bf16 or fp8, e.g. bf16/b1/mtp")
  return dict(fp8=parts[0] == "fp8", batch=int(parts[1][1:]), mtp="mtp" in parts[2:],
              unstack="unstacked" in parts[2:], attention_kernel="attnkernel" in parts[2:],
              absorb_kernel="xlaabsorb" not in parts[2:], merged_shared="shared" in parts[2:],
              gemv1="gemv1" in parts[2:], fused_input="fusedin" in parts[2:])


def compile_step(config: str, *, fp8: bool = False, batch: int = 1, mtp: bool = False,
                 unstack: bool = False, attention_kernel: bool = False,
                 absorb_kernel: bool = True, merged_shared: bool = False, gemv1: bool = False,
                 fused_input: bool = False, max_len: int = 832):
  """(Compiled, seconds) of one decode step of the model `config` for the H100."""
  from flax import nnx
  from dsv3_jax import generate
  from dsv3_jax.cache import init_cache
  from dsv3_jax.config import load_config
  from dsv3_jax.model import Transformer
  from dsv3_jax.moe import Experts
  from dsv3_jax.sampling import SamplingParams

  with gpu_hlo.pretend_gpu():            # the project picks its GPU kernels by jax.devices()
    cfg = load_config(config)
    if mtp and not cfg.num_nextn_predict_layers:   # V2-Lite has none: give it V3's one
      cfg = cfg.replace(num_nextn_predict_layers=1)

    def make():
      m = Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
                      fp8=fp8, fp8_backend="auto")
      return m.unstack_layers(free=False) if unstack else m    # abstract: unstack while tracing

    model = nnx.eval_shape(make).use_expert_gemv(
        None, min_rows=1 if gemv1 else Experts.gemv_min_rows)
    engine = generate.Engine(model, mtp=mtp, attention_kernel=attention_kernel,
                             absorb_kernel=absorb_kernel, merged_shared=merged_shared,
                             fused_input=fused_input)
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, max_len, engine.cache_dtype,
                                              with_mtp=mtp))
    tok = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    greedy = SamplingParams(temperature=0.0)
    t0 = time.perf_counter()
    if mtp:
      compiled = gpu_hlo.compile_for_gpu(generate._decode_mtp, engine.graph, engine.params, tok,
                                         tok, tok, cache, key, sampling=greedy, steps=1)
    else:
      compiled = gpu_hlo.compile_for_gpu(generate._decode, engine.graph, engine.params, tok, tok,
                                         cache, key, sampling=greedy, steps=1)
    return compiled, time.perf_counter() - t0


def count(config: str, variant: str, max_len: int = 832) -> tuple[dict, gpu_hlo.Report]:
  """Kernel counts of one variant: {variant, kernels, memcpys, per_moe_layer, compile_s}."""
  from dsv3_jax.config import load_config
  compiled, secs = compile_step(config, max_len=max_len, **parse_variant(variant))
  rep = gpu_hlo.kernel_report(compiled.as_text())
  moe = [lp for lp in rep.loops if lp.trip_count == load_config(config).num_moe_layers]
  return dict(variant=variant, kernels=rep.kernels, memcpys=rep.memcpys,
              per_moe_layer=moe[0].kernels if moe else None,
              per_moe_layer_memcpys=moe[0].memcpys if moe else None,
              compile_s=round(secs, 1)), rep


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default=CONFIG, help="model shape (default: V2-Lite 16B)")
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
  ap.add_argument("--max-len", type=int, default=832,
                  help="cache slots (default: decode.py's 512 + 256 + 64)")
  ap.add_argument("--list", action="store_true",
                  help="list each variant's launches (MoE loop body and entry) in order")
  ap.add_argument("--dump", metavar="DIR", help="write each variant's optimized HLO here")
  ap.add_argument("--json", help="write the counts here")
  a = ap.parse_args(argv)
  for v in a.variants:
    parse_variant(v)                     # fail before compiling anything
  rows = []
  print(f"{'variant':22s} {'kernels/step':>12s} {'memcpys':>8s} {'per MoE layer':>14s}")
  for v in a.variants:
    row, rep = count(a.config, v, a.max_len)
    rows.append(row)
    layer = "-" if row["per_moe_layer"] is None else str(row["per_moe_layer"])
    print(f"{v:22s} {row['kernels']:12d} {row['memcpys']:8d} {layer:>14s}   "
          f"(compiled in {row['compile_s']:.0f}s)", flush=True)
    if a.dump:
      os.makedirs(a.dump, exist_ok=True)
      with open(os.path.join(a.dump, v.replace("/", "_") + ".hlo"), "w") as f:
        f.write(rep.hlo)
    if a.list:
      gpu_hlo.print_listing(rep)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(config=a.config, max_len=a.max_len, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

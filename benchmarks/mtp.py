"""MTP speculative decoding against plain greedy decoding on one checkpoint (default: the demo
model, `demo/stdlib-coder`): device time of one decode step, end-to-end decode tokens/s,
acceptance, greedy equality, and the compiled step's kernel-level op count.

Per variant (how the projections and experts of few rows run: `auto` = Engine's default, the
GEMV kernels on GPUs; `xla` = XLA's dots and gathers) and per prompt, both engines are compiled
first, then timed `--repeats` times, alternating. The step time is the slope of the jitted
decode call's wall time over its step count (calls of `--steps` S1 and S2 steps, median of the
repeats each), so the per-call host work (dispatch, transfer) drops out; it is reported apart.

  python3 benchmarks/mtp.py --out mtp_bench.json                 # GPU: bf16, variants auto + xla
  python3 benchmarks/mtp.py --hlo                                 # op counts of one step only
  XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true \\
    python3 benchmarks/mtp.py --variants auto --repeats 1 --profile /tmp/mtp_prof
  python3 benchmarks/trace_summary.py /tmp/mtp_prof/auto_mtp --steps 32
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["def fibonacci(n):", "class Stack:", "def quicksort(arr):", "import os",
           "def is_prime(n):"]
VARIANTS = {"auto": dict(), "xla": dict(dense_gemv=False, expert_gemv=False),
            "xla-dense": dict(dense_gemv=False), "xla-experts": dict(expert_gemv=False)}


# ---- kernel-level op count of compiled HLO ------------------------------------------------------
_NOT_RUN = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def _opcode(line: str) -> str | None:
  """The opcode of one HLO instruction line (the word after the result type)."""
  i = line.find(" = ")
  if i < 0:
    return None
  rest = line[i + 3:]
  if rest.startswith("("):                     # tuple result type: skip to its closing paren
    depth = 0
    for j, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
    rest = rest[j + 1:]
  else:
    rest = rest[rest.find(" "):]
  m = re.match(r"\s*([a-z][\w-]*)\(", rest)
  return m.group(1) if m else None


def hlo_op_counts(text: str) -> collections.Counter:
  """Instructions that run as their own kernel/thunk in a compiled (optimized) HLO module: those
  of the entry computation and of control-flow bodies (while, conditional, call), each counted
  as often as it runs per call (a while body × its known trip count); fusions count once, by
  kind (the bodies of fusions, reducers and comparators are not entered)."""
  comps, entry, name = {}, None, None
  for line in text.split("\n"):
    m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if m:
      name = m.group(2)
      comps[name] = []
      entry = name if m.group(1) else entry
    elif name and line.startswith("  "):
      comps[name].append(line)
  ops, todo = collections.Counter(), [(entry, 1)]
  while todo:
    comp, mult = todo.pop()
    for line in comps.get(comp, ()):
      op = _opcode(line)
      if op is None or op in _NOT_RUN:
        continue
      if op in ("while", "conditional", "call"):
        trip = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
        inner = mult * (int(trip.group(1)) if trip else 1)
        for attr in ("body", "condition", "to_apply", "true_computation", "false_computation"):
          m = re.search(attr + r"=%?([\w.\-]+)", line)
          if m:
            todo.append((m.group(1), inner if op == "while" else mult))
        m = re.search(r"branch_computations=\{([^}]*)\}", line)
        if m:
          todo += [(c.strip().lstrip("%"), mult) for c in m.group(1).split(",")]
        continue
      if op == "fusion":
        kind = re.search(r"kind=(\w+)", line)
        op = f"fusion:{kind.group(1) if kind else '?'}"
      elif op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        op = f"custom-call:{target.group(1) if target else '?'}"
      ops[op] += mult
  return ops


def step_hlo(engine, prompt_ids, sampling, max_len) -> collections.Counter:
  """Op counts of one compiled decode step (a 1-step call) of `engine`."""
  import jax
  import jax.numpy as jnp
  from dsv3_jax import generate
  from dsv3_jax.cache import init_cache

  cache = init_cache(engine.cfg, 1, max_len, engine.cache_dtype, with_mtp=engine.mtp)
  cur = jnp.asarray([prompt_ids[-1]], jnp.int32)
  pos = jnp.asarray([len(prompt_ids)], jnp.int32)
  key = jax.random.key(0)
  if engine.mtp:
    lowered = generate._decode_mtp.lower(engine.graph, engine.params, cur, cur, pos, cache,
                                         key, sampling=sampling, steps=1)
  else:
    lowered = generate._decode.lower(engine.graph, engine.params, cur, pos, cache, key,
                                     sampling=sampling, steps=1)
  return hlo_op_counts(lowered.compile().as_text())


# ---- timing -------------------------------------------------------------------------------------
def step_times(engine, prompt_ids, sampling, max_len, steps, repeats):
  """Median wall time (s) of one jitted decode call of each step count in `steps`, from the
  prompt's prefilled state (every call restarts at the same position; the work of a step does
  not depend on the cache's contents). Returns {steps: seconds}."""
  import jax
  import jax.numpy as jnp
  from dsv3_jax import generate
  from dsv3_jax.cache import init_cache

  key = jax.random.key(0)
  cache = init_cache(engine.cfg, 1, max_len, engine.cache_dtype, with_mtp=engine.mtp)
  tokens = jnp.asarray([prompt_ids], jnp.int32)
  first, draft, cache = generate._prefill(engine.graph, engine.params, tokens,
                                          jnp.asarray([len(prompt_ids)], jnp.int32), cache, key,
                                          sampling=sampling, mtp=engine.mtp)
  pos = jnp.asarray([len(prompt_ids)], jnp.int32)

  def call(n, cache):
    if engine.mtp:
      out = generate._decode_mtp(engine.graph, engine.params, first, draft, pos, cache, key,
                                 sampling=sampling, steps=n)
    else:
      out = generate._decode(engine.graph, engine.params, first, pos, cache, key,
                             sampling=sampling, steps=n)
    jax.block_until_ready(out)
    return out[-1]

  times = {n: [] for n in steps}
  for n in steps:                                   # compile
    cache = call(n, cache)
  for _ in range(repeats):
    for n in steps:
      t0 = time.perf_counter()
      cache = call(n, cache)
      times[n].append(time.perf_counter() - t0)
  return {n: statistics.median(t) for n, t in times.items()}


def run(args) -> dict:
  import jax
  from dsv3_jax.generate import Engine
  from dsv3_jax.sampling import SamplingParams
  from dsv3_jax.tokenizer import Tokenizer
  from infer import load_model

  dev = jax.devices()[0]
  dtype = args.dtype or ("float32" if dev.platform == "cpu" else "bfloat16")
  tok = Tokenizer(args.ckpt)
  prompts = args.prompt or PROMPTS
  ids = [tok.encode(p) for p in prompts]
  model = load_model(args.ckpt, dtype, False, quiet=True)
  sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  # the cache length of generate's runs (attention reads every slot), room for S2 MTP steps
  max_len = lambda e, pid: max(e.plan_cache_len(len(pid), args.new_tokens),
                               len(pid) + 2 * max(args.steps) + 2)
  s1, s2 = args.steps
  print(f"{dev.device_kind} ({dev.platform}), {args.ckpt} in {dtype}, chunk {args.chunk}",
        flush=True)
  result = dict(device=dev.device_kind, jax=jax.__version__,
                xla_flags=os.environ.get("XLA_FLAGS", ""), ckpt=args.ckpt, dtype=dtype,
                chunk=args.chunk,
                sampling=dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
                new_tokens=args.new_tokens, repeats=args.repeats, steps=args.steps,
                variants={})
  for variant in args.variants:
    engines = {kind: Engine(model, mtp=kind == "mtp", chunk=args.chunk, **VARIANTS[variant])
               for kind in ("plain", "mtp")}
    rec = result["variants"][variant] = {}
    hlo = {kind: step_hlo(e, ids[0], sampling, max_len(e, ids[0])) for kind, e in engines.items()}
    for kind in engines:
      counts = hlo[kind]
      rec[f"{kind}_step_ops"] = sum(counts.values())
      rec[f"{kind}_step_ops_by_kind"] = dict(counts.most_common())
      print(f"[{variant}] {kind:5s} step: {sum(counts.values())} ops  "
            f"{dict(counts.most_common(8))}", flush=True)
    print(f"[{variant}] op ratio mtp/plain: {rec['mtp_step_ops'] / rec['plain_step_ops']:.2f}",
          flush=True)
    if args.hlo:
      continue
    # device time per step: slope over the step count, per prompt
    per_prompt = []
    for p, pid in zip(prompts, ids):
      row = {"prompt": p}
      for kind, e in engines.items():
        t = step_times(e, pid, sampling, max_len(e, pid), (s1, s2), args.repeats)
        row[f"{kind}_step_ms"] = 1e3 * (t[s2] - t[s1]) / (s2 - s1)
        row[f"{kind}_call_overhead_ms"] = 1e3 * t[s1] - s1 * row[f"{kind}_step_ms"]
      row["step_ratio"] = row["mtp_step_ms"] / row["plain_step_ms"]
      # end to end through Engine.generate (compiled above by the first round)
      runs = {"plain": [], "mtp": []}
      outs, acc = {}, []
      for r in range(args.repeats + 1):
        for kind, e in engines.items():
          comps, st = e.generate([pid], max_new_tokens=args.new_tokens, sampling=sampling)
          outs[kind] = comps[0].output_ids
          if r:                                      # round 0 compiles
            runs[kind].append(st.decode_tok_s)
            if kind == "mtp":
              acc.append(st.acceptance_rate)
      for kind in runs:
        row[f"{kind}_tok_s"] = statistics.median(runs[kind])
      row["acceptance"] = statistics.median(acc)
      row["tokens_per_mtp_step"] = 1 + row["acceptance"]
      row["speedup"] = row["mtp_tok_s"] / row["plain_tok_s"]
      row["step_speedup"] = row["tokens_per_mtp_step"] / row["step_ratio"]
      row["greedy_equal"] = outs["mtp"] == outs["plain"] if sampling.greedy else None
      per_prompt.append(row)
      print(f"[{variant}] {p!r:22s} step plain {row['plain_step_ms']:.3f} ms, mtp "
            f"{row['mtp_step_ms']:.3f} ms ({row['step_ratio']:.2f}x); call overhead "
            f"{row['plain_call_overhead_ms']:.2f}/{row['mtp_call_overhead_ms']:.2f} ms; "
            f"acceptance {row['acceptance']:.1%} -> step-level speedup "
            f"{row['step_speedup']:.2f}x; end to end {row['plain_tok_s']:.0f} -> "
            f"{row['mtp_tok_s']:.0f} tok/s ({row['speedup']:.2f}x); greedy equal "
            f"{row['greedy_equal']}", flush=True)
    rec["prompts"] = per_prompt
    for key in ("plain_step_ms", "mtp_step_ms", "step_ratio", "acceptance", "step_speedup",
                "speedup"):
      rec[f"median_{key}"] = statistics.median(r[key] for r in per_prompt)
    print(f"[{variant}] median: step plain {rec['median_plain_step_ms']:.3f} ms, mtp "
          f"{rec['median_mtp_step_ms']:.3f} ms ({rec['median_step_ratio']:.2f}x), acceptance "
          f"{rec['median_acceptance']:.1%}, step-level speedup "
          f"{rec['median_step_speedup']:.2f}x, end-to-end speedup {rec['median_speedup']:.2f}x",
          flush=True)
    if args.profile:
      for kind, e in engines.items():
        with jax.profiler.trace(os.path.join(args.profile, f"{variant}_{kind}")):
          e.generate([ids[0]], max_new_tokens=args.profile_tokens, sampling=sampling)
    del engines
  return result


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               epilog=__doc__.split("\n\n", 2)[2],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", default="demo/stdlib-coder", help="checkpoint with an MTP module")
  ap.add_argument("--dtype", choices=["bfloat16", "float32"],
                  help="default: bfloat16 on GPU/TPU, float32 on CPU (as infer.py)")
  ap.add_argument("--prompt", action="append", default=[],
                  help="a prompt (repeatable; default: five Python openings)")
  ap.add_argument("--new-tokens", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--chunk", type=int, default=8, help="decode steps per call in generate")
  ap.add_argument("--steps", type=int, nargs=2, default=[8, 40], metavar=("S1", "S2"),
                  help="step counts of the two timed calls whose difference gives the step time")
  ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
  ap.add_argument("--top-k", type=int, default=0)
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--variants", nargs="+", default=["auto", "xla"], choices=list(VARIANTS),
                  help="auto: the GEMV kernels where Engine turns them on (GPUs); xla: XLA's "
                       "dots and gathers; xla-dense / xla-experts: XLA for the projections / "
                       "the routed experts only (default: auto xla)")
  ap.add_argument("--hlo", action="store_true",
                  help="only count the ops of one compiled step (plain and MTP)")
  ap.add_argument("--profile", metavar="DIR",
                  help="also trace --profile-tokens tokens of each engine into DIR/VARIANT_KIND")
  ap.add_argument("--profile-tokens", type=int, default=65)
  ap.add_argument("--out", help="write the results as JSON here")
  args = ap.parse_args()
  if args.steps[0] >= args.steps[1]:
    ap.error(f"--steps {args.steps}: S1 must be smaller than S2")
  result = run(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

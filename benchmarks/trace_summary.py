"""Where the device time of a profiled JAX program goes: GPU kernel time per trace line (stream)
and the kernels (or XLA ops) that take most of it, read from the `*.trace.json.gz` that
`jax.profiler.trace(dir)` writes.

  python benchmarks/trace_summary.py DIR [--top 30] [--steps 2]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re


def find_trace(log_dir: str) -> str:
  paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {log_dir}")
  return paths[-1]


def _family(name: str) -> str:
  """A kernel or op name without its numeric suffixes (fusion.123 → fusion)."""
  return re.sub(r"[._]\d+$", "", re.sub(r"\.\d+(?=\b)", "", name))


def summarize(path: str, top: int = 30, steps: int = 1, match: str = "GPU") -> str:
  """A text table: per line (thread) of the processes whose name contains `match`, busy ms per
  step; then its top kernel (or op) names."""
  with gzip.open(path, "rb") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  gpu = {pid for pid, name in procs.items() if match.lower() in name.lower()}
  per_line = collections.defaultdict(lambda: collections.Counter())
  counts = collections.defaultdict(lambda: collections.Counter())
  span = collections.defaultdict(lambda: [float("inf"), 0.0])
  intervals = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu:
      continue
    line = f"{procs[e['pid']]} / {threads.get((e['pid'], e['tid']), e['tid'])}"
    per_line[line][e["name"]] += e.get("dur", 0)
    counts[line][e["name"]] += 1
    s = span[line]
    s[0], s[1] = min(s[0], e["ts"]), max(s[1], e["ts"] + e.get("dur", 0))
    intervals[line].append((e["ts"], e["ts"] + e.get("dur", 0)))
  out = []
  for line, c in sorted(per_line.items()):
    busy = sum(c.values())
    out.append(f"== {line}: busy {busy / 1e3 / steps:.2f} ms/step over a span of "
               f"{(span[line][1] - span[line][0]) / 1e3 / steps:.2f} ms/step, "
               f"{sum(counts[line].values()) // steps} events/step")
    out.append("   idle gaps between kernels: " + _gaps(intervals[line], steps))
    fam = collections.Counter()
    for name, d in c.items():
      fam[_family(name)[:60]] += d
    for name, d in fam.most_common(12):
      out.append(f"   family {d / 1e3 / steps:9.2f} ms  {100 * d / busy:5.1f}%  {name}")
    for name, d in c.most_common(top):
      out.append(f"   {d / 1e3 / steps:9.3f} ms  {100 * d / busy:5.1f}%  "
                 f"x{counts[line][name] // steps:<4} {name[:110]}")
  return "\n".join(out)


def _gaps(intervals, steps: int) -> str:
  """Idle time between consecutive kernels of one line, per step, bucketed by gap length."""
  buckets = [(2, "<2us"), (5, "2-5us"), (20, "5-20us"), (float("inf"), ">20us")]
  total = collections.Counter()
  count = collections.Counter()
  end = None
  for t0, t1 in sorted(intervals):
    if end is not None and t0 > end:
      gap = t0 - end
      label = next(name for limit, name in buckets if gap < limit)
      total[label] += gap
      count[label] += 1
    end = t1 if end is None else max(end, t1)
  return ", ".join(f"{name} {count[name] // steps} x = {total[name] / 1e3 / steps:.2f} ms"
                   for _, name in buckets)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("log_dir")
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--steps", type=int, default=1, help="steps in the trace (times are per step)")
  ap.add_argument("--match", default="GPU", help="summarize processes whose name has this")
  args = ap.parse_args()
  print(summarize(find_trace(args.log_dir), args.top, args.steps, args.match))


if __name__ == "__main__":
  main()

"""Compares a bf16 and an fp8 run of train.py (same config, seed and data): the relative loss gap
at the end, tokens/s of each and their ratio, peak device memory, and both loss curves in one PNG.

The runs themselves are plain train.py invocations that differ only in --precision (see
docs/benchmarks.md, "FP8 training"); this script reads their log.jsonl files.

  python benchmarks/fp8_validation.py RUN_BF16 RUN_FP8 [--png docs/fp8_vs_bf16.png] \\
      [--window 100] [--json summary.json]

Loss gap: |mean fp8 loss − mean bf16 loss| / mean bf16 loss over the last `window` steps (the
per-step loss of a batch is noisy; both runs see the same batches in the same order). Tokens/s:
the median over steps after the first 10 (compilation and warm-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def read_run(run_dir: str) -> dict:
  steps, evals, summary = {}, {}, {}
  with open(os.path.join(run_dir, "log.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      kind = r.get("kind")
      if kind == "summary":
        summary = r
      elif kind == "eval":
        evals[r["step"]] = r
      else:
        steps[r["step"]] = r  # a resumed run's re-done steps count once
  if not steps:
    raise SystemExit(f"error: {run_dir}/log.jsonl has no training steps")
  return {"steps": steps, "evals": evals, "summary": summary}


def summarize(run: dict, window: int) -> dict:
  order = sorted(run["steps"])
  last = [run["steps"][s] for s in order[-window:]]
  speeds = [run["steps"][s]["tokens_per_s"] for s in order[10:]] or [
      run["steps"][s]["tokens_per_s"] for s in order]
  out = {"steps": order[-1], "loss_last_window": statistics.fmean(r["loss"] for r in last),
         "ce_last_window": statistics.fmean(r["ce"] for r in last),
         "tokens_per_s_median": statistics.median(speeds),
         "peak_memory_gib": (run["summary"].get("peak_bytes_in_use") or 0) / 2**30 or None}
  if run["evals"]:
    final = run["evals"][max(run["evals"])]
    out["heldout_ce"] = final["ce"]
  return out


def plot(runs: dict[str, dict], png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, gap) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                gridspec_kw={"height_ratios": [3, 1]})
  for name, run in runs.items():
    order = sorted(run["steps"])
    ax.plot(order, [run["steps"][s]["loss"] for s in order], lw=0.8, label=name, alpha=0.85)
  ax.set_ylabel("training loss (CE + MTP + balance)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  a, b = runs["bf16"]["steps"], runs["fp8"]["steps"]
  common = sorted(set(a) & set(b))
  k = 50
  rel = [(b[s]["loss"] - a[s]["loss"]) / a[s]["loss"] for s in common]
  smooth = [statistics.fmean(rel[max(0, i - k + 1):i + 1]) for i in range(len(rel))]
  gap.plot(common, [100 * r for r in smooth], lw=1)
  gap.axhline(0, color="k", lw=0.5)
  gap.set_ylabel(f"(fp8 − bf16)/bf16, %\n({k}-step mean)")
  gap.set_xlabel("step")
  gap.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("bf16_run")
  ap.add_argument("fp8_run")
  ap.add_argument("--png", default="docs/fp8_vs_bf16.png")
  ap.add_argument("--window", type=int, default=100)
  ap.add_argument("--json")
  args = ap.parse_args()
  runs = {"bf16": read_run(args.bf16_run), "fp8": read_run(args.fp8_run)}
  s = {k: summarize(v, args.window) for k, v in runs.items()}
  gap = (s["fp8"]["loss_last_window"] - s["bf16"]["loss_last_window"]) / s["bf16"][
      "loss_last_window"]
  ratio = s["fp8"]["tokens_per_s_median"] / s["bf16"]["tokens_per_s_median"]
  result = {"bf16": s["bf16"], "fp8": s["fp8"], "relative_loss_gap": gap,
            "fp8_over_bf16_tokens_per_s": ratio}
  for k in ("bf16", "fp8"):
    r = s[k]
    mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] else "n/a"
    extra = f", held-out CE {r['heldout_ce']:.4f}" if "heldout_ce" in r else ""
    print(f"{k:>5}: {r['steps']} steps, loss (last {args.window}) {r['loss_last_window']:.4f}, "
          f"CE {r['ce_last_window']:.4f}{extra}, {r['tokens_per_s_median']:,.0f} tok/s, "
          f"peak memory {mem}")
  print(f"relative loss gap {gap:+.3%} (target |gap| <= 0.25%); fp8/bf16 tokens/s {ratio:.2f}×")
  if args.png:
    plot(runs, args.png)
    print(f"curves: {args.png}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

#!/usr/bin/env python3
"""Train a DeepSeek-V3-architecture model (MLA + DeepSeekMoE + MTP) with JAX.

Examples:
  python train.py --config configs/demo.json --out runs/demo            # Python stdlib corpus
  python train.py --config configs/demo.json --out runs/demo --resume   # continue after a stop
  python train.py --config configs/tiny_v3.json --out runs/ep --mesh data=2,expert=4 \\
      --steps 100 --batch 16 --seq-len 128                              # expert parallelism
  python train.py ... --export demo/stdlib-coder                        # + an HF checkpoint

One script from one CPU to a pod: the mesh comes from --mesh (axes data, fsdp, tensor, expert);
multi-process runs call jax.distributed.initialize() (docs/train.md shows multi-host launches).
The run directory (--out) gets ckpt/ (Orbax), log.jsonl (one record per step), loss.png and
config.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# Orbax and absl log at INFO by default; keep the terminal for the progress bar.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description="Train a DeepSeek-V3-architecture model (JAX).",
      epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="HF config.json of the architecture")
  p.add_argument("--out", required=True, help="run directory (checkpoints, logs, plot)")
  d = p.add_argument_group("data")
  d.add_argument("--corpus", default="stdlib",
                 help="'stdlib' (the Python standard library's source), a directory or a glob")
  d.add_argument("--data-dir", help="where the tokenizer and token file live (default OUT/data)")
  d.add_argument("--tokenizer", help="an existing tokenizer directory (default: train one)")
  d.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default: the config's)")
  d.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
  d.add_argument("--batch", type=int, default=32, help="global batch in sequences (default 32)")
  o = p.add_argument_group("optimization")
  o.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
  o.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
  o.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
  o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (cosine)")
  o.add_argument("--weight-decay", type=float, default=0.1)
  o.add_argument("--b1", type=float, default=0.9)
  o.add_argument("--b2", type=float, default=0.95)
  o.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
  o.add_argument("--adam-moments", choices=["float32", "bfloat16"], default="float32",
                 help="storage of AdamW's first and second moments: bfloat16 halves the "
                      "optimizer state and the bytes each update reads and writes, as in the "
                      "DeepSeek-V3 report (§3.3.3); the update is computed in float32 either "
                      "way. A resumed run converts the saved moments to this setting")
  o.add_argument("--mtp-lambda", type=float, default=0.3, help="MTP loss weight λ")
  o.add_argument("--balance-alpha", type=float, default=1e-4,
                 help="sequence-wise balance loss weight α")
  o.add_argument("--bias-gamma", type=float, default=1e-3,
                 help="aux-loss-free bias update speed γ")
  o.add_argument("--seed", type=int, default=0, help="initialization and data-order seed")
  m = p.add_argument_group("model and parallelism")
  m.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                 help="compute dtype (parameters are float32 masters)")
  m.add_argument("--precision", choices=["bf16", "fp8"], default="bf16",
                 help="GEMM precision: bf16, or fp8 = DeepSeek-V3's FP8 training recipe (attention, "
                      "dense-MLP and expert GEMMs on online-quantized e4m3 operands, forward and "
                      "backward; embedding, head, router, norms and attention core stay bf16/fp32; "
                      "see docs/train.md)")
  m.add_argument("--fp8-backend", choices=["auto", "xla", "triton", "mosaic"], default="auto",
                 help="kernels of --precision fp8: auto = Mosaic/Triton on FP8-capable GPUs, "
                      "else the float32 emulation 'xla'")
  m.add_argument("--remat", help="rematerialise each decoder layer in the backward pass with "
                                 "this policy: a jax.checkpoint_policies name (e.g. "
                                 "nothing_saveable, dots_with_no_batch_dims_saveable) or "
                                 "dots_and_kernels (dots plus the expert grouped-matmul and "
                                 "fused-attention outputs; see dsv3_jax/remat.py); default: "
                                 "no rematerialisation")
  m.add_argument("--attn-impl", choices=["auto", "einsum", "xla", "cudnn", "cudnn_mla"],
                 default="auto",
                 help="training attention: einsum (mla.py's form), xla or cudnn "
                      "(jax.nn.dot_product_attention), cudnn_mla (cuDNN with the value head dim "
                      "unpadded; cuDNN >= 9.10, Hopper+); auto = cudnn_mla where it runs, else cudnn "
                      "on NVIDIA GPUs, else einsum")
  m.add_argument("--unstack-layers", action="store_true",
                 help="give every decoder layer arrays of its own and run the layers unrolled "
                      "instead of under lax.scan: no slicing of stacked weights and no stacking "
                      "of residuals and weight gradients (13-18%% faster steps on the 1B "
                      "benchmark config on an H100, docs/benchmarks.md), but compile time grows "
                      "with depth (about 3 minutes for 8 layers there). Checkpoints remember the "
                      "layout: resume with the same setting")
  m.add_argument("--cast-weights-once", action="store_true",
                 help="cast the float32 master weights of the decoder layers and MTP blocks to "
                      "--dtype once per step, before the layer loop and outside remat, instead "
                      "of at every use (forward, recomputation, backward); same values")
  m.add_argument("--mesh", default="", help="mesh axis sizes, e.g. 'data=2,expert=4' "
                                            "(default: data = every device)")
  m.add_argument("--capacity-factor", type=float,
                 help="expert buckets of ceil(c·tokens·K/E) rows, dropping overflow "
                      "(default: dropless)")
  c = p.add_argument_group("checkpoints and logging")
  c.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in OUT/ckpt (if any)")
  c.add_argument("--ckpt-every", type=int, default=100, help="save every N steps")
  c.add_argument("--keep", type=int, default=3, help="checkpoints kept")
  c.add_argument("--sync-save", action="store_true", help="blocking (not async) saves")
  c.add_argument("--eval-every", type=int, default=0,
                 help="held-out loss every N steps (0: only at the end)")
  c.add_argument("--eval-batches", type=int, default=4, help="batches per held-out evaluation")
  c.add_argument("--max-seconds", type=float,
                 help="stop (with a checkpoint) once this much wall time has passed")
  c.add_argument("--export", help="write an HF-format checkpoint (bf16) here at the end")
  c.add_argument("--no-progress", action="store_true", help="no progress bar")
  g = p.add_argument_group("multi-process (see docs/train.md)")
  g.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                 help="call jax.distributed.initialize(): auto = when a coordinator is given or "
                      "a cluster launcher (SLURM, Open MPI, TPU pod) is detected")
  g.add_argument("--coordinator", help="host:port of process 0")
  g.add_argument("--num-processes", type=int)
  g.add_argument("--process-id", type=int)
  return p.parse_args(argv)


def _cluster_detected() -> bool:
  env = os.environ
  return any(int(env.get(k, "1") or 1) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")) or (
      "," in env.get("TPU_WORKER_HOSTNAMES", "")) or bool(env.get("JAX_COORDINATOR_ADDRESS"))


def setup_distributed(args):
  """jax.distributed.initialize() for multi-process runs (explicit flags, or auto-detected)."""
  import jax

  explicit = args.coordinator or args.num_processes or args.process_id is not None
  if args.distributed == "off" or (args.distributed == "auto" and not (
      explicit or _cluster_detected())):
    return
  kw = {}
  if args.coordinator:
    kw["coordinator_address"] = args.coordinator
  if args.num_processes is not None:
    kw["num_processes"] = args.num_processes
  if args.process_id is not None:
    kw["process_id"] = args.process_id
  jax.distributed.initialize(**kw)


class RunLog:
  """JSONL log, progress bar and console messages (process 0 only)."""

  def __init__(self, path: str, enabled: bool, total: int, initial: int, bar: bool):
    self.enabled = enabled
    self.file = open(path, "a") if enabled else None
    self.bar = None
    if enabled and bar:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def say(self, msg: str):
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(msg)
    else:
      print(msg, flush=True)

  def record(self, rec: dict):
    if not self.enabled:
      return
    self.file.write(json.dumps(rec) + "\n")
    self.file.flush()
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix(loss=f"{rec['loss']:.3f}", mtp=f"{rec['mtp_ce']:.3f}",
                           tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.file is not None:
      self.file.close()


def plot_loss(log_path: str, png_path: str) -> bool:
  """Loss curves from the JSONL log (a resumed run's re-done steps count once)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  train, val = {}, {}
  with open(log_path) as f:
    for line in f:
      r = json.loads(line)
      if r.get("kind") == "summary":
        continue
      (val if r.get("kind") == "eval" else train)[r["step"]] = r
  if not train:
    return False
  steps = sorted(train)
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, [train[s]["ce"] for s in steps], label="next-token CE", lw=1)
  ax.plot(steps, [train[s]["mtp_ce"] for s in steps], label="MTP CE (depth 1)", lw=1, alpha=0.8)
  if val:
    vs = sorted(val)
    ax.plot(vs, [val[s]["ce"] for s in vs], "o-", label="held-out CE", ms=3)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=120)
  plt.close(fig)
  return True


def main(argv=None) -> int:
  args = parse_args(argv)
  setup_distributed(args)

  import jax
  import numpy as np

  from dsv3_jax import data
  from dsv3_jax.config import load_config
  from dsv3_jax.expert_parallel import ExpertParallel
  from dsv3_jax.flops import peak_flops, train_flops_per_token
  from dsv3_jax.mla import default_training_attention
  from dsv3_jax.sharding import batch_sharding, make_mesh, parse_mesh
  from dsv3_jax.train_ckpt import TrainCheckpointer
  from dsv3_jax.train_step import (Objective, OptimizerConfig, init_train_state,
                                   make_eval_step, make_train_step, state_shardings)

  lead = jax.process_index() == 0
  os.makedirs(args.out, exist_ok=True)
  cfg = load_config(args.config)
  try:
    sizes = parse_mesh(args.mesh)
  except ValueError as e:
    raise SystemExit(f"error: --mesh: {e}")
  if not sizes:
    sizes = {"data": jax.device_count()}
  try:
    mesh = make_mesh(**sizes)
  except ValueError as e:
    raise SystemExit(f"error: --mesh {args.mesh!r}: {e}")
  shards = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert"))
  if args.batch % shards or args.batch % jax.process_count():
    raise SystemExit(f"error: --batch {args.batch} must be divisible by data × fsdp × expert = "
                     f"{shards} and by the {jax.process_count()} processes")

  # ---- data ------------------------------------------------------------------------------
  data_dir = args.data_dir or os.path.join(args.out, "data")
  say = (lambda m: print(m, flush=True)) if lead else (lambda m: None)
  prepare = lambda: data.prepare(args.corpus, data_dir, args.vocab_size or cfg.vocab_size,
                                 args.tokenizer, log=say)
  if jax.process_count() > 1:  # process 0 builds the files on shared storage; the rest wait
    from jax.experimental import multihost_utils
    if lead:
      prepare()
    multihost_utils.sync_global_devices("dsv3_jax data prepared")
  tok_dir, token_file = prepare()
  from tokenizers import Tokenizer
  vocab = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).get_vocab_size()
  if vocab > cfg.vocab_size:
    raise SystemExit(f"error: the tokenizer in {tok_dir} has {vocab} tokens but the config's "
                     f"vocab_size is {cfg.vocab_size}")
  train_ds = data.PackedDataset(token_file, args.seq_len, args.seed, "train")
  val_ds = data.PackedDataset(token_file, args.seq_len, args.seed, "val")
  fingerprint = {"seed": args.seed, "seq_len": args.seq_len, "batch": args.batch,
                 "tokenizer_sha256": train_ds.meta["tokenizer_sha256"],
                 "num_tokens": train_ds.meta["num_tokens"]}

  # ---- model, optimizer, state ------------------------------------------------------------
  oc = OptimizerConfig(lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                       min_lr_ratio=args.min_lr_ratio, b1=args.b1, b2=args.b2,
                       weight_decay=args.weight_decay, clip_norm=args.clip,
                       moment_dtype=args.adam_moments)
  obj = Objective(mtp_lambda=args.mtp_lambda, balance_alpha=args.balance_alpha,
                  bias_gamma=args.bias_gamma)
  dispatch = None
  if mesh.size > 1 or args.capacity_factor is not None:
    dispatch = ExpertParallel(mesh, capacity_factor=args.capacity_factor)
  ckpt = TrainCheckpointer(os.path.join(args.out, "ckpt"), keep=args.keep,
                           every=args.ckpt_every, async_save=not args.sync_save)
  latest = ckpt.latest_step()
  if latest is not None and not args.resume:
    raise SystemExit(f"error: {args.out}/ckpt already holds step {latest}: pass --resume to "
                     "continue it, or choose another --out")
  attn = args.attn_impl
  if attn == "auto":
    attn = default_training_attention() or "einsum"
  graphdef, state = init_train_state(cfg, oc, seed=args.seed, mesh=mesh, dtype=args.dtype,
                                     unstack_layers=args.unstack_layers,
                                     cast_weights_once=args.cast_weights_once,
                                     expert_dispatch=dispatch, remat=args.remat,
                                     attn_impl=None if attn == "einsum" else attn,
                                     fp8_training=args.precision == "fp8",
                                     fp8_backend=args.fp8_backend)
  shardings = state_shardings(state)
  platform = jax.devices()[0].platform
  if args.precision == "fp8" and platform != "gpu":
    say(f"note: --precision fp8 on {platform}: "
        + ("TPU has no FP8 block-scaled GEMMs here, so the model trains in bf16"
           if platform == "tpu" else "the FP8 GEMMs run as their float32 emulation (exact but "
           "slow: meant for tests; the kernels need an FP8-capable GPU)"))
  position = 0
  if latest is not None:
    saved_unstacked = ckpt.meta(latest).get("unstacked_layers", False)
    if saved_unstacked != args.unstack_layers:
      raise SystemExit(f"error: cannot resume {args.out}: its checkpoints hold "
                       f"{'unstacked' if saved_unstacked else 'scanned (stacked)'} layers; "
                       f"{'pass' if saved_unstacked else 'drop'} --unstack-layers to resume it")
    state, meta = ckpt.restore(state)
    changed = {k: (meta.get(k), v) for k, v in fingerprint.items() if meta.get(k) != v}
    if changed:
      raise SystemExit(f"error: cannot resume {args.out}: the data setup changed since the "
                       f"checkpoint (saved, now): {changed}")
    position = meta["data_position"]
    say(f"resumed from step {int(state.step)} (data position {position})")
  if lead:
    cfg.save(args.out)

  layout = {"unstacked_layers": args.unstack_layers}
  step_fn = make_train_step(graphdef, oc, obj, shardings)
  eval_fn = make_eval_step(graphdef, obj)
  in_sharding = batch_sharding(mesh)
  rows = args.batch // jax.process_count()
  row0 = jax.process_index() * rows

  def device_batch(ds, pos):
    local = ds.batch(pos + row0, rows)
    return jax.make_array_from_process_local_data(in_sharding, local,
                                                  (args.batch, args.seq_len + 1))

  def to_host(tree):  # replicated values: this process's copy (works on every host)
    return jax.tree.map(lambda v: np.asarray(v.addressable_data(0)), tree)

  def evaluate(step):
    if not args.eval_batches:
      return None
    totals = {}
    for i in range(args.eval_batches):
      m = to_host(eval_fn(state, device_batch(val_ds, i * args.batch)))
      for k, v in m.items():
        totals[k] = totals.get(k, 0.0) + float(v) / args.eval_batches
    rec = {"kind": "eval", "step": step, **totals}
    log.say(f"step {step}: held-out CE {totals['ce']:.4f}, MTP CE {totals['mtp_ce']:.4f}")
    if log.file:
      log.file.write(json.dumps(rec) + "\n")
      log.file.flush()
    return rec

  flops_tok = train_flops_per_token(cfg, args.seq_len)
  peak = peak_flops(jax.devices()[0].device_kind)
  peak_total = peak * jax.device_count() if peak else None
  start = int(state.step)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  say(f"{n_params:,} parameters; mesh {dict(mesh.shape)} on {jax.device_count()} "
      f"{jax.devices()[0].device_kind}; batch {args.batch}×{args.seq_len}; "
      f"dispatch {'local' if dispatch is None else 'expert-parallel'}"
      f"{'' if args.capacity_factor is None else f' (capacity {args.capacity_factor})'}; "
      f"attention {attn}; precision {args.precision}; "
      f"steps {start}→{args.steps}")
  log = RunLog(os.path.join(args.out, "log.jsonl"), lead, args.steps, start,
               bar=not args.no_progress)
  t_begin = t_last = time.perf_counter()
  status, step = 0, start
  next_batch = device_batch(train_ds, position) if start < args.steps else None
  for step in range(start + 1, args.steps + 1):
    state, metrics = step_fn(state, next_batch)
    position += args.batch
    if step < args.steps:  # overlap the next batch's host work with this step
      next_batch = device_batch(train_ds, position)
    m = {k: float(v) for k, v in to_host(metrics).items()}
    now = time.perf_counter()
    tok_s = args.batch * args.seq_len / (now - t_last)
    t_last = now
    rec = {"step": step, **m, "tokens_per_s": tok_s,
           "mfu": tok_s * flops_tok / peak_total if peak_total else None,
           "epoch": round(train_ds.epochs(position), 4), "time_s": round(now - t_begin, 3)}
    if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm")):
      log.say(f"error: non-finite loss at step {step} (loss {m['loss']}, grad norm "
              f"{m['grad_norm']}): stopping. The last good checkpoint "
              f"(step {ckpt.latest_step()}) is kept in {ckpt.directory}; lower --lr or "
              "check the data, then resume with --resume.")
      status = 3
      break
    log.record(rec)
    ckpt.save(step, state, dict(fingerprint, data_position=position, **layout))
    if args.eval_every and step % args.eval_every == 0:
      evaluate(step)
    if args.max_seconds and now - t_begin > args.max_seconds and step < args.steps:
      log.say(f"time budget of {args.max_seconds:.0f}s spent at step {step}: stopping")
      break
  if status == 0 and step > start:
    if ckpt.latest_step() != step:
      ckpt.save(step, state, dict(fingerprint, data_position=position, **layout), force=True)
    evaluate(step)
  ckpt.wait()
  ckpt.close()
  mem = jax.devices()[0].memory_stats() or {}
  if lead and log.file and "peak_bytes_in_use" in mem:
    log.file.write(json.dumps({"kind": "summary", "precision": args.precision,
                               "peak_bytes_in_use": mem["peak_bytes_in_use"]}) + "\n")
  log.close()
  if status == 0 and args.export:
    from flax import nnx
    from jax.experimental import multihost_utils

    from dsv3_jax.hf_export import export_hf

    full = nnx.merge_state(state.biases, state.params)
    host = (multihost_utils.process_allgather(full, tiled=True) if jax.process_count() > 1
            else jax.device_get(full))
    if lead:
      path = export_hf(args.export, cfg, host, tokenizer_dir=tok_dir)
      print(f"exported {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
  if lead and status == 0:
    if plot_loss(os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "loss.png")):
      print(f"loss curve: {os.path.join(args.out, 'loss.png')}")
  return status


if __name__ == "__main__":
  sys.exit(main())

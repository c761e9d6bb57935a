"""Checkpoint conversion benchmark: a large synthetic DeepSeek-shaped FP8 checkpoint → Orbax → HF.

    python benchmarks/convert.py [--dir /tmp/dsv3_convert_bench] [--layers 2] [--experts 256]

Synthesizes an HF checkpoint with DeepSeek-V3 671B widths (hidden 7168, vocab 129280, 128
heads, 2048-wide experts, FP8 e4m3 + 128×128 float32 scales, bf16 elsewhere) but few layers
(default: 1 dense + 1 MoE layer of 256 experts, ~16 GB in ~4.3 GB shards, like the released
files), with realistic byte statistics (e4m3 of Gaussian weights, bf16 Gaussian) so zstd sees
what it would see on real weights. The files are flushed and evicted from the page cache, then
`python -m dsv3_jax.convert` runs in a child process; we report wall time, GB/s (checkpoint
bytes / wall time) and the child's peak RSS (getrusage ru_maxrss, plus /proc samples split into
anonymous and file-backed pages). The export back to HF is measured the same way and checked
bit-exact against the source. Everything synthetic is deleted at the end (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dsv3_jax.checkpoint import expected_tensors, hf_tensor_table  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.export import Tensor, safetensors_header, shard  # noqa: E402
from dsv3_jax.orbax_checkpoint import abstract_model, flat_abstract  # noqa: E402
from dsv3_jax.safetensors_io import CheckpointReader  # noqa: E402

SHARD_BYTES = 4_300_000_000  # the released V3 shards are ~4.3 GB
POOL = 256 * 2**20


def bench_config(layers: int, experts: int, mtp: int) -> dict:
  with open(os.path.join(REPO, "configs", "deepseek_v3_671b.json")) as f:
    cfg = json.load(f)
  groups = 8 if experts % 8 == 0 and experts >= 16 else 1
  cfg.update(num_hidden_layers=layers, first_k_dense_replace=min(1, layers),
             n_routed_experts=experts, n_group=groups, topk_group=min(4, groups),
             num_experts_per_tok=min(8, experts), num_nextn_predict_layers=mtp)
  return cfg


def plan(cfg_dict: dict) -> list[Tensor]:
  """Every tensor of the checkpoint (names and shapes from the mapping table), in layer order."""
  cfg = ModelConfig.from_hf_dict(cfg_dict)
  import jax.numpy as jnp

  shapes = expected_tensors(cfg, flat_abstract(abstract_model(cfg, jnp.bfloat16, True)), True)
  table = hf_tensor_table(cfg)
  out = []
  for name, shape in shapes.items():
    base = name[:-len("_scale_inv")] if name.endswith("_scale_inv") else name
    e = table[base]
    if name.endswith("weight_scale_inv") or name.endswith("e_score_correction_bias"):
      dt = np.dtype(np.float32)
    elif (table[e.copy_of] if e.copy_of else e).scale_path is not None:
      dt = np.dtype(ml_dtypes.float8_e4m3fn)
    else:
      dt = np.dtype(ml_dtypes.bfloat16)
    out.append(Tensor(name, table[base].copy_of or "", (), dt, tuple(shape)))
  return out


class Pools:
  """Random bytes with the statistics of real weights; a tensor is a run of random slices."""

  def __init__(self, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(POOL // 2, np.float32)
    self.pool = {
        np.dtype(ml_dtypes.float8_e4m3fn): np.clip(
            np.concatenate([g, g[::-1]]) * 75, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(
            np.uint8),
        np.dtype(ml_dtypes.bfloat16): (g * 0.02).astype(ml_dtypes.bfloat16).view(np.uint8),
        np.dtype(np.float32): (np.abs(g) * 1e-4 + 1e-5).view(np.uint8),
    }

  def chunks(self, t: Tensor, step=64 * 2**20):
    pool = self.pool[t.dtype]
    rng = np.random.default_rng(zlib.crc32((t.param or t.name).encode()))
    left = t.nbytes
    while left:
      n = min(step, left, len(pool))
      start = int(rng.integers(0, len(pool) - n + 1)) // t.dtype.itemsize * t.dtype.itemsize
      yield pool[start:start + n]
      left -= n


def synthesize(cfg: dict, tensors: list[Tensor], d: str) -> int:
  os.makedirs(d)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  shards = shard(tensors, SHARD_BYTES)
  pools, weight_map = Pools(), {}
  for i, group in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    with open(os.path.join(d, fname), "wb") as f:
      f.write(safetensors_header(group))
      for t in group:
        for c in pools.chunks(t):
          f.write(c.data)
        weight_map[t.name] = fname
      f.flush()
      os.fsync(f.fileno())
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors)},
               "weight_map": weight_map}, f)
  return sum(t.nbytes for t in tensors)


def evict(path: str) -> None:
  """Flushes files and drops them from the page cache, so the next read comes from the disk."""
  os.sync()
  for root, _, files in os.walk(path):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      os.close(fd)


_CHILD = """
import atexit, json, os, runpy, sys
def report():
  with open('/proc/self/status') as f:
    st = dict(line.split(':', 1) for line in f)
  with open(os.environ['BENCH_STATUS'], 'w') as f:
    json.dump({k: int(st[k].split()[0]) * 1024 for k in ('VmHWM', 'VmRSS')}, f)
atexit.register(report)
sys.argv = ['dsv3_jax.convert'] + sys.argv[1:]
runpy.run_module('dsv3_jax.convert', run_name='__main__', alter_sys=True)
"""


def run_measured(args: list[str], status_path: str) -> dict:
  """Runs `python -m dsv3_jax.convert ARGS`: wall seconds, peak RSS (the child's own VmHWM,
  read at its exit) and the peak anonymous / file-backed RSS seen in /proc samples."""
  t0, cpu0, busy0 = time.perf_counter(), _children_cpu(), _machine_busy()
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "BENCH_STATUS": status_path})
  peaks = {"RssAnon": 0, "RssFile": 0}

  def sample():
    while proc.poll() is None:
      try:
        with open(f"/proc/{proc.pid}/status") as f:
          for line in f:
            key = line.split(":")[0]
            if key in peaks:
              peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
      except OSError:
        return
      time.sleep(0.05)

  th = threading.Thread(target=sample, daemon=True)
  th.start()
  proc.wait()
  wall = time.perf_counter() - t0
  cpu, busy = _children_cpu() - cpu0, _machine_busy() - busy0
  th.join()
  if proc.returncode:
    raise SystemExit(f"dsv3_jax.convert {args} failed with {proc.returncode}")
  with open(status_path) as f:
    status = json.load(f)
  return {"wall_s": wall, "peak_rss": status["VmHWM"], "peak_anon": peaks["RssAnon"],
          "peak_file": peaks["RssFile"], "cpu_s": cpu, "others_cpu_s": max(0.0, busy - cpu)}


def _children_cpu() -> float:
  import resource

  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _machine_busy() -> float:
  """CPU seconds spent by everything on the machine (user + nice + system + irq), /proc/stat."""
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:]]
  return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def bit_exact(a: str, b: str, band=256 * 2**20) -> bool:
  ra, rb = CheckpointReader(a), CheckpointReader(b)
  if ra.info != rb.info:
    return False
  for n in ra.info:
    x, y = ra.get(n).reshape(-1).view(np.uint8), rb.get(n).reshape(-1).view(np.uint8)
    if any(not np.array_equal(x[i:i + band], y[i:i + band]) for i in range(0, len(x), band)):
      return False
    ra.file_of(n).close()
    rb.file_of(n).close()
  return True


def du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dir", default="/tmp/dsv3_convert_bench")
  ap.add_argument("--layers", type=int, default=2, help="1 dense + (layers-1) MoE layers")
  ap.add_argument("--experts", type=int, default=256)
  ap.add_argument("--mtp", type=int, default=0, help="MTP layers (each a full MoE layer)")
  ap.add_argument("--convert-args", default="", help="extra arguments for dsv3_jax.convert")
  ap.add_argument("--no-export", action="store_true", help="skip the export and round trip")
  ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
  args = ap.parse_args()
  cfg = bench_config(args.layers, args.experts, args.mtp)
  tensors = plan(cfg)
  total = sum(t.nbytes for t in tensors)
  free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir))).free
  if free < 3.2 * total:
    raise SystemExit(f"need ~{3.2 * total / 1e9:.0f} GB free (source, Orbax copy, export), "
                     f"have {free / 1e9:.0f} GB")
  if os.path.exists(args.dir):
    shutil.rmtree(args.dir)
  src, orbax, back = (os.path.join(args.dir, n) for n in ("hf", "orbax", "hf_back"))
  print(f"load average before: {os.getloadavg()}", flush=True)
  try:
    t0 = time.perf_counter()
    synthesize(cfg, tensors, src)
    print(f"synthesized {len(tensors)} tensors, {total / 1e9:.2f} GB in "
          f"{math.ceil(total / SHARD_BYTES)} shards in {time.perf_counter() - t0:.0f}s", flush=True)
    evict(src)
    extra = args.convert_args.split()
    status = os.path.join(args.dir, "status.json")
    conv = run_measured([src, orbax, "--no-progress", *extra], status)
    runs = [("HF → Orbax", conv)]
    same = None
    if not args.no_export:
      evict(orbax)
      runs.append(("Orbax → HF", run_measured(["--export", orbax, back, "--no-progress"],
                                              status)))
      same = bit_exact(src, back)
    result = {"tensors": len(tensors), "checkpoint_gb": total / 1e9,
              "orbax_gb": du(orbax) / 1e9, **{k: r for k, r in runs},
              "round_trip_bit_exact": same, "cpus": os.cpu_count(),
              "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30}
    for k, r in runs:
      print(f"{k}: {r['wall_s']:.1f}s, {total / 1e9 / r['wall_s']:.2f} GB/s, peak RSS "
            f"{r['peak_rss'] / 2**30:.2f} GiB (anon {r['peak_anon'] / 2**30:.2f}, file-backed "
            f"{r['peak_file'] / 2**30:.2f}); CPU {r['cpu_s']:.0f}s, other processes "
            f"{r['others_cpu_s']:.0f}s")
    print(f"Orbax checkpoint {result['orbax_gb']:.2f} GB on disk; round trip bit-exact: {same}")
    print(json.dumps(result))
  finally:
    if not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()

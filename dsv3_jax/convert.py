"""HF safetensors ⇄ our Orbax checkpoint, streaming in both directions.

    python -m dsv3_jax.convert HF_DIR OUT_DIR [--dtype fp8|bf16]   # HF → Orbax (this file)
    python -m dsv3_jax.convert --export ORBAX_DIR HF_OUT_DIR       # Orbax → HF (export.py)

HF → Orbax: everything is validated first (config, every shard header, tensor names, shapes,
dtypes, the MTP copies; see checkpoint.check_checkpoint), before anything is written. Tensors are
then read in file order through memory maps, one at a time, and written into the Orbax arrays
chunk by chunk (orbax_checkpoint.ParamWriter); the map of a file is dropped after each tensor,
and at most MAX_INFLIGHT bytes wait for TensorStore, so resident memory stays constant whatever
the checkpoint size.

Interruption: the work goes to OUT_DIR.partial, renamed to OUT_DIR only when complete. Every
tensor whose writes are committed is appended to OUT_DIR.partial/_convert_done.txt; a rerun with
the same source and options CONTINUES from there (tensors in flight when it stopped are written
again). A rerun with a different source or options, or with --restart, starts afresh.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.checkpoint import (Entry, _dequantize_np, check_checkpoint, check_mtp_copies,
                                 hf_tensor_table, scale_name)
from dsv3_jax.config import ConfigError, ModelConfig, load_config
from dsv3_jax.layers import FP8_BLOCK, dequantize_blocks
from dsv3_jax.orbax_checkpoint import (CHUNK_BYTES, PARAMS, ArrayInfo, ParamWriter,
                                       abstract_model, chunk_shape, flat_abstract, row_bands,
                                       write_metadata)
from dsv3_jax.safetensors_io import CheckpointError, CheckpointReader

MAX_INFLIGHT = 512 * 2**20  # bytes handed to TensorStore and not yet committed
STATE, JOURNAL, PROVENANCE = "_convert_state.json", "_convert_done.txt", "dsv3_convert.json"
FORMAT = "dsv3_jax.orbax/1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_OWN_FILES = {"config.json", STATE, JOURNAL, PROVENANCE, "_CHECKPOINT_METADATA",
              "commit_success.txt", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
SIDE_FILE_MAX = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a conversion writes: parameter arrays, and the checkpoint tensors (units) feeding them."""

  cfg: ModelConfig
  dtype: str              # "fp8" (kept), "bf16", or the checkpoint's own dtype name
  param_dtype: np.dtype   # non-FP8 parameters
  keep_fp8: bool
  ckpt_fp8: bool
  table: dict[str, Entry]
  arrays: dict[tuple, ArrayInfo]
  units: list[str]        # checkpoint weight names in file order (scales travel with weights)
  unit_bytes: dict[str, int]


@dataclasses.dataclass(frozen=True)
class ConvertResult:
  out_dir: str
  tensors: int            # checkpoint tensors read (weights + scales)
  bytes_read: int
  seconds: float
  resumed: int            # weights skipped because a previous run had committed them


def plan_conversion(reader: CheckpointReader, cfg: ModelConfig, dtype: str | None) -> Plan:
  """Validates the checkpoint against its config (no tensor data read) and plans the arrays.

  Args:
    dtype: None keeps the checkpoint as it is (FP8 stays e4m3 + scales); "fp8" insists on that;
      "bf16" dequantizes FP8 weights and casts everything else to bfloat16.
  """
  where = reader.directory
  info = reader.info
  ckpt_fp8 = any(n.endswith("weight_scale_inv") for n in info)
  if ckpt_fp8 != cfg.fp8:
    raise CheckpointError(
        f"{where}: config.json and the weights disagree: the config "
        f"{'has' if cfg.fp8 else 'has no'} quantization_config but the checkpoint has "
        f"{'' if ckpt_fp8 else 'no '}weight_scale_inv tensors")
  if dtype == "fp8" and not ckpt_fp8:
    raise CheckpointError(f"{where} is not an FP8 checkpoint (no weight_scale_inv tensors); "
                          "--dtype fp8 keeps FP8 weights but does not quantize: omit --dtype")
  if dtype not in (None, "fp8", "bf16"):
    raise ValueError(f"{dtype=} must be None, 'fp8' or 'bf16'")
  keep_fp8 = ckpt_fp8 and dtype != "bf16"
  if dtype == "bf16":
    param_dtype = np.dtype(jnp.bfloat16)
  else:
    emb = info.get("model.embed_tokens.weight", (None,))[0]
    ok = emb is not None and jnp.issubdtype(emb, jnp.floating) and emb.itemsize >= 2
    param_dtype = emb if ok else np.dtype(jnp.bfloat16)  # else check_checkpoint reports it
  abstract = flat_abstract(abstract_model(cfg, jnp.dtype(param_dtype), keep_fp8))
  check_checkpoint(reader, cfg, abstract)
  table = hf_tensor_table(cfg)
  lead = {}
  for e in table.values():
    if e.path is not None:
      lead[e.path] = len(e.index)
      if e.scale_path is not None:
        lead[e.scale_path] = len(e.index)
  arrays = {p: ArrayInfo(tuple(s.shape), np.dtype(s.dtype), chunk_shape(s.shape, s.dtype, lead[p]))
            for p, s in abstract.items()}
  units = [n for n in reader.file_order() if n in table and table[n].copy_of is None]
  unit_bytes = {}
  lossy = []
  for n in units:
    dt, shape = info[n]
    nbytes = math.prod(shape) * dt.itemsize
    has_scale = ckpt_fp8 and table[n].scale_path is not None
    if has_scale:
      sdt, sshape = info[scale_name(n)]
      nbytes += math.prod(sshape) * sdt.itemsize
    elif dtype is None and not np.can_cast(dt, arrays[table[n].path].dtype, "safe"):
      lossy.append(f"{n} ({dt.name})")
    unit_bytes[n] = nbytes
  if lossy:
    warnings.warn(f"{len(lossy)} tensor(s) are cast to {param_dtype.name} (the embedding's dtype), "
                  f"losing precision: {', '.join(lossy[:6])}{' …' if len(lossy) > 6 else ''}",
                  stacklevel=2)
  name = "fp8" if keep_fp8 else ("bf16" if dtype == "bf16" else param_dtype.name)
  return Plan(cfg, name, param_dtype, keep_fp8, ckpt_fp8, table, arrays, units, unit_bytes)


def _unit_writes(reader: CheckpointReader, plan: Plan, name: str):
  """(path, index, array, source bytes) writes that put checkpoint tensor `name` (and its
  scale) in place, one chunk-aligned row band at a time. Arrays are memory-map views where no
  cast is needed; the file is mapped afresh for each band, so that the caller can drop the map
  (and its resident pages) once TensorStore has copied a band."""
  e = plan.table[name]
  info = plan.arrays[e.path]
  has_scale = plan.ckpt_fp8 and e.scale_path is not None
  s = reader.get(scale_name(name)) if has_scale else None
  if has_scale and plan.keep_fp8:
    yield e.scale_path, e.index, s, s.nbytes
  for r0, r1 in row_bands(info, len(e.index)):
    idx = e.index + (slice(r0, r1),)
    w = reader.get(name)[r0:r1]
    if has_scale and not plan.keep_fp8:  # bands start at multiples of 128: whole scale rows
      band = dequantize(w, s[r0 // FP8_BLOCK:-(-r1 // FP8_BLOCK)], info.dtype)
      yield e.path, idx, band, w.nbytes + (s.nbytes if r0 == 0 else 0)
    else:
      yield e.path, idx, (w if w.dtype == info.dtype else w.astype(info.dtype)), w.nbytes


_TINY_SCALE = 2.0**-117  # below this, e4m3 · scale can be an f32 subnormal


def dequantize(w: np.ndarray, s: np.ndarray, dtype) -> np.ndarray:
  """W = e4m3 · scale_inv in float32, cast to `dtype`: bitwise checkpoint._dequantize_np, run
  as layers.dequantize_blocks jitted on the CPU (~6× numpy's speed). XLA flushes subnormals,
  so scales small enough to produce them (never in real checkpoints) take the numpy path."""
  if s.size and float(s.min()) < _TINY_SCALE:
    return _dequantize_np(w, s).astype(dtype)
  with jax.default_device(jax.devices("cpu")[0]):
    return np.asarray(_dequantize_jit(w, s, jnp.dtype(dtype)))


_dequantize_jit = jax.jit(dequantize_blocks, static_argnums=2)


class _Flow:
  """Bounds the bytes handed to TensorStore but not yet committed (waiting for the oldest
  writes), and journals a tensor once every write of it is committed."""

  def __init__(self, journal, limit: int):
    self.journal, self.limit = journal, limit
    self.writes, self.units, self.bytes = collections.deque(), collections.deque(), 0
    self.journaled = 0

  def add(self, future, nbytes: int) -> None:
    self.writes.append((future, nbytes))
    self.bytes += nbytes
    while self.bytes > self.limit:
      f, n = self.writes.popleft()
      f.commit.result()
      self.bytes -= n
    self._journal()

  def end_unit(self, name: str, futures: list) -> None:
    self.units.append((name, futures))
    self._journal()

  def drain(self) -> None:
    while self.writes:
      self.writes.popleft()[0].commit.result()
    self._journal()

  def _journal(self) -> None:
    while self.units and all(f.commit.done() for f in self.units[0][1]):
      name, futures = self.units.popleft()
      for f in futures:
        f.commit.result()  # raises if the write failed
      self.journal.write(name + "\n")
      self.journal.flush()
      self.journaled += 1


def convert_hf_to_orbax(hf_dir: str, out_dir: str, *, dtype: str | None = None,
                        compression: bool = True, overwrite: bool = False,
                        restart: bool = False, progress: bool = True) -> ConvertResult:
  """Converts an HF DeepSeek checkpoint directory into our Orbax checkpoint at `out_dir`
  (see the module docstring; `dsv3_jax.from_pretrained(out_dir)` restores it)."""
  t0 = time.perf_counter()
  hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir.rstrip("/"))
  partial = out_dir + ".partial"
  check_out_dir(out_dir, overwrite, hf_dir)
  cfg = load_config(hf_dir)
  reader = CheckpointReader(hf_dir)
  try:
    plan = plan_conversion(reader, cfg, dtype)
    check_mtp_copies(reader, plan.table)
    state = _fingerprint(hf_dir, reader, plan, compression)
    done = None if restart else _resumable(partial, state)
    todo = [n for n in plan.units if n not in (done or ())]
    grow = 2 if plan.dtype == "bf16" and plan.ckpt_fp8 else 1  # e4m3 → bf16
    check_space(os.path.dirname(out_dir), grow * sum(plan.unit_bytes[n] for n in todo))
    # ---- everything is validated; from here on we write ----
    if done is None:
      done = _start_fresh(partial, state)
    _write_units(reader, plan, partial, todo, done, compression, progress)
  finally:
    reader.close()
  write_metadata(partial, plan.arrays)
  _write_config(hf_dir, partial, plan)
  copy_side_files(hf_dir, partial)
  n_tensors = sum(1 + (plan.ckpt_fp8 and plan.table[n].scale_path is not None) for n in plan.units)
  with open(os.path.join(partial, PROVENANCE), "w") as f:
    json.dump({"format": FORMAT, "source": hf_dir, "dtype": plan.dtype,
               "param_dtype": plan.param_dtype.name, "fp8": plan.keep_fp8,
               "compression": "zstd" if compression else None, "tensors": n_tensors,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f, indent=2)
  for f in (STATE, JOURNAL):
    os.remove(os.path.join(partial, f))
  finalize(partial, out_dir)
  return ConvertResult(out_dir, n_tensors, sum(plan.unit_bytes[n] for n in todo),
                       time.perf_counter() - t0, len(done))


def _write_units(reader, plan: Plan, partial: str, todo: list[str], done: set[str],
                 compression: bool, progress: bool) -> None:
  writer = ParamWriter(os.path.join(partial, PARAMS), plan.arrays, compression=compression)
  total = sum(plan.unit_bytes.values())
  bar = progress_bar(total, sum(plan.unit_bytes[n] for n in done), "HF → Orbax", progress)
  with open(os.path.join(partial, JOURNAL), "w") as journal:
    journal.write("".join(n + "\n" for n in sorted(done)))  # drops a torn last line
    flow = _Flow(journal, MAX_INFLIGHT)
    try:
      for i, name in enumerate(todo):
        futures = []
        for path, index, value, src_bytes in _unit_writes(reader, plan, name):
          f = writer.write(path, index, value)
          f.copy.result()  # TensorStore holds its own copy now: drop the mapped pages
          del value
          reader.file_of(name).close()
          futures.append(f)
          flow.add(f, math.prod(plan.arrays[path].chunks) * plan.arrays[path].dtype.itemsize)
          bar.update(src_bytes)
        if plan.ckpt_fp8 and plan.table[name].scale_path is not None:
          reader.file_of(scale_name(name)).close()
        flow.end_unit(name, futures)
        bar.set_postfix_str(f"{len(done) + i + 1}/{len(plan.units)} tensors", refresh=False)
      flow.drain()
    finally:
      bar.close()


def _fingerprint(hf_dir, reader, plan: Plan, compression: bool) -> dict:
  """What a partial conversion must match to be continued."""
  with open(os.path.join(hf_dir, "config.json"), "rb") as f:
    cfg_hash = hashlib.sha256(f.read()).hexdigest()
  files = {}
  for sf in reader.shards.values():
    st = os.stat(sf.path)
    files[os.path.basename(sf.path)] = [st.st_size, st.st_mtime_ns]
  return {"format": FORMAT, "source": hf_dir, "config_sha256": cfg_hash, "files": files,
          "dtype": plan.dtype, "compression": compression, "chunk_bytes": CHUNK_BYTES}


def _resumable(partial: str, state: dict) -> set[str] | None:
  """The tensors already committed by an interrupted run in OUT_DIR.partial with the same
  fingerprint, or None (nothing to continue). Reads only."""
  if not os.path.isdir(partial):
    return None
  try:
    with open(os.path.join(partial, STATE)) as f:
      same = json.load(f) == state
    with open(os.path.join(partial, JOURNAL)) as f:
      lines = f.read().split("\n")
  except (OSError, ValueError):
    same = False
  if not same:
    print(f"{partial} holds a conversion of another source or with other options: starting "
          "afresh", file=sys.stderr)
    return None
  done = set(lines[:-1])  # the last line is complete only if the file ends with "\n"
  print(f"continuing the interrupted conversion in {partial}: {len(done)} tensors already "
        "written", file=sys.stderr)
  return done


def _start_fresh(partial: str, state: dict) -> set[str]:
  if os.path.exists(partial):
    shutil.rmtree(partial)
  os.makedirs(partial)
  with open(os.path.join(partial, STATE), "w") as f:
    json.dump(state, f, indent=2)
  open(os.path.join(partial, JOURNAL), "w").close()
  return set()


def _write_config(hf_dir: str, dst: str, plan: Plan) -> None:
  """The source config.json verbatim; with FP8 dequantized, without quantization_config (as
  DeepSeek's fp8_cast_bf16 does) and with torch_dtype set to the new dtype."""
  src = os.path.join(hf_dir, "config.json")
  if plan.keep_fp8 or plan.dtype == plan.param_dtype.name:
    shutil.copyfile(src, os.path.join(dst, "config.json"))
    return
  with open(src) as f:
    d = json.load(f)
  d.pop("quantization_config", None)
  d["torch_dtype"] = {"bfloat16": "bfloat16", "float32": "float32",
                      "float16": "float16"}[plan.param_dtype.name]
  if "dtype" in d:
    d["dtype"] = d["torch_dtype"]
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(d, f, indent=2)
    f.write("\n")


# ---- shared with export -------------------------------------------------------------------------
def check_out_dir(out_dir: str, overwrite: bool, src: str) -> None:
  src = os.path.abspath(src)
  if out_dir == src or out_dir.startswith(src + os.sep) or src.startswith(out_dir + os.sep):
    raise FileExistsError(f"output {out_dir} overlaps the input {src}")
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")


def check_space(directory: str, need: int) -> None:
  os.makedirs(directory, exist_ok=True)
  free = shutil.disk_usage(directory).free
  if free < need:
    raise OSError(f"not enough disk space in {directory}: {need / 1e9:.1f} GB needed, "
                  f"{free / 1e9:.1f} GB free")


def finalize(partial: str, out_dir: str) -> None:
  """Atomic publication: OUT_DIR appears complete or not at all."""
  old = None
  if os.path.exists(out_dir):
    old = out_dir + f".old-{os.getpid()}"
    os.rename(out_dir, old)
  os.rename(partial, out_dir)
  if old:
    shutil.rmtree(old)


def copy_side_files(src: str, dst: str) -> list[str]:
  """Tokenizer files and other small top-level files (tokenizer.json, tokenizer_config.json,
  generation_config.json, *.py of trust_remote_code, LICENSE, ...): everything but weights,
  indexes, config.json and our own files."""
  copied = []
  for name in sorted(os.listdir(src)):
    p = os.path.join(src, name)
    if (name.startswith(".") or name in _OWN_FILES or name.endswith(_WEIGHT_SUFFIXES)
        or not os.path.isfile(p) or os.path.getsize(p) > SIDE_FILE_MAX):
      continue
    shutil.copyfile(p, os.path.join(dst, name))
    copied.append(name)
  return copied


class _NoBar:
  def update(self, n):
    pass

  def set_postfix_str(self, s, refresh=True):
    pass

  def close(self):
    pass


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
  """A tqdm bar over bytes (shows GB done and GB/s); a no-op when disabled."""
  if not enabled:
    return _NoBar()
  from tqdm import tqdm

  return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
              unit_divisor=1000, dynamic_ncols=True, smoothing=0.05, file=sys.stderr)


def parse_size(text: str) -> int:
  units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
  t = text.strip().upper()
  num = t.rstrip("KMGTIB")
  try:
    return int(float(num) * units[t[len(num):]])
  except (ValueError, KeyError):
    raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MB)") from None


# ---- command line -------------------------------------------------------------------------------
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dsv3_jax.convert",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=(
          "Convert a DeepSeek-V2/V3 checkpoint between HF safetensors and our Orbax format.\n\n"
          "  HF → Orbax:  python -m dsv3_jax.convert HF_DIR OUT_DIR [--dtype fp8|bf16]\n"
          "  Orbax → HF:  python -m dsv3_jax.convert --export ORBAX_DIR HF_OUT_DIR\n\n"
          "Both stream tensor by tensor (memory stays small whatever the model size), validate\n"
          "everything before writing, write to DST.partial and rename it to DST when complete.\n"
          "An interrupted HF → Orbax run continues where it stopped when rerun with the same\n"
          "arguments; an interrupted export starts afresh. Restore a converted model with\n"
          "dsv3_jax.from_pretrained(OUT_DIR, mesh=...)."))
  parser.add_argument("src", metavar="SRC", help="HF checkpoint directory (or, with --export, "
                      "a converted Orbax directory)")
  parser.add_argument("dst", metavar="DST", help="output directory (must not exist unless "
                      "--overwrite)")
  parser.add_argument("--export", action="store_true",
                      help="Orbax → HF safetensors (sharded, index.json, config and tokenizer "
                           "files), loadable by HF transformers, vLLM, SGLang")
  parser.add_argument("--dtype", choices=("fp8", "bf16"), default=None,
                      help="HF → Orbax: fp8 keeps FP8 weights as e4m3 + block scales (the "
                           "default for FP8 checkpoints); bf16 dequantizes them and casts the "
                           "rest to bfloat16, dropping quantization_config. Default: keep the "
                           "checkpoint's dtypes")
  parser.add_argument("--no-compression", action="store_true",
                      help="HF → Orbax: store raw chunks instead of zstd (faster, larger)")
  parser.add_argument("--restart", action="store_true",
                      help="HF → Orbax: discard DST.partial of an interrupted run instead of "
                           "continuing it")
  parser.add_argument("--max-shard-size", type=parse_size, default="5GB",
                      help="--export: largest safetensors file (default 5GB)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  try:
    if args.export:
      from dsv3_jax.export import export_orbax_to_hf

      if args.dtype or args.no_compression or args.restart:
        parser.error("--dtype, --no-compression and --restart apply to HF → Orbax only")
      r = export_orbax_to_hf(args.src, args.dst, max_shard_bytes=args.max_shard_size,
                             overwrite=args.overwrite, progress=not args.no_progress)
      print(f"wrote {r.tensors} tensors ({r.bytes_written / 1e9:.2f} GB) in {r.files} file(s) "
            f"to {r.out_dir} in {r.seconds:.1f}s")
    else:
      r = convert_hf_to_orbax(args.src, args.dst, dtype=args.dtype,
                              compression=not args.no_compression, overwrite=args.overwrite,
                              restart=args.restart, progress=not args.no_progress)
      print(f"converted {r.tensors} tensors ({r.bytes_read / 1e9:.2f} GB read"
            f"{f', {r.resumed} done before' if r.resumed else ''}) to {r.out_dir} in "
            f"{r.seconds:.1f}s")
  except (CheckpointError, ConfigError, FileExistsError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"\ninterrupted: {os.path.abspath(args.dst)} was not created; rerun the same command "
          "to " + ("start the export again" if args.export else "continue"), file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())

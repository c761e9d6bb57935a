"""Our Orbax checkpoint → HF safetensors (`python -m dsv3_jax.convert --export SRC DST`).

The output is what DeepSeek releases and HF transformers, vLLM and SGLang load: shards named
model-0000k-of-0000n.safetensors of at most --max-shard-size, model.safetensors.index.json,
config.json and the tokenizer files. Names come from the one mapping table
(checkpoint.hf_tensor_table); the MTP layers' copies of embed_tokens and shared_head.head are
written again from the main model's. An HF → Orbax → HF round trip is bit-exact: same names,
dtypes and bytes.

Streaming: each shard's header is computed from the parameter shapes up front, then the data is
appended tensor by tensor, one chunk-aligned row band at a time, with the next band's read in
flight while the current one is written. Resident memory is a few bands. The files go to
DST.partial, renamed to DST when complete; an interrupted export restarts from scratch.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import struct
import time

import jax.numpy as jnp
import numpy as np

from dsv3_jax.checkpoint import hf_tensor_table, scale_name
from dsv3_jax.config import load_config
from dsv3_jax.convert import (check_out_dir, check_space, copy_side_files, finalize,
                              progress_bar)
from dsv3_jax.orbax_checkpoint import (PARAMS, ParamReader, abstract_model, check_params,
                                       flat_abstract, param_name, row_bands, stored_layout)
from dsv3_jax.safetensors_io import DTYPES, CheckpointError

_ST_DTYPE = {v: k for k, v in DTYPES.items()}
_PREFETCH = 3  # band reads in flight


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One checkpoint tensor and where its bytes live: parameter `param`, slice `index`."""

  name: str
  param: str
  index: tuple[int, ...]
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class ExportResult:
  out_dir: str
  tensors: int
  files: int
  bytes_written: int
  seconds: float


def plan_tensors(cfg, arrays, fp8: bool) -> list[Tensor]:
  """Every HF tensor (weights, their scales, the MTP copies), layer by layer."""
  table = hf_tensor_table(cfg)
  out = []
  for name, e in table.items():
    src = table[e.copy_of] if e.copy_of is not None else e
    pairs = [(name, src.path)]
    if fp8 and src.scale_path is not None:
      pairs.append((scale_name(name), src.scale_path))
    for n, path in pairs:
      info = arrays[param_name(path)]
      out.append(Tensor(n, param_name(path), src.index, info.dtype,
                        info.shape[len(src.index):]))
  return out


def shard(tensors: list[Tensor], max_bytes: int) -> list[list[Tensor]]:
  """Consecutive groups of at most max_bytes (a larger tensor gets a file of its own)."""
  shards, size = [[]], 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards


def safetensors_header(tensors: list[Tensor]) -> bytes:
  """The safetensors header: u64 length, JSON padded with spaces to a multiple of 8."""
  head, off = {"__metadata__": {"format": "pt"}}, 0
  for t in tensors:
    head[t.name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape),
                    "data_offsets": [off, off + t.nbytes]}
    off += t.nbytes
  raw = json.dumps(head, separators=(",", ":")).encode()
  raw += b" " * (-(len(raw) + 8) % 8)
  return struct.pack("<Q", len(raw)) + raw


def _bands(reader: ParamReader, t: Tensor):
  """Read futures of the tensor's row bands, in order."""
  info = reader.arrays[t.param]
  for r0, r1 in row_bands(info, len(t.index)):
    yield reader.read(t.param, t.index + (slice(r0, r1),))


def _write_file(path: str, tensors: list[Tensor], reader: ParamReader, bar) -> int:
  futures = (f for t in tensors for f in _bands(reader, t))
  pending = collections.deque()
  written = 0
  with open(path, "wb") as f:
    f.write(safetensors_header(tensors))
    for fut in futures:
      pending.append(fut)
      if len(pending) < _PREFETCH:
        continue
      written += _drain_one(f, pending, bar)
    while pending:
      written += _drain_one(f, pending, bar)
  return written


def _drain_one(f, pending, bar) -> int:
  band = np.ascontiguousarray(pending.popleft().result())
  f.write(band.view(np.uint8).reshape(-1).data)  # little-endian, C order: safetensors' layout
  bar.update(band.nbytes)
  return band.nbytes


def export_orbax_to_hf(orbax_dir: str, hf_out: str, *, max_shard_bytes: int = 5 * 10**9,
                       overwrite: bool = False, progress: bool = True) -> ExportResult:
  """Writes the converted model in `orbax_dir` (config.json + params/) as an HF checkpoint."""
  t0 = time.perf_counter()
  orbax_dir, hf_out = os.path.abspath(orbax_dir), os.path.abspath(hf_out.rstrip("/"))
  check_out_dir(hf_out, overwrite, orbax_dir)
  cfg = load_config(orbax_dir)
  params_dir = os.path.join(orbax_dir, PARAMS)
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"{orbax_dir} has no {PARAMS}/ directory: not a converted checkpoint "
                          "(make one with `python -m dsv3_jax.convert HF_DIR OUT_DIR`)")
  reader = ParamReader(params_dir)
  param_dtype, fp8 = stored_layout(cfg, reader.arrays, params_dir)
  check_params(params_dir, reader.arrays,
               flat_abstract(abstract_model(cfg, jnp.dtype(param_dtype), fp8)))
  tensors = plan_tensors(cfg, reader.arrays, fp8)
  unknown = sorted({t.dtype.name for t in tensors if t.dtype not in _ST_DTYPE})
  if unknown:
    raise CheckpointError(f"{params_dir}: dtypes {unknown} have no safetensors name")
  total = sum(t.nbytes for t in tensors)
  check_space(os.path.dirname(hf_out), total)
  # ---- everything is validated; from here on we write ----
  partial = hf_out + ".partial"
  if os.path.exists(partial):
    shutil.rmtree(partial)
  os.makedirs(partial)
  groups = shard(tensors, max_shard_bytes)
  names = (["model.safetensors"] if len(groups) == 1 else
           [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
  bar = progress_bar(total, 0, "Orbax → HF", progress)
  try:
    for fname, group in zip(names, groups):
      _write_file(os.path.join(partial, fname), group, reader, bar)
  finally:
    bar.close()
  if len(groups) > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {t.name: f for f, g in zip(names, groups) for t in g}}
    with open(os.path.join(partial, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
      f.write("\n")
  shutil.copyfile(os.path.join(orbax_dir, "config.json"), os.path.join(partial, "config.json"))
  copy_side_files(orbax_dir, partial)
  finalize(partial, hf_out)
  return ExportResult(hf_out, len(tensors), len(groups), total, time.perf_counter() - t0)

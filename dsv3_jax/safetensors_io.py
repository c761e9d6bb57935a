"""Zero-copy, validating reader of .safetensors files through numpy memory maps.

The `safetensors` package writes our files, but its numpy reader cannot return float8 tensors
(numpy has no float8 dtype; DeepSeek's weights are F8_E4M3), and its flax reader copies every
tensor onto a device. This reader maps the file once and returns ml_dtypes-typed views, so a
tensor costs no memory until it is read, and it checks everything a truncated or corrupt file
can get wrong. The format: u64 little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
  """A checkpoint that is missing, corrupt, or does not match the model."""


class SafetensorsFile:
  """One .safetensors file: `.info[name] = (dtype, shape)`, `.get(name)` → read-only memmap view."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
          raise CheckpointError(f"{path}: truncated ({size} bytes): no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
          raise CheckpointError(f"{path}: header length {n} is past the end of the file "
                                f"({size} bytes): truncated or not a safetensors file")
        raw = f.read(n)
    except OSError as e:
      raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
      header = json.loads(raw)
      if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header (bad JSON: {e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    data_len = size - self._data_start
    self.info: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    self._offsets: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
      try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
      except KeyError as e:
        raise CheckpointError(f"{path}: tensor {name!r} has an unknown dtype or a malformed "
                              f"entry ({e}): {entry}") from None
      except (TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed entry: {entry}") from None
      nbytes = math.prod(shape) * dtype.itemsize
      if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} offsets {[begin, end]} do not hold "
                              f"{entry['dtype']}{list(shape)} ({nbytes} bytes)")
      if end > data_len:
        raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} of the data section, "
                              f"past the end of the file ({data_len} data bytes): truncated?")
      self.info[name] = (dtype, shape)
      self._offsets[name] = (begin, end)
    self._map = None

  def get(self, name: str) -> np.ndarray:
    """A read-only view of the tensor (memory-mapped; bytes are read when touched)."""
    dtype, shape = self.info[name]
    begin, end = self._offsets[name]
    if begin == end:
      return np.zeros(shape, dtype)
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    return self._map[self._data_start + begin:self._data_start + end].view(dtype).reshape(shape)

  def offset(self, name: str) -> int:
    """Byte offset of the tensor in the data section (file order)."""
    return self._offsets[name][0]

  def close(self):
    """Drops this reader's memory map (its pages leave the resident set once no view of it is
    alive); a later `get` maps the file again."""
    self._map = None


class CheckpointReader:
  """All tensors of an HF checkpoint directory (one model.safetensors, or shards listed by
  model.safetensors.index.json). `.info[name] = (dtype, shape)`, `.get(name)`."""

  def __init__(self, directory: str):
    self.directory = directory
    if not os.path.isdir(directory):
      raise CheckpointError(f"checkpoint directory {directory} does not exist")
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
      shard_names = sorted(set(weight_map.values()))
    else:
      names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
      if not names:
        pickled = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth"))]
        hint = (f" It has {pickled}: pickled PyTorch files are never loaded (unpickling runs "
                "code). Convert them to safetensors first, e.g. with "
                "`transformers` `save_pretrained(..., safe_serialization=True)`."
                if pickled else "")
        raise CheckpointError(f"no .safetensors files in {directory}.{hint}")
      weight_map, shard_names = None, names
    self.shards: dict[str, SafetensorsFile] = {}
    for shard in shard_names:
      p = os.path.join(directory, shard)
      if not os.path.exists(p):
        raise CheckpointError(f"{index_path} lists shard {shard}, which is missing")
      self.shards[shard] = SafetensorsFile(p)
    self._where: dict[str, SafetensorsFile] = {}
    for shard, sf in self.shards.items():
      for name in sf.info:
        if name in self._where:
          raise CheckpointError(f"tensor {name!r} appears in both {self._where[name].path} "
                                f"and {sf.path}")
        if weight_map is not None and weight_map.get(name) != shard:
          raise CheckpointError(f"tensor {name!r} is in {shard} but the index says "
                                f"{weight_map.get(name)!r}")
        self._where[name] = sf
    if weight_map is not None:
      absent = sorted(set(weight_map) - set(self._where))
      if absent:
        raise CheckpointError(f"the index lists tensors that no shard holds: "
                              f"{_preview(absent)}")
    self.info = {n: sf.info[n] for n, sf in self._where.items()}

  def get(self, name: str) -> np.ndarray:
    return self._where[name].get(name)

  def file_of(self, name: str) -> SafetensorsFile:
    return self._where[name]

  def file_order(self) -> list[str]:
    """Every tensor name, shard by shard in data-offset order (sequential reads)."""
    return [n for sf in self.shards.values() for n in sorted(sf.info, key=sf.offset)]

  def close(self):
    for sf in self.shards.values():
      sf.close()


def _preview(names, n=8) -> str:
  names = list(names)
  more = f" … and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(names[:n]) + more

"""Our Orbax checkpoint directory: written one slice at a time, restored by Orbax's own restore.

Layout of a converted model (`python -m dsv3_jax.convert`):

    OUT_DIR/
      config.json, tokenizer.json, ...     the HF side files, for export and for serving engines
      dsv3_convert.json                    provenance: source, dtype, tensor count
      _CHECKPOINT_METADATA                 an Orbax composite checkpoint with one item, "params"
      params/                              an Orbax PyTree checkpoint (StandardCheckpointHandler)
        _METADATA                          tree metadata: one entry per parameter
        array_metadatas/process_0          write and chunk shape per parameter
        manifest.ocdbt, d/                 one OCDBT key-value database holding every parameter
                                           as a zarr v2 array (zstd), keyed by its dotted tree path

The tree is `nnx.to_pure_dict` of the Transformer's parameters: layer groups stacked on a
leading [L] axis, routed experts on [E] (e.g. `moe_layers.mlp.experts.gate_proj` [L, E, F, D]).

Incremental writes (why the 671B checkpoint needs no 700 GB of RAM): Orbax's own save wants every
array whole in memory. Here each parameter is created up front as an empty zarr array in the
OCDBT database (the same driver stack, options and key names Orbax writes), with chunks of one
layer/expert slice, split into row bands of at most CHUNK_BYTES. A checkpoint tensor then lands
with a TensorStore write of exactly the chunks it covers (`array[l, e, r0:r1] = band`), so
nothing is ever read back, merged or stacked in memory; OCDBT commits each write atomically, so
an interrupted run leaves a consistent database. After the last write the Orbax metadata files
(`_METADATA`, `array_metadatas/`, `_CHECKPOINT_METADATA`) are written, in the JSON forms of
orbax-checkpoint 0.12.4, and `ocp.StandardCheckpointer().restore(OUT_DIR/params, target)`
(used by `from_pretrained`) reads the result like any Orbax checkpoint: with target shardings,
each process reads only the chunks that its devices hold.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.safetensors_io import CheckpointError, _preview
from dsv3_jax.sharding import INFER_RULES, param_shardings

PARAMS = "params"
CHUNK_BYTES = 64 * 2**20  # largest zarr chunk; a row band of a big tensor (embedding, o_proj)
_HANDLER = ("orbax.checkpoint._src.handlers.standard_checkpoint_handler."
            "StandardCheckpointHandler")
_DICT_KEY = 2  # orbax KeyType.DICT
_OCDBT_FILE_SIZE = 2**31  # orbax's default target size of an OCDBT data file

Path = tuple


def param_name(path: Path) -> str:
  """Orbax's name of a tree path: its keys joined by dots ("mtp.0.block.mlp.gate.weight")."""
  return ".".join(str(k) for k in path)


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
  """One stored parameter: global shape, dtype and zarr chunk shape."""

  shape: tuple[int, ...]
  dtype: np.dtype
  chunks: tuple[int, ...]


def chunk_shape(shape: tuple[int, ...], dtype, lead: int) -> tuple[int, ...]:
  """Chunks of one layer/expert slice (the `lead` stacked axes are 1), split into bands of rows
  (a multiple of 128, FP8's block, when split) so a chunk holds at most CHUNK_BYTES."""
  if len(shape) <= lead:
    raise ValueError(f"{shape=} has no axis after its {lead} stacked axes")
  rows, rest = shape[lead], shape[lead + 1:]
  row_bytes = max(1, math.prod(rest) * np.dtype(dtype).itemsize)
  band = CHUNK_BYTES // row_bytes
  if band < rows:
    rows = max(128, band // 128 * 128)
  return (1,) * lead + (max(rows, 1),) + tuple(rest)


def row_bands(info: ArrayInfo, lead: int) -> list[tuple[int, int]]:
  """[(r0, r1)]: the row ranges of one layer/expert slice that are whole chunks."""
  n, step = info.shape[lead], info.chunks[lead]
  return [(r, min(r + step, n)) for r in range(0, n, step)]


def _kvstore(params_dir: str, name: str | None = None, *, ocdbt: bool = True) -> dict:
  """The kvstore spec orbax uses for a local checkpoint (tensorstore_utils.build_kvstore_tspec)."""
  params_dir = os.path.abspath(params_dir)
  if not ocdbt:
    return {"driver": "file", "path": os.path.join(params_dir, name or "")}
  spec = {"driver": "ocdbt",
          "base": {"driver": "file", "path": params_dir, "file_io_locking": {"mode": "non_atomic"}},
          "manifest": {"driver": "file", "path": params_dir},
          "cache_pool": "cache_pool#ocdbt"}
  if name is not None:
    spec["path"] = name
  return spec


def ts_context(file_io: int = 128):
  import tensorstore as ts

  return ts.Context({"file_io_concurrency": {"limit": file_io},
                     "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})


class ParamWriter:
  """Creates (or reopens, to resume) every parameter array, then writes slices in any order.

  Args:
    params_dir: the `params/` directory of the checkpoint being written.
    arrays: tree path → ArrayInfo of every parameter.
    compression: zstd chunks (orbax's default) or raw.
  """

  def __init__(self, params_dir: str, arrays: dict[Path, ArrayInfo], *, compression: bool = True):
    import tensorstore as ts

    os.makedirs(params_dir, exist_ok=True)
    self.arrays = arrays
    self._ctx = ts_context()
    pending = {}
    for path, info in arrays.items():
      kv = _kvstore(params_dir, param_name(path))
      kv.update(target_data_file_size=_OCDBT_FILE_SIZE, assume_config=True,
                config={"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000,
                        "manifest_kind": "single"})
      spec = {"driver": "zarr", "kvstore": kv, "recheck_cached_data": False,
              "recheck_cached_metadata": False, "store_data_equal_to_fill_value": True,
              "dtype": np.dtype(info.dtype).name,
              "metadata": {"shape": list(info.shape), "chunks": list(info.chunks),
                           "compressor": {"id": "zstd", "level": 1} if compression else None}}
      pending[path] = ts.open(spec, create=True, open=True, context=self._ctx)
    self._stores = {p: f.result() for p, f in pending.items()}

  def write(self, path: Path, index: tuple, value: np.ndarray):
    """Starts writing `value` into `path[index]`; returns TensorStore WriteFutures (.copy: the
    source buffer may be released; .commit: the data is durably in the database)."""
    return self._stores[path][index].write(value)


def write_metadata(ckpt_dir: str, arrays: dict[Path, ArrayInfo]) -> None:
  """Orbax's metadata for the arrays written into `ckpt_dir/params` (JSON forms of
  orbax-checkpoint 0.12.4: PyTree `_METADATA`, `array_metadatas/process_0`, the composite
  step's `_CHECKPOINT_METADATA`, and the `commit_success.txt` markers)."""
  params_dir = os.path.join(ckpt_dir, PARAMS)
  tree = {}
  for path, info in arrays.items():
    keys = tuple(str(k) for k in path)
    tree[str(keys)] = {
        "key_metadata": [{"key": k, "key_type": _DICT_KEY} for k in keys],
        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                           "write_shape": list(info.chunks)}}
  _write_json(os.path.join(params_dir, "_METADATA"), {
      "tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
      "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
  os.makedirs(os.path.join(params_dir, "array_metadatas"), exist_ok=True)
  _write_json(os.path.join(params_dir, "array_metadatas", "process_0"), {"array_metadatas": [
      {"array_metadata": {"param_name": param_name(p), "write_shape": list(i.chunks),
                          "chunk_shape": list(i.chunks), "ext_metadata": None}}
      for p, i in arrays.items()]})
  now = time.time_ns()
  _write_json(os.path.join(ckpt_dir, "_CHECKPOINT_METADATA"), {
      "item_handlers": {PARAMS: _HANDLER}, "metrics": {}, "performance_metrics": {},
      "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now, "custom_metadata": {}})
  for d in (params_dir, ckpt_dir):
    with open(os.path.join(d, "commit_success.txt"), "w") as f:
      f.write(f"Checkpoint commit was successful to {d}")


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f)


# ---- reading ------------------------------------------------------------------------------------
class ParamReader:
  """The parameters of an Orbax PyTree checkpoint (ours, or any saved by orbax with the same
  tree), read slice by slice through TensorStore. `.arrays[name] = ArrayInfo`, `.read(...)`."""

  def __init__(self, params_dir: str):
    import tensorstore as ts

    meta_path = os.path.join(params_dir, "_METADATA")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      tree = meta["tree_metadata"]
    except FileNotFoundError:
      raise CheckpointError(f"{params_dir} is not an Orbax checkpoint (no _METADATA): convert "
                            "an HF checkpoint with `python -m dsv3_jax.convert HF_DIR OUT_DIR`"
                            ) from None
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{meta_path}: not valid Orbax tree metadata ({e!r})") from None
    ocdbt = meta.get("use_ocdbt", True)
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    names = [".".join(str(k["key"]) for k in v["key_metadata"]) for v in tree.values()]
    ctx = ts_context()
    pending = {n: ts.open({"driver": driver, "kvstore": _kvstore(params_dir, n, ocdbt=ocdbt),
                           "recheck_cached_data": False, "recheck_cached_metadata": False},
                          open=True, read=True, context=ctx) for n in names}
    self._stores, self.arrays = {}, {}
    for n, fut in pending.items():
      try:
        store = fut.result()
      except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/OSError variants
        raise CheckpointError(f"{params_dir}: cannot open parameter {n!r}: {e}") from None
      self._stores[n] = store
      chunks = store.chunk_layout.read_chunk.shape
      self.arrays[n] = ArrayInfo(tuple(store.shape), np.dtype(store.dtype.numpy_dtype),
                                 tuple(chunks) if chunks is not None else tuple(store.shape))

  def read(self, name: str, index: tuple = ()):
    """A future of `name[index]` as a numpy array (call .result())."""
    return self._stores[name][index].read()


def check_params(params_dir: str, arrays: dict[str, ArrayInfo],
                 abstract: dict[Path, jax.ShapeDtypeStruct]) -> None:
  """Raises CheckpointError listing every missing, unexpected, misshapen or mistyped parameter."""
  want = {param_name(p): s for p, s in abstract.items()}
  problems = []
  missing = sorted(set(want) - set(arrays))
  unexpected = sorted(set(arrays) - set(want))
  if missing:
    problems.append(f"{len(missing)} missing parameter(s): {_preview(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected parameter(s): {_preview(unexpected)}")
  shapes = [f"{n} has shape {list(arrays[n].shape)}, expected {list(s.shape)}"
            for n, s in want.items() if n in arrays and arrays[n].shape != tuple(s.shape)]
  if shapes:
    problems.append(f"{len(shapes)} misshapen parameter(s): {_preview(shapes, 6)}")
  dtypes = [f"{n} is {arrays[n].dtype.name}, expected {np.dtype(s.dtype).name}"
            for n, s in want.items() if n in arrays and arrays[n].dtype != np.dtype(s.dtype)]
  if dtypes:
    problems.append(f"{len(dtypes)} parameter(s) of the wrong dtype: {_preview(dtypes, 6)}")
  if problems:
    raise CheckpointError(f"Orbax checkpoint {params_dir} does not match its config.json:\n  - "
                          + "\n  - ".join(problems))


def stored_layout(cfg, arrays: dict[str, ArrayInfo], where: str) -> tuple[np.dtype, bool]:
  """(param dtype, fp8) of a stored checkpoint: the embedding's dtype; FP8 if it holds block
  scales. Raises CheckpointError if that disagrees with the config's quantization_config."""
  emb = arrays.get("embed_tokens.weight")
  if emb is None:
    raise CheckpointError(f"{where} has no embed_tokens.weight parameter: not a dsv3_jax model")
  fp8 = any(n.endswith("scale_inv") for n in arrays)
  if fp8 != cfg.fp8:
    raise CheckpointError(
        f"{where}: config.json {'has' if cfg.fp8 else 'has no'} quantization_config but the "
        f"parameters {'hold' if fp8 else 'hold no'} FP8 block scales (weight_scale_inv)")
  return emb.dtype, fp8


def abstract_model(cfg, param_dtype, fp8: bool, compute_dtype=None) -> nnx.Module:
  from dsv3_jax.model import Transformer

  return nnx.eval_shape(lambda: Transformer(
      cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=compute_dtype or param_dtype,
      fp8=fp8))


def flat_abstract(model: nnx.Module) -> dict[Path, jax.ShapeDtypeStruct]:
  _, state = nnx.split(model)
  return {k: v.get_value() for k, v in nnx.to_flat_state(state)}


# ---- restore ------------------------------------------------------------------------------------
def from_pretrained(directory: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
                    rules=INFER_RULES, *, dtype=None, compute_dtype=None):
  """Restores a converted model (see `python -m dsv3_jax.convert`) with Orbax.

  Args:
    directory: OUT_DIR of a conversion (config.json + params/).
    mesh: shard the parameters over this mesh by `rules` (each process reads only the chunks its
      devices hold); None: everything on the first device.
    rules: logical-axis → mesh-axis table (sharding.INFER_RULES or TRAIN_RULES).
    dtype: restore the parameters as this dtype (cast while reading; default: as stored).
      FP8 weights and their scales stay e4m3 / float32.
    compute_dtype: activation dtype (default: the parameter dtype).
  Returns:
    a Transformer; `model(tokens [B, T])` → logits [B, T, V].
  """
  import orbax.checkpoint as ocp

  from dsv3_jax.config import load_config

  directory = os.path.abspath(os.fspath(directory))
  params_dir = os.path.join(directory, PARAMS)
  cfg = load_config(directory)
  arrays = ParamReader(params_dir).arrays
  param_dtype, fp8 = stored_layout(cfg, arrays, params_dir)
  check_params(params_dir, arrays, flat_abstract(abstract_model(cfg, jnp.dtype(param_dtype), fp8)))
  model = abstract_model(cfg, jnp.dtype(dtype or param_dtype), fp8, compute_dtype)
  graphdef, state = nnx.split(model)
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: dev, nnx.to_pure_dict(state))
  else:
    shardings = nnx.to_pure_dict(param_shardings(state, mesh, rules))
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        nnx.to_pure_dict(state), shardings)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(params_dir, target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)

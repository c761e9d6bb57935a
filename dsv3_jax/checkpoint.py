"""HF DeepSeek checkpoints → our parameters. The name mapping is data (`hf_tensor_table`).

Every tensor of the checkpoint is used exactly once and every parameter is filled exactly once;
anything else (missing, unexpected, misshapen, wrongly typed tensors) is one CheckpointError
that lists them all. Nothing is unpickled: only .safetensors files are read, through memory maps.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig, load_config
from dsv3_jax.layers import FP8_BLOCK, scale_shape
from dsv3_jax.safetensors_io import CheckpointError, CheckpointReader, _preview

Path = tuple  # a flat nnx state path, e.g. ("moe_layers", "mlp", "experts", "gate_proj")


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one checkpoint tensor goes.

  path: the parameter's flat state path; index: the (layer,) or (layer, expert) slice of a
  stacked parameter; scale_path: where its FP8 `weight_scale_inv` goes (None: never FP8);
  copy_of: the tensor is a duplicate of another checkpoint tensor (MTP's embedding and head).
  """

  path: Path | None
  index: tuple[int, ...] = ()
  scale_path: Path | None = None
  copy_of: str | None = None


def _linear(prefix: Path, index=()) -> Entry:
  return Entry(prefix + ("weight",), index, prefix + ("weight_scale_inv",))


def _layer_entries(cfg: ModelConfig, moe: bool, base: Path, idx: tuple[int, ...]):
  """(relative HF name, Entry) for one decoder layer stored at `base` (index `idx`)."""
  a = base + ("self_attn",)
  out = [("input_layernorm.weight", Entry(base + ("input_layernorm", "weight"), idx)),
         ("post_attention_layernorm.weight",
          Entry(base + ("post_attention_layernorm", "weight"), idx))]
  names = (["q_a_proj", "q_b_proj"] if cfg.q_lora_rank else ["q_proj"]) + [
      "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
  out += [(f"self_attn.{n}.weight", _linear(a + (n,), idx)) for n in names]
  norms = (["q_a_layernorm"] if cfg.q_lora_rank else []) + ["kv_a_layernorm"]
  out += [(f"self_attn.{n}.weight", Entry(a + (n, "weight"), idx)) for n in norms]
  m = base + ("mlp",)
  proj = ("gate_proj", "up_proj", "down_proj")
  if not moe:
    return out + [(f"mlp.{p}.weight", _linear(m + (p,), idx)) for p in proj]
  out.append(("mlp.gate.weight", Entry(m + ("gate", "weight"), idx)))
  if cfg.has_correction_bias:
    out.append(("mlp.gate.e_score_correction_bias",
                Entry(m + ("gate", "e_score_correction_bias"), idx)))
  ex = m + ("experts",)
  for e in range(cfg.n_routed_experts):
    out += [(f"mlp.experts.{e}.{p}.weight",
             Entry(ex + (p,), idx + (e,), ex + (p + "_scale_inv",))) for p in proj]
  if cfg.n_shared_experts:
    out += [(f"mlp.shared_experts.{p}.weight", _linear(m + ("shared_experts", p), idx))
            for p in proj]
  return out


def hf_tensor_table(cfg: ModelConfig) -> dict[str, Entry]:
  """Every checkpoint weight name (`.weight_scale_inv` companions excluded) → its Entry."""
  t = {"model.embed_tokens.weight": Entry(("embed_tokens", "weight")),
       "model.norm.weight": Entry(("norm", "weight")),
       "lm_head.weight": Entry(("lm_head", "weight"))}
  for i in range(cfg.num_hidden_layers):
    moe = i >= cfg.first_k_dense_replace
    base, li = (("moe_layers",), i - cfg.first_k_dense_replace) if moe else (("dense_layers",), i)
    for name, entry in _layer_entries(cfg, moe, base, (li,)):
      t[f"model.layers.{i}.{name}"] = entry
  for k in range(cfg.num_nextn_predict_layers):
    p, base = f"model.layers.{cfg.num_hidden_layers + k}.", ("mtp", k)
    for name, entry in _layer_entries(cfg, cfg.n_routed_experts > 0, base + ("block",), ()):
      t[p + name] = entry
    t[p + "enorm.weight"] = Entry(base + ("enorm", "weight"))
    t[p + "hnorm.weight"] = Entry(base + ("hnorm", "weight"))
    t[p + "eh_proj.weight"] = Entry(base + ("eh_proj", "weight"))
    t[p + "shared_head.norm.weight"] = Entry(base + ("shared_head_norm", "weight"))
    t[p + "embed_tokens.weight"] = Entry(None, copy_of="model.embed_tokens.weight")
    t[p + "shared_head.head.weight"] = Entry(None, copy_of="lm_head.weight")
  return t


def scale_name(name: str) -> str:
  return name[:-len("weight")] + "weight_scale_inv"


def expected_tensors(cfg: ModelConfig, abstract: dict[Path, jax.ShapeDtypeStruct],
                     fp8: bool) -> dict[str, tuple[int, ...]]:
  """Checkpoint name → shape, derived from the model's (abstract) parameter shapes. With fp8,
  every FP8-able weight has a `weight_scale_inv` [ceil(N/128), ceil(K/128)] beside it."""
  table = hf_tensor_table(cfg)
  out = {}
  for name, e in table.items():
    src = e if e.path is not None else table[e.copy_of]
    shape = tuple(abstract[src.path].shape[len(src.index):])
    out[name] = shape
    if fp8 and e.scale_path is not None:
      out[scale_name(name)] = scale_shape(*shape[-2:])
  return out


def _check_table_covers(table: dict[str, Entry], abstract: dict[Path, jax.ShapeDtypeStruct],
                        keep_fp8: bool):
  """Internal consistency: the table fills every parameter slice exactly once."""
  fills: dict[Path, tuple[int, int]] = {}
  for e in table.values():
    if e.path is None:
      continue
    for p in [e.path] + ([e.scale_path] if keep_fp8 and e.scale_path else []):
      n, _ = fills.get(p, (0, 0))
      fills[p] = (n + 1, len(e.index))
  for p, sds in abstract.items():
    n, depth = fills.get(p, (0, 0))
    if n == 0 or n != math.prod(sds.shape[:depth]):
      raise AssertionError(f"mapping table fills parameter {p} {n} times")
  if set(fills) - set(abstract):
    raise AssertionError(f"mapping table names unknown parameters {set(fills) - set(abstract)}")


def _flat_abstract(model_abstract: nnx.Module) -> dict[Path, jax.ShapeDtypeStruct]:
  _, state = nnx.split(model_abstract)
  return {k: v.get_value() for k, v in nnx.to_flat_state(state)}


def read_hf_params(directory: str, cfg: ModelConfig, model_abstract: nnx.Module,
                   progress: bool = False) -> dict[Path, np.ndarray]:
  """Reads and validates an HF checkpoint into host arrays shaped like `model_abstract`'s params.

  FP8 weights (e4m3 + weight_scale_inv) are dequantized to the parameter dtype, unless the
  model holds FP8 parameters itself, in which case weights and scales are copied as they are.
  Raises CheckpointError naming every missing, unexpected, misshapen or mistyped tensor.
  """
  abstract = _flat_abstract(model_abstract)
  keep_fp8 = any(p[-1].endswith("scale_inv") for p in abstract)
  table = hf_tensor_table(cfg)
  reader = CheckpointReader(directory)
  try:
    ckpt_fp8 = check_checkpoint(reader, cfg, abstract)
    return _assemble(reader, table, abstract, keep_fp8, ckpt_fp8, progress)
  finally:
    reader.close()


_WEIGHT_DTYPES = {np.dtype(t) for t in (np.float64, np.float32, np.float16, jnp.bfloat16)}


def check_checkpoint(reader: CheckpointReader, cfg: ModelConfig,
                     abstract: dict[Path, jax.ShapeDtypeStruct]) -> bool:
  """Validates the checkpoint's tensor names, shapes and dtypes against the parameters
  `abstract` (flat path → ShapeDtypeStruct) without reading any tensor data.

  Returns whether the checkpoint is FP8 (has weight_scale_inv tensors). Raises CheckpointError
  listing every problem.
  """
  keep_fp8 = any(p[-1].endswith("scale_inv") for p in abstract)
  table = hf_tensor_table(cfg)
  _check_table_covers(table, abstract, keep_fp8)
  present = reader.info
  ckpt_fp8 = any(n.endswith("weight_scale_inv") for n in present)
  if keep_fp8 and not ckpt_fp8:
    raise CheckpointError(f"{reader.directory}: the model holds FP8 parameters but the checkpoint "
                          "has no weight_scale_inv tensors (it is not an FP8 checkpoint)")
  expected = expected_tensors(cfg, abstract, ckpt_fp8)
  _validate(reader.directory, expected, present, table)
  return ckpt_fp8


def check_mtp_copies(reader: CheckpointReader, table: dict[str, Entry],
                     band_bytes: int = 64 * 2**20) -> None:
  """The MTP layers' embed_tokens / shared_head.head must be bytewise copies of the main model's
  (we store one). Compared in row bands, so memory stays bounded for a 129280-row embedding."""
  for name, e in table.items():
    if e.copy_of is None:
      continue
    a, b = reader.get(name), reader.get(e.copy_of)
    rows = max(1, band_bytes // max(1, a[0].nbytes)) if a.ndim else 1
    same = a.dtype == b.dtype and a.shape == b.shape and all(
        np.array_equal(a[r:r + rows].view(np.uint8), b[r:r + rows].view(np.uint8))
        for r in range(0, len(a), rows))
    if not same:
      raise CheckpointError(f"{name} differs from {e.copy_of}: the MTP layer shares the main "
                            "model's embedding and head, and its copy must be identical")


def _validate(directory, expected, present, table):
  problems = []
  missing = sorted(set(expected) - set(present), key=_natural)
  unexpected = sorted(set(present) - set(expected), key=_natural)
  if missing:
    problems.append(f"{len(missing)} missing tensor(s): {_preview(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected tensor(s): {_preview(unexpected)}")
  bad_shape = [f"{n} has shape {list(present[n][1])}, expected {list(s)}"
               for n, s in expected.items() if n in present and tuple(present[n][1]) != s]
  if bad_shape:
    problems.append(f"{len(bad_shape)} misshapen tensor(s): {_preview(bad_shape, 6)}")
  bad_dtype = []
  for n, (dt, _) in present.items():
    if n not in expected:
      continue
    if n.endswith("weight_scale_inv"):
      ok = dt == np.float32
    elif scale_name(n) in present and table.get(n) and table[n].scale_path:
      ok = dt == jnp.float8_e4m3fn
    else:
      ok = dt in _WEIGHT_DTYPES
    if not ok:
      bad_dtype.append(f"{n} is {dt.name}")
  if bad_dtype:
    problems.append(f"{len(bad_dtype)} tensor(s) of the wrong dtype (weights float, FP8 "
                    f"weights e4m3, scales float32): {_preview(bad_dtype, 6)}")
  if problems:
    raise CheckpointError(f"checkpoint {directory} does not match its config "
                          f"(nothing was loaded):\n  - " + "\n  - ".join(problems))


def _natural(name: str):
  return [int(p) if p.isdigit() else p for p in name.split(".")]


def _dequantize_np(w: np.ndarray, s: np.ndarray) -> np.ndarray:
  n, k = w.shape
  full = np.repeat(np.repeat(s.astype(np.float32), FP8_BLOCK, 0), FP8_BLOCK, 1)[:n, :k]
  return w.astype(np.float32) * full


def _assemble(reader, table, abstract, keep_fp8, ckpt_fp8, progress) -> dict[Path, np.ndarray]:
  out = {p: np.empty(s.shape, s.dtype) for p, s in abstract.items()}
  items = list(table.items())
  for name, e in _progress(items, progress, "loading tensors"):
    if e.copy_of is not None:
      if not np.array_equal(reader.get(name), reader.get(e.copy_of)):
        raise CheckpointError(f"{name} differs from {e.copy_of}: the MTP layer shares the main "
                              "model's embedding and head, and its copy must be identical")
      continue
    w = reader.get(name)
    has_scale = ckpt_fp8 and e.scale_path is not None
    if has_scale and keep_fp8:
      out[e.scale_path][e.index] = reader.get(scale_name(name))
      out[e.path][e.index] = w
    elif has_scale:
      out[e.path][e.index] = _dequantize_np(w, reader.get(scale_name(name)))
    else:
      out[e.path][e.index] = w.astype(out[e.path].dtype)
  return out


def _progress(items, enabled: bool, desc: str) -> Iterator:
  if not enabled:
    yield from items
    return
  try:
    from tqdm import tqdm
  except ImportError:
    yield from items
    return
  yield from tqdm(items, desc=desc, unit="tensor")


def from_hf_pretrained(path: str | os.PathLike, dtype=jnp.bfloat16, *, fp8: bool = False,
                       compute_dtype=None, progress: bool = False, fp8_backend: str = "auto"):
  """Loads an HF DeepSeek-V2/V3 checkpoint directory into a Transformer.

  Args:
    path: directory with config.json and model.safetensors, or shards + index.json.
    dtype: parameter dtype (FP8 weights are dequantized to it unless fp8=True).
    fp8: keep FP8 projections as e4m3 + block scales (needs an FP8 checkpoint).
    compute_dtype: activation dtype (default: dtype).
    fp8_backend: how FP8 projections run (see Transformer): "auto" | "xla" | "triton" | "mosaic".
  Returns:
    a Transformer; `model(tokens [B, T])` → logits [B, T, V].
  """
  from dsv3_jax.model import Transformer

  path = os.fspath(path)
  cfg = load_config(path)
  dtype = jnp.dtype(dtype)
  make = lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=dtype,
                             dtype=compute_dtype or dtype, fp8=fp8, fp8_backend=fp8_backend)
  abstract = nnx.eval_shape(make)
  host = read_hf_params(path, cfg, abstract, progress=progress)
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  for p, v in flat:
    v.set_value(jnp.asarray(host.pop(p)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))

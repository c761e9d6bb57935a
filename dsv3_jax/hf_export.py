"""Our parameters → an HF-format checkpoint directory (config.json + model.safetensors), the
inverse of `checkpoint.from_hf_pretrained`, through the same name table (`hf_tensor_table`).

Weights are written in bf16 (or float32); `e_score_correction_bias` stays float32, as in
DeepSeek's releases. The MTP modules' copies of the embedding and head are written too (the
released layout has them, and the loader checks that they match).
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.checkpoint import hf_tensor_table
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import restacked_arrays

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def hf_tensors(cfg: ModelConfig, state: nnx.State, dtype=jnp.bfloat16) -> dict[str, np.ndarray]:
  """Checkpoint name → host array, from a model's full (non-FP8) parameter state, with scanned
  layer stacks or unstacked layers (`Transformer.unstack_layers`)."""
  flat = restacked_arrays(state)
  if any(p[-1].endswith("scale_inv") for p in flat):
    raise ValueError("exporting FP8 (e4m3 + block scales) parameters is not supported: export "
                     "a model with float parameters")
  table = hf_tensor_table(cfg)
  out = {}
  for name, entry in table.items():
    src = entry if entry.path is not None else table[entry.copy_of]
    if src.path not in flat:
      raise KeyError(f"{name}: the parameter {'/'.join(map(str, src.path))} is not in the state")
    value = np.asarray(flat[src.path])[src.index]
    keep_f32 = name.endswith("e_score_correction_bias")
    out[name] = np.ascontiguousarray(value.astype(np.float32 if keep_f32 else np.dtype(dtype)))
  return out


def export_hf(directory: str, cfg: ModelConfig, state: nnx.State, *, dtype=jnp.bfloat16,
              tokenizer_dir: str | None = None) -> str:
  """Writes config.json, model.safetensors and (if given) the tokenizer files into directory.

  Args:
    state: the model's parameter state (e.g. nnx.state(model), or biases and params merged).
  Returns:
    the path of model.safetensors.
  """
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  tensors = hf_tensors(cfg, state, dtype)
  path = os.path.join(directory, "model.safetensors")
  save_file(tensors, path + ".tmp", metadata={"format": "pt"})
  os.replace(path + ".tmp", path)
  extra = dict(cfg.extra, torch_dtype=jnp.dtype(dtype).name)
  cfg.replace(extra=extra).save(directory)
  if tokenizer_dir is not None:
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(directory, name))
    gen = os.path.join(directory, "generation_config.json")
    if not os.path.exists(gen):
      with open(gen, "w") as f:
        json.dump({k: v for k, v in cfg.extra.items() if k.endswith("token_id")}, f)
  return path

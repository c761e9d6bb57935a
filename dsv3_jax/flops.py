"""Training FLOPs per token from a config, and accelerator peaks, for MFU.

FLOPs/token = 6 · (matmul parameters a token passes through) + 3 · L_attn · N · (d_qk + d_v) · T
  * matmul parameters: every projection of the dense and MoE layers (routed experts counted
    K/E: only the chosen ones), the router, the head, and the MTP modules (eh_proj, their
    block, and the head once more per depth); the embedding lookup and norms are not matmuls;
  * attention scores and values: 2·N·(d_qk + d_v) FLOPs per token per visible key, forward, with
    a causal mask's average of T/2 visible keys; ×3 for forward + backward. Causal halving is
    the conservative choice (PaLM's formula counts the full T).
"""

from __future__ import annotations

import math

from flax import nnx

from dsv3_jax.config import ModelConfig


def matmul_params_per_token(cfg: ModelConfig) -> int:
  """Parameters every training token multiplies (see the module docstring)."""
  from dsv3_jax.info import abstract_model

  _, state = nnx.split(abstract_model(cfg))
  total = 0.0
  for path, var in nnx.to_flat_state(state):
    shape = var.get_value().shape
    name = path[-1]
    if len(shape) < 2 or name.endswith("scale_inv") or path[0] == "embed_tokens":
      continue
    n = math.prod(shape)
    if "experts" in path and "shared_experts" not in path:
      n = n * cfg.num_experts_per_tok / cfg.n_routed_experts
    if path[0] == "lm_head":
      n *= 1 + cfg.num_nextn_predict_layers
    total += n
  return int(total)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  attn_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  attn = 3 * attn_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
  return 6.0 * matmul_params_per_token(cfg) + attn


# Dense bf16 peak FLOP/s per chip (vendor datasheets), matched against device_kind.
_PEAKS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU7x", 2307e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one chip, or None if unknown (CPUs)."""
  for key, peak in _PEAKS:
    if key.lower() in device_kind.lower():
      return peak
  return None

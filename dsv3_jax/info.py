"""Model size facts computed from a config with jax.eval_shape (no weights are allocated)."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from dsv3_jax.cache import cache_bytes_per_token
from dsv3_jax.config import ModelConfig


def abstract_model(cfg: ModelConfig, param_dtype=jnp.bfloat16, fp8: bool = False):
  """The model with ShapeDtypeStructs for parameters (jax.eval_shape; nothing allocated)."""
  from dsv3_jax.model import Transformer

  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                                            fp8=fp8))


def model_facts(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts (unquantized; FP8 scales excluded) and cache size.

  Returns a dict with total_params (without MTP), mtp_params (the MTP modules' own weights;
  embedding and head are shared with the main model), active_params_per_token (embedding, head
  and everything but the unchosen routed experts), routed_expert_params,
  cache_bytes_per_token (bf16 compressed MLA cache, main layers) and cache_values_per_token_layer.
  """
  _, state = nnx.split(abstract_model(cfg))
  total = mtp = routed = 0
  for path, var in nnx.to_flat_state(state):
    n = math.prod(var.get_value().shape)
    if path[0] == "mtp":
      mtp += n
      continue
    total += n
    if "experts" in path and "shared_experts" not in path:
      routed += n
  inactive = routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
  return {
      "total_params": total,
      "mtp_params": mtp,
      "active_params_per_token": total - inactive,
      "routed_expert_params": routed,
      "cache_bytes_per_token": cache_bytes_per_token(cfg, jnp.bfloat16),
      "cache_values_per_token_layer": cfg.cache_values_per_token,
  }


def format_facts(name: str, facts: dict[str, int]) -> str:
  b = lambda n: f"{n:,} ({n / 1e9:.2f}B)"
  return "\n".join([
      f"{name}",
      f"  total parameters (without MTP): {b(facts['total_params'])}",
      f"  MTP parameters (own weights):   {b(facts['mtp_params'])}",
      f"  active parameters per token:    {b(facts['active_params_per_token'])}",
      f"  routed expert parameters:       {b(facts['routed_expert_params'])}",
      f"  compressed cache per token:     {facts['cache_bytes_per_token']:,} bytes (bf16; "
      f"{facts['cache_values_per_token_layer']} values per layer)",
  ])

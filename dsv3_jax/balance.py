"""Expert load balancing for training (DeepSeek-V3 report §2.1.2 and §2.1.3).

Two mechanisms, both fed by the per-layer `RoutingStats` that the model returns when asked
(`with_aux=True`):

* aux-loss-free balancing: after each step, every MoE layer's correction bias moves by
  b_i += γ·sign(mean_j load_j − load_i), outside the gradient (`update_biases`);
* the sequence-wise balance loss α·Σ_i f_i·P_i with, per sequence of T tokens,
  f_i = E/(K·T)·#{t: i ∈ topk(t)} and P_i = mean_t s'_{i,t}, s' = s / Σ_j s_j per token
  (`sequence_balance_loss`); it is averaged over the sequences of the batch.

E routed experts, K experts per token (the report's N_r and K_r).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingStats:
  """One MoE layer's routing statistics for a batch (a leading [L] axis when stacked).

  load: [E] float32, how many (token, slot) pairs chose each expert, over the whole batch.
  balance: [] float32, the sequence-wise balance term Σ_i f_i·P_i averaged over sequences
    (without α; differentiable through the router's scores).
  """

  load: jax.Array
  balance: jax.Array


def sequence_balance_loss(scores: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
  """Σ_i f_i·P_i per sequence, averaged over the batch.

  Args:
    scores: [B, T, E] float32 unbiased affinities s (sigmoid or softmax).
    experts: [B, T, K] int32 chosen experts (selected with the bias; the count is not
      differentiable).
  Returns:
    [] float32. Perfectly balanced routing with uniform normalised scores gives 1.
  """
  _, t, k = experts.shape
  counts = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum((1, 2))  # [B, E]
  f = counts * (num_experts / (k * t))
  s_norm = scores / scores.sum(-1, keepdims=True)
  p = s_norm.mean(1)                                                          # [B, E]
  return (jax.lax.stop_gradient(f) * p).sum(-1).mean()


def routing_stats(scores: jax.Array, experts: jax.Array, num_experts: int) -> RoutingStats:
  """RoutingStats of one layer. scores: [B, T, E]; experts: [B, T, K]."""
  load = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum((0, 1, 2))
  return RoutingStats(jax.lax.stop_gradient(load),
                      sequence_balance_loss(scores, experts, num_experts))


def bias_delta(load: jax.Array, gamma: float) -> jax.Array:
  """γ·sign(mean load − load_i) over the last axis: under-loaded experts are raised.

  load: [..., E] → [..., E] float32.
  """
  return gamma * jnp.sign(load.mean(-1, keepdims=True) - load)


def _stats_for(aux: dict, path: tuple) -> RoutingStats | None:
  """The RoutingStats of the MoE router whose bias lives at `path` in the model state: all
  [L] layers for the stacked bias ("moe_layers", "mlp", ...), layer i for the bias of an
  unstacked layer ("moe_layers", i, "mlp", ...; `Transformer.unstack_layers`)."""
  if path[0] == "moe_layers":
    stats = aux.get("moe_layers")
    if stats is not None and isinstance(path[1], int):
      return jax.tree.map(lambda a: a[path[1]], stats)
    return stats
  if path[0] == "mtp":
    stats = aux.get("mtp", ())
    return stats[path[1]] if path[1] < len(stats) else None
  return None


def update_biases(biases: nnx.State, aux: dict, gamma: float) -> nnx.State:
  """Aux-loss-free balancing step: every `e_score_correction_bias` moves by bias_delta of its
  layer's load. `biases` holds only the correction biases ([L, E] for the stacked MoE layers,
  [E] per unstacked layer and per MTP module); `aux` is the model's aux output for the step."""
  flat = []
  for path, var in nnx.to_flat_state(biases):
    name = "/".join(map(str, path))
    stats = _stats_for(aux, path)
    if stats is None:
      raise ValueError(f"no routing statistics for the correction bias at {name}")
    value = var.get_value()
    if stats.load.shape != value.shape:  # a silent broadcast would change the bias's shape
      raise ValueError(f"the correction bias at {name} has shape {value.shape}, its layers' "
                       f"expert load {stats.load.shape}")
    flat.append((path, var.replace(value + bias_delta(stats.load, gamma).astype(value.dtype))))
  return nnx.from_flat_state(flat)


def balance_loss(aux: dict) -> jax.Array:
  """Σ over MoE layers (main stack and MTP modules) of the sequence-wise balance term."""
  terms = []
  if aux.get("moe_layers") is not None:
    terms.append(aux["moe_layers"].balance.sum())
  terms += [s.balance for s in aux.get("mtp", ())]
  return sum(terms) if terms else jnp.zeros((), jnp.float32)


def load_imbalance(aux: dict) -> jax.Array:
  """max/mean expert load, averaged over the MoE layers (1 = perfectly balanced)."""
  loads = []
  if aux.get("moe_layers") is not None:
    loads.append(aux["moe_layers"].load)
  loads += [s.load[None] for s in aux.get("mtp", ())]
  if not loads:
    return jnp.ones((), jnp.float32)
  load = jnp.concatenate(loads, 0)                                   # [L, E]
  return (load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)).mean()

"""The compressed MLA cache: per layer, the normalised kv latent (C) and the roped key (R).

576 values per token per layer for DeepSeek-V3 (C = 512, R = 64), instead of the 2·128·(128+64)
of uncompressed keys and values. The cache is a plain pytree that goes in and out of the pure
prefill/decode functions (never hidden module state).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's cache (a leading [L] axis when stacked for a scanned group of layers).

  c_kv: [B, S, C] normalised kv latent.  k_pe: [B, S, R] roped shared rope key.
  """

  c_kv: jax.Array
  k_pe: jax.Array

  def write(self, c_kv: jax.Array, k_pe: jax.Array, positions: jax.Array,
            layer: jax.Array | None = None) -> "LayerCache":
    """Scatters T new tokens per row into their slots (in place inside a scan or a jit).

    Args:
      c_kv: [B, T, C]; k_pe: [B, T, R]; positions: [B, T] slot of each token.
      layer: index into a stacked [L, ...] cache, or None for a single layer's cache.
    """
    rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
    idx = (rows, positions) if layer is None else (layer, rows, positions)
    return LayerCache(self.c_kv.at[idx].set(c_kv.astype(self.c_kv.dtype)),
                      self.k_pe.at[idx].set(k_pe.astype(self.k_pe.dtype)))

  def layer(self, i: jax.Array | None) -> "LayerCache":
    """One layer's view [B, S, *] of a stacked cache (the cache itself when i is None)."""
    return self if i is None else LayerCache(self.c_kv[i], self.k_pe[i])

  @property
  def max_len(self) -> int:
    return self.c_kv.shape[-2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
  """The whole model's cache: stacked LayerCaches for the dense and the MoE layer groups, and one
  per MTP module (for speculative decoding). A group with no layers holds None."""

  dense: LayerCache | None
  moe: LayerCache | None
  mtp: tuple[LayerCache, ...] = ()

  @property
  def max_len(self) -> int:
    return (self.dense or self.moe).max_len


def _layer_cache(num_layers, batch, max_len, cfg, dtype, lead=True):
  shape = (num_layers, batch, max_len) if lead else (batch, max_len)
  return LayerCache(jnp.zeros(shape + (cfg.kv_lora_rank,), dtype),
                    jnp.zeros(shape + (cfg.qk_rope_head_dim,), dtype))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16,
               with_mtp: bool = False) -> Cache:
  """An empty (zero) cache for `batch` rows of up to `max_len` tokens."""
  if max_len <= 0 or batch <= 0:
    raise ValueError(f"cache needs batch > 0 and max_len > 0, got {batch=} {max_len=}")
  return Cache(
      dense=_layer_cache(cfg.num_dense_layers, batch, max_len, cfg, dtype)
      if cfg.num_dense_layers else None,
      moe=_layer_cache(cfg.num_moe_layers, batch, max_len, cfg, dtype)
      if cfg.num_moe_layers else None,
      mtp=tuple(_layer_cache(0, batch, max_len, cfg, dtype, lead=False)
                for _ in range(cfg.num_nextn_predict_layers if with_mtp else 0)),
  )


def cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
  """Bytes the compressed cache holds per token for the main model's layers."""
  return cfg.num_hidden_layers * cfg.cache_values_per_token * jnp.dtype(dtype).itemsize


def concat_rows(caches: "list[Cache]") -> Cache:
  """Joins caches of row blocks into one (batch axis: 1 for stacked groups, 0 for MTP)."""
  def join(axis):
    return lambda *xs: jnp.concatenate(xs, axis=axis)
  first = caches[0]
  return Cache(
      dense=None if first.dense is None else jax.tree.map(join(1), *[c.dense for c in caches]),
      moe=None if first.moe is None else jax.tree.map(join(1), *[c.moe for c in caches]),
      mtp=tuple(jax.tree.map(join(0), *[c.mtp[i] for c in caches]) for i in range(len(first.mtp))),
  )

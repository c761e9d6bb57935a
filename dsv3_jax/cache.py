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

  kv: [B, S, C + R], per slot the normalised kv latent (C = `rank` values) followed by the
  roped shared rope key (R). One array, so that a decode step writes, views and multiplies the
  two parts at once (one kernel each instead of two; the absorbed scores are one product of
  [q_lat; q_pe] with it).
  """

  kv: jax.Array
  rank: int = dataclasses.field(metadata=dict(static=True))

  @property
  def c_kv(self) -> jax.Array:
    """[..., S, C] normalised kv latent."""
    return self.kv[..., :self.rank]

  @property
  def k_pe(self) -> jax.Array:
    """[..., S, R] roped shared rope key."""
    return self.kv[..., self.rank:]

  def write(self, c_kv: jax.Array, k_pe: jax.Array, positions: jax.Array,
            layer: jax.Array | None = None) -> "LayerCache":
    """Writes T new tokens per row into their slots (in place inside a scan or a jit).

    A row's T tokens occupy consecutive slots from positions[b, 0] (as in prefill and decoding):
    one dynamic_update_slice for a single row, one windowed scatter (a [T, C + R] window per
    row) otherwise, not a scatter of single values, which XLA turned into a read of the old
    slot, an in-bounds test and a masked update per part. A window that would end past the
    cache is moved back to end at its last slot (dynamic_update_slice's clamping).

    Args:
      c_kv: [B, T, C]; k_pe: [B, T, R]; positions: [B, T] slot of each token.
      layer: index into a stacked [L, ...] cache, or None for a single layer's cache.
    """
    new = jnp.concatenate([c_kv, k_pe], axis=-1).astype(self.kv.dtype)   # [B, T, C + R]
    b, t = positions.shape
    start = jnp.clip(positions[:, 0], 0, self.max_len - t).astype(jnp.int32)  # [B]
    lead = () if layer is None else (jnp.asarray(layer, jnp.int32),)
    zero = jnp.zeros((), jnp.int32)
    if b == 1:
      upd = new if layer is None else new[None]
      return LayerCache(jax.lax.dynamic_update_slice(self.kv, upd, (*lead, zero, start[0], zero)),
                        self.rank)
    # row r's window [1, T, C + R] lands at (layer, r, start[r], 0); the clip above keeps it in
    # bounds, so the scatter needs no masking
    rows = jnp.arange(b, dtype=jnp.int32)
    idx = jnp.stack([*(jnp.broadcast_to(l, (b,)) for l in lead), rows, start], axis=1)
    nd = self.kv.ndim
    dims = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1, 2), inserted_window_dims=tuple(range(nd - 2)),
        scatter_dims_to_operand_dims=tuple(range(nd - 1)))
    kv = jax.lax.scatter(self.kv, idx, new, dims, indices_are_sorted=True, unique_indices=True,
                         mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return LayerCache(kv, self.rank)

  def layer(self, i: jax.Array | None) -> "LayerCache":
    """One layer's view [B, S, C + R] of a stacked cache (the cache itself when i is None)."""
    return self if i is None else LayerCache(self.kv[i], self.rank)

  @property
  def max_len(self) -> int:
    return self.kv.shape[-2]


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
  return LayerCache(jnp.zeros(shape + (cfg.cache_values_per_token,), dtype), cfg.kv_lora_rank)


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

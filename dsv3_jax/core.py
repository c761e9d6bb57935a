"""The functional core: pure, jitted functions over explicit pytrees.

    graphdef, params = split(model)          # static structure, parameter pytree
    logits, mtp_logits = forward(graphdef, params, tokens)
    cache = init_cache(cfg, batch, max_len)
    logits, cache = prefill(graphdef, params, tokens, cache)
    logits, cache = decode_step(graphdef, params, next_tokens, positions, cache)

Nothing here holds state: parameters and the cache go in and come out. The cache argument is
donated, so a decode loop updates it in place on accelerators.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.cache import Cache


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params): the model's static structure and its parameter pytree."""
  return nnx.split(model)


def merge(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.Module:
  return nnx.merge(graphdef, params)


def _positions(tokens, start=None):
  pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
  if start is not None:
    pos = pos + start[:, None]
  return jnp.broadcast_to(pos, tokens.shape)


@functools.partial(jax.jit, static_argnames=("graphdef", "with_aux"))
def forward(graphdef, params, tokens: jax.Array, with_aux: bool = False):
  """Training/scoring forward over full sequences.

  Args:
    tokens: [B, T] int32.
    with_aux: also return the routing statistics (training; see dsv3_jax.balance).
  Returns:
    (logits [B, T, V] float32, tuple of MTP logits, depth k: [B, T-k, V] float32), plus with
    `with_aux` a dict {"moe_layers": RoutingStats stacked on [L] or None,
    "mtp": tuple of RoutingStats, one per MTP depth}.
  """
  model = merge(graphdef, params)
  if not with_aux:
    h, _ = model.hidden(tokens)
    return model.head(h), tuple(model.mtp_logits(h, tokens))
  h, _, stats = model.hidden(tokens, with_aux=True)
  mtp, mtp_stats = model.mtp_logits(h, tokens, with_aux=True)
  return model.head(h), tuple(mtp), {"moe_layers": stats, "mtp": mtp_stats}


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill(graphdef, params, tokens: jax.Array, cache: Cache):
  """Runs a prompt from position 0, writing its compressed latents into the cache.

  Args:
    tokens: [B, T] int32 prompt (T ≤ cache.max_len).
    cache: an empty Cache (see init_cache).
  Returns:
    (logits [B, T, V] float32, hidden [B, T, D] after the final norm, the filled cache).
  """
  if tokens.shape[1] > cache.max_len:
    raise ValueError(f"prompt length {tokens.shape[1]} exceeds the cache length {cache.max_len}")
  model = merge(graphdef, params)
  h, cache = model.hidden(tokens, _positions(tokens), cache, mode="full")
  return model.head(h), h, cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(graphdef, params, tokens: jax.Array, positions: jax.Array, cache: Cache):
  """One decode step with absorbed MLA over the compressed cache.

  Args:
    tokens: [B, T] new tokens (T = 1 for plain decoding); positions: [B] position of the first
      of them in each row (rows may differ).
    cache: the Cache holding positions < positions[b] of each row.
  Returns:
    (logits [B, T, V] float32, hidden [B, T, D] after the final norm, the updated cache).
  """
  model = merge(graphdef, params)
  h, cache = model.hidden(tokens, _positions(tokens, positions), cache, mode="absorbed")
  return model.head(h), h, cache

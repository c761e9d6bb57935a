"""Token sampling: greedy, temperature (exact categorical), top-k, top-p. Pure and jittable."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
  """temperature 0 → greedy (argmax). top_k 0 and top_p 1.0 switch those filters off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0: off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
  """One token per row.

  As DeepSeek's generate does, a categorical draw is argmax(p / E) with E ~ Exponential(1)
  per token (an exact sample of p).

  Args:
    logits: [B, V] float32. key: a PRNG key. params: static sampling settings.
  Returns:
    [B] int32 token ids.
  """
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / params.temperature
  if params.top_k:
    kth = jax.lax.top_k(logits, min(params.top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if params.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_p = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    drop_sorted = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) >= params.top_p
    drop = jnp.zeros_like(drop_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  probs = jax.nn.softmax(logits, axis=-1)
  noise = jax.random.exponential(key, probs.shape, jnp.float32)
  return jnp.argmax(probs / noise, axis=-1).astype(jnp.int32)

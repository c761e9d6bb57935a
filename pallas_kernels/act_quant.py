"""Online activation quantization to e4m3, one scale per token per 128 channels (Pallas Triton).

DeepSeek-V3 (SPEC.md, FP8): s = max(amax, 1e-4) / 448 over each 1×128 tile, q = x / s in e4m3;
V3.1 "ue8m0" rounds s up to a power of two (s = 2^ceil(log2 s)), so that the GEMM's scale
multiplications are exact exponent shifts. Same function as `act_quant` in DeepSeek's
inference/kernel.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
SCALE_FMTS = (None, "ue8m0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  block_m: int = 32      # rows per program (power of two; ragged M is masked)
  num_warps: int = 4


def _scale(amax: jax.Array, scale_fmt: str | None, amax_floor: float = AMAX_FLOOR) -> jax.Array:
  """s = max(amax, 1e-4) / 448, optionally rounded up to a power of two (exact, by bits)."""
  s = jnp.maximum(amax, amax_floor) / E4M3_MAX
  if scale_fmt == "ue8m0":
    # s > 0 and normal: adding the mantissa mask carries into the exponent unless the mantissa
    # is zero (already a power of two); clearing the mantissa then gives 2^ceil(log2 s).
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    bits = (bits + 0x007FFFFF) & 0x7F800000
    s = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return s


def _kernel(x_ref, q_ref, s_ref, *, m: int, block_m: int, scale_fmt: str | None):
  i, kb = pl.program_id(0), pl.program_id(1)
  rows = i * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m,), 0)
  row_ok = rows < m
  tile = (pl.ds(i * block_m, block_m), pl.ds(pl.multiple_of(kb * BLOCK, BLOCK), BLOCK))
  x = plgpu.load(x_ref.at[tile], mask=row_ok[:, None], other=0.0).astype(jnp.float32)
  s = _scale(jnp.max(jnp.abs(x), axis=1), scale_fmt)                       # [block_m]
  q = jnp.clip(x / s[:, None], -E4M3_MAX, E4M3_MAX).astype(q_ref.dtype)
  plgpu.store(q_ref.at[tile], q, mask=row_ok[:, None])
  plgpu.store(s_ref.at[pl.ds(i * block_m, block_m), kb], s, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("scale_fmt", "config", "interpret"))
def act_quant(x: jax.Array, *, scale_fmt: str | None = None, config: TuningConfig | None = None,
              interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Quantizes activations per token per 128 channels.

  Args:
    x: [..., K] float activations, K a multiple of 128.
    scale_fmt: None (V3) or "ue8m0" (V3.1: power-of-two scales).
  Returns:
    (q e4m3 [..., K], s float32 [..., K/128]) with x ≈ q · s per 1×128 tile.
  """
  _check(x, scale_fmt)
  config = config or TuningConfig()
  *lead, k = x.shape
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  if m == 0:
    return (jnp.zeros(x.shape, jnp.float8_e4m3fn),
            jnp.zeros((*lead, k // BLOCK), jnp.float32))
  q, s = pl.pallas_call(
      functools.partial(_kernel, m=m, block_m=config.block_m, scale_fmt=scale_fmt),
      out_shape=(jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn),
                 jax.ShapeDtypeStruct((m, k // BLOCK), jnp.float32)),
      grid=(pl.cdiv(m, config.block_m), k // BLOCK),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
      interpret=interpret,
      name="act_quant",
  )(x2)
  return q.reshape(x.shape), s.reshape(*lead, k // BLOCK)


def _check(x: jax.Array, scale_fmt) -> None:
  if scale_fmt not in SCALE_FMTS:
    raise ValueError(f"{scale_fmt=} must be one of {SCALE_FMTS}")
  if x.ndim < 1 or x.shape[-1] % BLOCK:
    raise ValueError(f"{x.shape=}: the last (channel) axis must be a multiple of {BLOCK}")
  if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize < 2:
    raise ValueError(f"{x.dtype=} must be float16, bfloat16 or float32")


def act_quant_reference(x: jax.Array, scale_fmt: str | None = None, *,
                        amax_floor: float = AMAX_FLOOR) -> tuple[jax.Array, jax.Array]:
  """Pure-jnp act_quant: same signature and result. amax_floor: the smallest amax a tile's scale
  is computed from (DeepSeek's inference uses 1e-4; training gradients need a far lower one)."""
  _check(x, scale_fmt)
  *lead, k = x.shape
  xb = x.astype(jnp.float32).reshape(*lead, k // BLOCK, BLOCK)
  s = _scale(jnp.max(jnp.abs(xb), axis=-1), scale_fmt, amax_floor)
  q = jnp.clip(xb / s[..., None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
  return q.reshape(x.shape), s

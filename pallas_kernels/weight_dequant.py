"""Dequantization of 128×128-block-scaled e4m3 weights (Pallas Triton).

DeepSeek's checkpoints store W as e4m3 with `weight_scale_inv` [ceil(N/128), ceil(K/128)] float32,
a MULTIPLIER despite its name: W[n, k] = W_fp8[n, k] · scale_inv[n // 128, k // 128]
(SPEC.md, FP8). Same function as `weight_dequant` in DeepSeek's inference/kernel.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 128
E4M3_MAX = 448.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  num_warps: int = 8


def _kernel(w_ref, s_ref, o_ref, *, n: int, k: int):
  i, j = pl.program_id(0), pl.program_id(1)
  rows = i * BLOCK + jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
  cols = j * BLOCK + jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
  ok = (rows < n) & (cols < k)
  tile = (pl.ds(i * BLOCK, BLOCK), pl.ds(j * BLOCK, BLOCK))
  w = plgpu.load(w_ref.at[tile], mask=ok, other=0.0).astype(jnp.float32)
  plgpu.store(o_ref.at[tile], (w * s_ref[i, j]).astype(o_ref.dtype), mask=ok)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def weight_dequant(w: jax.Array, scale_inv: jax.Array, *, out_dtype=jnp.bfloat16,
                   config: TuningConfig | None = None, interpret: bool = False) -> jax.Array:
  """W = W_fp8 · scale_inv[n // 128, k // 128].

  Args:
    w: [N, K] e4m3 weight (any N, K; partial edge blocks are masked).
    scale_inv: [ceil(N/128), ceil(K/128)] float32.
  Returns:
    [N, K] in out_dtype (computed in float32).
  """
  _check(w, scale_inv)
  config = config or TuningConfig()
  n, k = w.shape
  if n == 0 or k == 0:
    return jnp.zeros(w.shape, out_dtype)
  return pl.pallas_call(
      functools.partial(_kernel, n=n, k=k),
      out_shape=jax.ShapeDtypeStruct((n, k), out_dtype),
      grid=(pl.cdiv(n, BLOCK), pl.cdiv(k, BLOCK)),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
      interpret=interpret,
      name="weight_dequant",
  )(w, scale_inv)


def _check(w, scale_inv) -> None:
  if w.ndim != 2 or w.dtype != jnp.float8_e4m3fn:
    raise ValueError(f"{w.shape=} {w.dtype=}: expected a 2-D float8_e4m3fn weight [N, K]")
  expected = (math.ceil(w.shape[0] / BLOCK), math.ceil(w.shape[1] / BLOCK))
  if scale_inv.shape != expected or scale_inv.dtype != jnp.float32:
    raise ValueError(f"{scale_inv.shape=} {scale_inv.dtype=}: expected float32 {expected} "
                     f"for weight {w.shape}")


def weight_quant_reference(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The inverse: 128×128 block quantization, scale_inv = max(amax, 1e-12) / 448 (all-zero
  blocks keep a finite, nonzero scale; partial blocks are zero-padded).
  w: [..., N, K] float → (e4m3 [..., N, K], float32 scales [..., ceil(N/128), ceil(K/128)])."""
  *lead, n, k = w.shape
  bn, bk = math.ceil(n / BLOCK), math.ceil(k / BLOCK)
  pad = jnp.pad(w.astype(jnp.float32),
                [(0, 0)] * len(lead) + [(0, bn * BLOCK - n), (0, bk * BLOCK - k)])
  blocks = pad.reshape(*lead, bn, BLOCK, bk, BLOCK)
  s = jnp.maximum(jnp.abs(blocks).max(axis=(-3, -1)), 1e-12) / E4M3_MAX
  q = jnp.clip(blocks / s[..., :, None, :, None], -E4M3_MAX, E4M3_MAX).reshape(pad.shape)
  return q[..., :n, :k].astype(jnp.float8_e4m3fn), s


def weight_dequant_reference(w: jax.Array, scale_inv: jax.Array,
                             out_dtype=jnp.bfloat16) -> jax.Array:
  """Pure-jnp weight_dequant: same signature and result."""
  _check(w, scale_inv)
  n, k = w.shape
  s = jnp.repeat(jnp.repeat(scale_inv, BLOCK, axis=0), BLOCK, axis=1)[:n, :k]
  return (w.astype(jnp.float32) * s).astype(out_dtype)

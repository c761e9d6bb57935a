"""Both orientations of the FP8 training recipe's quantizations in one pass (Pallas Triton).

The recipe (pallas_kernels.fp8_train_ops; DeepSeek-V3 report §3.3) quantizes every activation
x [M, K] and every output gradient twice: per token along the channels (1×128 tiles, for Fprop
and Dgrad) and per channel along the tokens (128×1 tiles, for Wgrad, stored transposed
[K, M] since e4m3 wgmma reads K-major operands). Each weight W [N, K] is quantized in 128×128
blocks for Fprop and used transposed, W_q ᵀ [K, N] with the transposed block scales, by Dgrad.
Done by XLA, each orientation is a pass of its own over the operand: the transposed ones are
transpose fusions (measured at ≈0.7 TB/s of the H100's ≈3 TB/s for an expert activation), and
the e4m3 weight is transposed once more in the backward pass (docs/benchmarks.md, FP8 training
round 2). Here one program reads one 128×128 tile once and writes both orientations:

  dual_quant(x)        → q [M, K] e4m3, s [M, K/128]   (x ≈ q · s, 1×128 tiles)
                         qt [K, M] e4m3, st [K, M/128] (xᵀ ≈ qt · st, 128×1 tiles of x)
  dual_quant_blocks(w) → q [N, K], s [N/128, K/128], qt = qᵀ [K, N], st = sᵀ

The arithmetic is the references' (act_quant_reference on x and on xᵀ; weight_quant_reference):
s = max(amax, floor) / 448, q = clip(x / s, ±448) rounded to e4m3. Operands carry an optional
leading group axis ([E, M, K]: the capacity buckets of the experts); M, N and K must be
multiples of 128 (fp8_train_ops pads them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.act_quant import act_quant_reference
from pallas_kernels.weight_dequant import weight_quant_reference

BLOCK = 128
E4M3_MAX = 448.0
FP8 = jnp.float8_e4m3fn
WEIGHT_AMAX_FLOOR = 1e-12  # weight_quant_reference's


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  num_warps: int = 8     # one 128×128 float32 tile per program: 64 values per thread


def _quantize(x, s):
  return jnp.clip(x / s, -E4M3_MAX, E4M3_MAX).astype(FP8)


def _tile(e, i, j):
  return (e, pl.ds(pl.multiple_of(i * BLOCK, BLOCK), BLOCK),
          pl.ds(pl.multiple_of(j * BLOCK, BLOCK), BLOCK))


def _rows_cols_kernel(x_ref, q_ref, s_ref, qt_ref, st_ref, *, amax_floor: float):
  e, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  x = plgpu.load(x_ref.at[_tile(e, i, j)]).astype(jnp.float32)     # [128 tokens, 128 channels]
  ax = jnp.abs(x)
  s_row = jnp.maximum(jnp.max(ax, axis=1), amax_floor) / E4M3_MAX    # per token
  plgpu.store(q_ref.at[_tile(e, i, j)], _quantize(x, s_row[:, None]))
  plgpu.store(s_ref.at[e, pl.ds(pl.multiple_of(i * BLOCK, BLOCK), BLOCK), j], s_row)
  s_col = jnp.maximum(jnp.max(ax, axis=0), amax_floor) / E4M3_MAX    # per channel
  qc = jnp.clip(x / s_col[None, :], -E4M3_MAX, E4M3_MAX)
  plgpu.store(qt_ref.at[_tile(e, j, i)], qc.T.astype(FP8))
  plgpu.store(st_ref.at[e, pl.ds(pl.multiple_of(j * BLOCK, BLOCK), BLOCK), i], s_col)


def _blocks_kernel(w_ref, q_ref, s_ref, qt_ref, st_ref):
  e, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  w = plgpu.load(w_ref.at[_tile(e, i, j)]).astype(jnp.float32)
  s = jnp.maximum(jnp.max(jnp.abs(w)), WEIGHT_AMAX_FLOOR) / E4M3_MAX
  q = jnp.clip(w / s, -E4M3_MAX, E4M3_MAX)
  plgpu.store(q_ref.at[_tile(e, i, j)], q.astype(FP8))
  plgpu.store(qt_ref.at[_tile(e, j, i)], q.T.astype(FP8))
  s_ref[e, i, j] = s
  st_ref[e, j, i] = s


def _check(x: jax.Array, what: str) -> None:
  if x.ndim not in (2, 3):
    raise ValueError(f"{what}: {x.shape=} must be [R, C] or [E, R, C]")
  if x.shape[-1] % BLOCK or x.shape[-2] % BLOCK:
    raise ValueError(f"{what}: {x.shape=}: the last two axes must be multiples of {BLOCK} "
                     "(pad them first)")
  if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize < 2:
    raise ValueError(f"{what}: {x.dtype=} must be float16, bfloat16 or float32")


def _call(kernel, x, outs, name, config, interpret):
  x3 = x if x.ndim == 3 else x[None]
  e, r, c = x3.shape
  res = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((e, *shape), dtype) for shape, dtype in outs(r, c)],
      grid=(e, r // BLOCK, c // BLOCK),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
      interpret=interpret,
      name=name,
  )(x3)
  return tuple(res) if x.ndim == 3 else tuple(a[0] for a in res)


@functools.partial(jax.jit, static_argnames=("amax_floor", "config", "interpret"))
def dual_quant(x: jax.Array, *, amax_floor: float, config: TuningConfig | None = None,
               interpret: bool = False):
  """x per 1×128 tile along its rows and per 128×1 tile along its columns, in one pass.

  Args:
    x: [(E,) R, C] float, R and C multiples of 128.
    amax_floor: the smallest amax a tile's scale is computed from.
  Returns:
    (q [(E,) R, C] e4m3, s [(E,) R, C/128] float32, qt [(E,) C, R] e4m3, st [(E,) C, R/128]
    float32): equal to act_quant_reference(x) and act_quant_reference(xᵀ) (dual_quant_reference).
  """
  _check(x, "dual_quant")
  outs = lambda r, c: [((r, c), FP8), ((r, c // BLOCK), jnp.float32),
                       ((c, r), FP8), ((c, r // BLOCK), jnp.float32)]
  return _call(functools.partial(_rows_cols_kernel, amax_floor=amax_floor), x, outs,
               "dual_quant", config or TuningConfig(), interpret)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def dual_quant_blocks(w: jax.Array, *, config: TuningConfig | None = None,
                      interpret: bool = False):
  """128×128-block quantization of a weight and its transpose, in one pass.

  Args:
    w: [(E,) N, K] float (the float32 master), N and K multiples of 128.
  Returns:
    (q [(E,) N, K] e4m3, s [(E,) N/128, K/128] float32, qᵀ [(E,) K, N], sᵀ [(E,) K/128, N/128]):
    weight_quant_reference(w) and its transposes (dual_quant_blocks_reference).
  """
  _check(w, "dual_quant_blocks")
  outs = lambda n, k: [((n, k), FP8), ((n // BLOCK, k // BLOCK), jnp.float32),
                       ((k, n), FP8), ((k // BLOCK, n // BLOCK), jnp.float32)]
  return _call(_blocks_kernel, w, outs, "dual_quant_blocks", config or TuningConfig(),
               interpret)


def _t(a):
  return jnp.swapaxes(a, -1, -2)


def dual_quant_reference(x: jax.Array, *, amax_floor: float):
  """Pure-jnp dual_quant: same signature and result."""
  _check(x, "dual_quant")
  return (*act_quant_reference(x, amax_floor=amax_floor),
          *act_quant_reference(_t(x), amax_floor=amax_floor))


def dual_quant_blocks_reference(w: jax.Array):
  """Pure-jnp dual_quant_blocks: same signature and result."""
  _check(w, "dual_quant_blocks")
  q, s = weight_quant_reference(w)
  return q, s, _t(q), _t(s)

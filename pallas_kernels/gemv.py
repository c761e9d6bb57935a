"""Dense GEMV for decoding (Pallas, Triton lowering): y = x · W[g]ᵀ for a few rows of x.

At decode time every projection sees one row per sequence, so its cost is reading the weight
once. This kernel streams the weight in [block_n, 128] tiles with all rows of x (at most 16)
multiplied against each tile (one row: float32 multiply-adds; more: a 16-row tensor-core dot),
and can read one matrix of a stacked [G, N, K] weight in place:
inside the scanned layer stack (dsv3_jax.model.scan_layers) the model hands it the whole
stacked weight and the layer index, where a slice of the stack would be copied by XLA before
any custom call or cuBLAS GEMM could read it (docs/benchmarks.md, decode round 3: a 45 µs copy of
each V2-Lite layer's attention and shared-expert weights, every step).

Weights are bf16/fp16/fp32, or e4m3 with DeepSeek's 128×128 block scales. With e4m3 weights the
activation is quantized inside the kernel exactly as `act_quant` does it (per row per 128
channels, s = max(amax, 1e-4)/448, optionally ue8m0), and each 128-wide slab's product is
scaled and added to a float32 accumulator (SPEC.md, FP8 GEMM) — the numerics of
`fp8_ops.fp8_linear` in one launch.

The reduction over K can be split over `k_splits` programs (float32 partials summed by XLA
afterwards) to put enough loads in flight when the output has few column bands. Runs on any
CUDA GPU, and on the CPU with interpret=True.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.act_quant import E4M3_MAX, SCALE_FMTS, _scale, act_quant_reference
from pallas_kernels.moe_gemv import check_weight

BLOCK = 128
MAX_ROWS = 16   # rows of x per call: one 16-row tensor-core tile (rows past M are masked)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  block_n: int = 32    # output columns per program (divides 128: one scale block per tile;
                       # 4 and 8 only for one row: the 16-row dot needs 16)
  num_warps: int = 4
  num_stages: int = 4
  k_splits: int = 1    # programs sharing the reduction over K (float32 partials summed after)
  slabs: int = 1       # 128-wide slabs loaded per loop iteration (more bytes in flight)

  def __post_init__(self):
    if self.block_n not in (4, 8, 16, 32, 64, 128):
      raise ValueError(f"{self.block_n=} must be one of 4, 8, 16, 32, 64, 128")
    if self.k_splits < 1 or self.slabs < 1:
      raise ValueError(f"{self.k_splits=} and {self.slabs=} must be >= 1")


def default_config(m: int, n: int, k: int, num_sms: int = 132) -> TuningConfig:
  """32-column programs. The reduction is split until there are about six programs per SM for
  one row, two for more (one program per SM cannot keep enough loads in flight to stream at HBM
  speed; each split costs a float32 partial sum afterwards). Chosen from the H100 sweep of
  benchmarks/gemv.py (docs/benchmarks.md, decode round 4)."""
  block_n = 32
  programs = math.ceil(n / block_n)
  per_sm = 6 if m == 1 else 2
  splits = 1
  while programs * splits * 2 <= per_sm * num_sms and splits * 2 <= k // BLOCK:
    splits *= 2
  return TuningConfig(block_n=block_n, k_splits=splits)


def _kernel(g_ref, x_ref, w_ref, *rest, m: int, n: int, k: int, config: TuningConfig,
            scaled: bool, scale_fmt: str | None):
  s_ref, o_ref = rest if scaled else (None, rest[0])
  g = g_ref[0]
  bn = config.block_n
  n0 = pl.program_id(0) * bn
  col_ok = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0) < n
  # one row: multiply-add into a [bn, 128] float32 tile, summed over lanes at the end (no
  # tensor-core layout shuffles); more rows: a 16-row tensor-core dot per slab
  rows = 1 if m == 1 else MAX_ROWS
  row_ok = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) < m
  split, kbs, parts = pl.program_id(1), k // BLOCK, config.k_splits
  lo, hi = split * kbs // parts, (split + 1) * kbs // parts

  def slab(kb, acc):
    """Adds slab kb (< hi, else nothing) of this program's reduction to acc."""
    ok = kb < hi
    kb = jnp.minimum(kb, kbs - 1)
    ks = pl.ds(pl.multiple_of(kb * BLOCK, BLOCK), BLOCK)
    if m == 1:
      x = x_ref[pl.ds(0, 1), ks]
    else:
      x = plgpu.load(x_ref.at[pl.ds(0, rows), ks], mask=row_ok[:, None], other=0.0)
    w = plgpu.load(w_ref.at[g, pl.ds(n0, bn), ks], mask=col_ok[:, None] & ok, other=0.0)
    if scaled:
      # act_quant of this 1×128 slab of each row; the e4m3 products are exact in float32
      xf = x.astype(jnp.float32)
      sx = _scale(jnp.max(jnp.abs(xf), axis=1), scale_fmt)                    # [rows]
      xq = jnp.clip(xf / sx[:, None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
      sw = s_ref[g, n0 // BLOCK, kb]
      if m == 1:
        return acc + w.astype(jnp.float32) * (xq.astype(jnp.float32) * (sx[:, None] * sw))
      part = jax.lax.dot_general(xq.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                 (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
      return acc + part * sx[:, None] * sw
    if m == 1:
      return acc + w.astype(jnp.float32) * x.astype(jnp.float32)
    return acc + jax.lax.dot_general(x.astype(w.dtype), w, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  def body(i, acc):                      # `slabs` slabs per iteration; past hi they add zero
    for j in range(config.slabs):
      acc = slab(lo + i * config.slabs + j, acc)
    return acc

  acc = jax.lax.fori_loop(0, pl.cdiv(hi - lo, config.slabs), body,
                          jnp.zeros((bn, BLOCK) if m == 1 else (rows, bn), jnp.float32))
  if m == 1:
    acc = acc.sum(axis=1)[None, :]
  cols = pl.ds(n0, bn)
  dst = o_ref.at[split, pl.ds(0, rows), cols] if parts > 1 else o_ref.at[pl.ds(0, rows), cols]
  plgpu.store(dst, acc.astype(o_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])


def check_operands(x, w, scale, index, scale_fmt=None):
  """Validates gemv's operands; returns (G, N, K) of the weight seen as [G, N, K]."""
  if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
    raise ValueError(f"{x.shape=}: expected [M, K] with 1 <= M <= {MAX_ROWS}")
  if w.ndim not in (2, 3) or w.shape[-1] != x.shape[1]:
    raise ValueError(f"{w.shape=} must be [N, K] or [G, N, K] with K = x.shape[1] = {x.shape[1]}")
  if w.ndim == 3 and index is None:
    raise ValueError(f"a stacked weight {w.shape} needs the index of the matrix to use")
  g, n, k = (1, *w.shape) if w.ndim == 2 else w.shape
  if scale_fmt not in SCALE_FMTS:
    raise ValueError(f"{scale_fmt=} must be one of {SCALE_FMTS}")
  check_weight(w, scale)
  return g, n, k


@functools.partial(jax.jit, static_argnames=("out_dtype", "scale_fmt", "config", "interpret"))
def gemv(x: jax.Array, w: jax.Array, scale: jax.Array | None = None,
         index: jax.Array | int | None = None, *, out_dtype=None, scale_fmt: str | None = None,
         config: TuningConfig | None = None, interpret: bool = False) -> jax.Array:
  """y = x · W[index]ᵀ (or x · Wᵀ for a single matrix), float32 accumulation.

  Args:
    x: [M, K] activations, M ≤ 16, K a multiple of 128.
    w: [N, K], or a stack [G, N, K] read in place at `index` (a scalar, not checked on the
      device); e4m3 when `scale` [(G,) ceil(N/128), K/128] float32 is given, in which case x is
      quantized per 1×128 tile inside the kernel (scale_fmt None or "ue8m0", as act_quant).
    config: tiles and K splits (default: `default_config` for these sizes).
  Returns:
    [M, N] in out_dtype (default x.dtype).
  """
  _, n, k = check_operands(x, w, scale, index, scale_fmt)
  m = x.shape[0]
  out_dtype = out_dtype or x.dtype
  scaled = scale is not None
  if w.ndim == 2:
    w, scale, index = w[None], None if scale is None else scale[None], 0
  idx = jnp.asarray(index, jnp.int32).reshape(1)
  if config is None:
    config = default_config(m, n, k, getattr(jax.devices()[0], "core_count", 0) or 132)
  if m > 1 and config.block_n < 16:
    raise ValueError(f"{config.block_n=}: {m} rows need block_n >= 16 (a 16-row dot)")
  splits = min(config.k_splits, k // BLOCK)
  config = dataclasses.replace(config, k_splits=splits)
  out_shape = (splits, m, n) if splits > 1 else (m, n)
  y = pl.pallas_call(
      functools.partial(_kernel, m=m, n=n, k=k, config=config, scaled=scaled,
                        scale_fmt=scale_fmt),
      out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32 if splits > 1 else out_dtype),
      grid=(pl.cdiv(n, config.block_n), splits),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="gemv",
  )(idx, x, w, *([scale] if scaled else []))
  return y.sum(0).astype(out_dtype) if splits > 1 else y


def gemv_reference(x, w, scale=None, index=None, *, out_dtype=None,
                   scale_fmt: str | None = None) -> jax.Array:
  """Pure jnp: the same product (for e4m3 weights: act_quant of x, then per-slab scaled
  products accumulated in float32)."""
  check_operands(x, w, scale, index, scale_fmt)
  if w.ndim == 3:
    w = w[index]
    scale = None if scale is None else scale[index]
  out_dtype = out_dtype or x.dtype
  hi = jax.lax.Precision.HIGHEST
  if scale is None:
    return jnp.einsum("mk,nk->mn", x.astype(jnp.float32), w.astype(jnp.float32),
                      precision=hi).astype(out_dtype)
  n, k = w.shape
  xq, sx = act_quant_reference(x, scale_fmt)
  xs = xq.astype(jnp.float32).reshape(-1, k // BLOCK, BLOCK)
  ws = w.astype(jnp.float32).reshape(n, k // BLOCK, BLOCK)
  slabs = jnp.einsum("mkb,nkb->mnk", xs, ws, precision=hi)               # [M, N, K/128]
  sw = jnp.repeat(scale, BLOCK, axis=0)[:n]                              # [N, K/128]
  return jnp.sum(slabs * sx[:, None, :] * sw[None], axis=-1).astype(out_dtype)

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
afterwards) to put enough loads in flight when the output has few column bands. `gemv_parts`
runs the products of one x with several weights in one launch (an attention block's q and kv_a
projections), and either entry point can apply an RMSNorm to x first, inside the kernel
(`norm`: each program recomputes the rows' sums of squares, which costs reads of x only).
Runs on any CUDA GPU, and on the CPU with interpret=True.
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


def _kernel(g_ref, x_ref, *refs, m: int, k: int, parts: tuple[int, ...], config: TuningConfig,
            scaled: bool, scale_fmt: str | None, norm_eps: float | None,
            norm_stacked: bool = False):
  """Programs [0, bands(part 0)) compute part 0's column bands, the next ones part 1's, ...;
  part j's columns land at offset(j) = (bands of the parts before it) · block_n."""
  refs = list(refs)
  nw_ref = refs.pop(0) if norm_eps is not None else None
  w_refs = [refs.pop(0) for _ in parts]
  s_refs = [refs.pop(0) for _ in parts] if scaled else [None] * len(parts)
  (o_ref,) = refs
  g = g_ref[0]
  bn = config.block_n
  # one row: multiply-add into a [bn, 128] float32 tile, summed over lanes at the end (no
  # tensor-core layout shuffles); more rows: a 16-row tensor-core dot per slab
  rows = 1 if m == 1 else MAX_ROWS
  row_ok = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) < m
  split, kbs, splits = pl.program_id(1), k // BLOCK, config.k_splits
  lo, hi = split * kbs // splits, (split + 1) * kbs // splits

  def load_x(ks):
    if m == 1:
      return x_ref[pl.ds(0, 1), ks]
    return plgpu.load(x_ref.at[pl.ds(0, rows), ks], mask=row_ok[:, None], other=0.0)

  if norm_eps is not None:
    # RMSNorm of x (layers.RMSNorm's float32 arithmetic) over all K, in every program: x is
    # [rows, K], small next to one program's weight tiles, and stays in L2
    def sum_sq(kb, acc):
      xf = load_x(pl.ds(pl.multiple_of(kb * BLOCK, BLOCK), BLOCK)).astype(jnp.float32)
      return acc + jnp.sum(xf * xf, axis=1)

    ss = jax.lax.fori_loop(0, kbs, sum_sq, jnp.zeros((rows,), jnp.float32))
    inv_rms = jax.lax.rsqrt(ss / k + norm_eps)[:, None]

  def x_slab(ks):
    x = load_x(ks)
    if norm_eps is None:
      return x
    nw = nw_ref[g if norm_stacked else 0, ks].astype(jnp.float32)[None, :]
    return ((x.astype(jnp.float32) * inv_rms) * nw).astype(x_ref.dtype)

  def run(w_ref, s_ref, n, band, col0):
    n0 = band * bn
    col_ok = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0) < n

    def slab(kb, acc):
      """Adds slab kb (< hi, else nothing) of this program's reduction to acc."""
      ok = kb < hi
      kb = jnp.minimum(kb, kbs - 1)
      ks = pl.ds(pl.multiple_of(kb * BLOCK, BLOCK), BLOCK)
      x = x_slab(ks)
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

    def body(i, acc):                    # `slabs` slabs per iteration; past hi they add zero
      for j in range(config.slabs):
        acc = slab(lo + i * config.slabs + j, acc)
      return acc

    acc = jax.lax.fori_loop(0, pl.cdiv(hi - lo, config.slabs), body,
                            jnp.zeros((bn, BLOCK) if m == 1 else (rows, bn), jnp.float32))
    if m == 1:
      acc = acc.sum(axis=1)[None, :]
    cols = pl.ds(col0 + n0, bn)
    dst = o_ref.at[split, pl.ds(0, rows), cols] if splits > 1 else o_ref.at[pl.ds(0, rows), cols]
    plgpu.store(dst, acc.astype(o_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])

  pid, first = pl.program_id(0), 0
  for w_ref, s_ref, n in zip(w_refs, s_refs, parts):
    bands = pl.cdiv(n, bn)
    if len(parts) == 1:
      run(w_ref, s_ref, n, pid, 0)
    else:
      pl.when((pid >= first) & (pid < first + bands))(
          functools.partial(run, w_ref, s_ref, n, pid - first, first * bn))
    first += bands


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


def _check_norm(x, norm, w):
  """norm: None, [K], or [G, K] beside a stacked weight [G, N, K] (read at the same index)."""
  k = x.shape[1]
  if norm is not None and norm.shape != (k,) and (w.ndim != 3 or norm.shape != (w.shape[0], k)):
    raise ValueError(f"{norm.shape=}: the RMSNorm weight must be [K] = [{k}]"
                     + (f" or [G, K] = [{w.shape[0]}, {k}]" if w.ndim == 3 else ""))


@functools.partial(jax.jit, static_argnames=("out_dtype", "scale_fmt", "config", "interpret",
                                             "eps"))
def gemv(x: jax.Array, w: jax.Array, scale: jax.Array | None = None,
         index: jax.Array | int | None = None, *, out_dtype=None, scale_fmt: str | None = None,
         norm: jax.Array | None = None, eps: float = 1e-6,
         config: TuningConfig | None = None, interpret: bool = False) -> jax.Array:
  """y = x · W[index]ᵀ (or x · Wᵀ for a single matrix), float32 accumulation.

  Args:
    x: [M, K] activations, M ≤ 16, K a multiple of 128.
    w: [N, K], or a stack [G, N, K] read in place at `index` (a scalar, not checked on the
      device); e4m3 when `scale` [(G,) ceil(N/128), K/128] float32 is given, in which case x is
      quantized per 1×128 tile inside the kernel (scale_fmt None or "ue8m0", as act_quant).
    norm: an RMSNorm weight [K], or beside a stacked weight a stack [G, K] read at `index`:
      the product is then of RMSNorm(x) (layers.RMSNorm: float32, `eps`, rounded to x's
      dtype), computed inside the kernel.
    config: tiles and K splits (default: `default_config` for these sizes).
  Returns:
    [M, N] in out_dtype (default x.dtype).
  """
  (y,) = gemv_parts(x, ((w, scale),), index, out_dtype=out_dtype, scale_fmt=scale_fmt,
                    norm=norm, eps=eps, config=config, interpret=interpret)
  return y


@functools.partial(jax.jit, static_argnames=("out_dtype", "scale_fmt", "config", "interpret",
                                             "eps"))
def gemv_parts(x: jax.Array, parts, index: jax.Array | int | None = None, *, out_dtype=None,
               scale_fmt: str | None = None, norm: jax.Array | None = None, eps: float = 1e-6,
               config: TuningConfig | None = None, interpret: bool = False
               ) -> tuple[jax.Array, ...]:
  """(x · W₀[index]ᵀ, x · W₁[index]ᵀ, ...) in one launch: the products of one input with
  several weights (an attention layer's q and kv_a projections), each column band of each
  weight one program, and the optional RMSNorm of x (`norm`, as in `gemv`) computed inside.

  Args:
    parts: ((w, scale or None), ...): weights as in `gemv` with one K, all e4m3 with scales or
      all unscaled, all single matrices or all stacks of one size (read at the same `index`).
  Returns:
    one [M, N_j] array per part, in out_dtype (default x.dtype).
  """
  parts = tuple((w, s) for w, s in parts)
  if not parts:
    raise ValueError("gemv_parts needs at least one (weight, scale) part")
  shapes = [check_operands(x, w, s, index, scale_fmt) for w, s in parts]
  if len({(w.ndim, g) for (w, _), (g, _, _) in zip(parts, shapes)}) != 1 or len(
      {s is None for _, s in parts}) != 1 or len({w.dtype for w, _ in parts}) != 1:
    raise ValueError("gemv_parts: the weights must share dtype, scaling and stack size, got "
                     + ", ".join(f"{w.dtype}{list(w.shape)}{'' if s is None else '+scales'}"
                                 for w, s in parts))
  _check_norm(x, norm, parts[0][0])
  m, k = x.shape
  out_dtype = out_dtype or x.dtype
  scaled = parts[0][1] is not None
  if parts[0][0].ndim == 2:
    parts = tuple((w[None], None if s is None else s[None]) for w, s in parts)
    index = 0
  norm_stacked = norm is not None and norm.ndim == 2
  ns = tuple(w.shape[1] for w, _ in parts)
  idx = jnp.asarray(index, jnp.int32).reshape(1)
  if config is None:
    config = default_config(m, sum(ns), k, getattr(jax.devices()[0], "core_count", 0) or 132)
  if m > 1 and config.block_n < 16:
    raise ValueError(f"{config.block_n=}: {m} rows need block_n >= 16 (a 16-row dot)")
  splits = min(config.k_splits, k // BLOCK)
  config = dataclasses.replace(config, k_splits=splits)
  bands = [pl.cdiv(n, config.block_n) for n in ns]
  offsets = [config.block_n * sum(bands[:j]) for j in range(len(ns))]
  width = offsets[-1] + ns[-1]
  out_shape = (splits, m, width) if splits > 1 else (m, width)
  y = pl.pallas_call(
      functools.partial(_kernel, m=m, k=k, parts=ns, config=config, scaled=scaled,
                        scale_fmt=scale_fmt, norm_eps=None if norm is None else float(eps),
                        norm_stacked=norm_stacked),
      out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32 if splits > 1 else out_dtype),
      grid=(sum(bands), splits),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="gemv",
  )(idx, x, *([] if norm is None else [norm if norm_stacked else norm[None]]), *(w for w, _ in parts),
    *((s for _, s in parts) if scaled else ()))
  if splits > 1:
    y = y.sum(0).astype(out_dtype)
  return tuple(y[:, o:o + n] for o, n in zip(offsets, ns))


def rms_norm(x, norm, eps: float = 1e-6) -> jax.Array:
  """RMSNorm over the last axis (layers.RMSNorm): x / sqrt(mean(x²) + eps) · norm in float32,
  rounded to x's dtype; the kernels' `norm` prologue follows the same arithmetic."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * norm.astype(jnp.float32)).astype(x.dtype)


def gemv_reference(x, w, scale=None, index=None, *, out_dtype=None,
                   scale_fmt: str | None = None, norm=None, eps: float = 1e-6) -> jax.Array:
  """Pure jnp: the same product (for e4m3 weights: act_quant of x, then per-slab scaled
  products accumulated in float32), of rms_norm(x) when `norm` is given."""
  check_operands(x, w, scale, index, scale_fmt)
  _check_norm(x, norm, w)
  if norm is not None:
    x = rms_norm(x, norm[index] if norm.ndim == 2 else norm, eps)
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

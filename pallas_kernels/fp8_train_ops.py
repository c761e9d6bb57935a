"""FP8 training GEMMs: DeepSeek-V3's mixed-precision recipe as `jax.custom_vjp` products.

A linear layer y = x · Wᵀ (x [M, K] tokens × channels, W [N, K] a high-precision master) runs
its three GEMMs on e4m3 operands quantized online, each with its own tile orientation
(DeepSeek-V3 report §3.3; SPEC.md, FP8):

  Fprop  y  = x · Wᵀ    x: 1×128 tiles (per token, 128 channels)   W: 128×128 blocks
  Dgrad  dx = dy · W    dy: 1×128 tiles (per token, 128 channels)  W: the same 128×128 blocks,
                                                                       used transposed
  Wgrad  dW = dyᵀ · x   dy and x: 128×1 tiles (per channel, 128 tokens — along the contraction)

Every GEMM multiplies each 128-wide K slab's partial product by its two scales and accumulates
in float32 (the promotion interval N_C = 128). The weight is quantized from the master on every
call, its transposed blocks (for Dgrad) in the same pass, and those are the backward's weight
residual; x is quantized for Wgrad already in the forward pass and kept (e4m3 + scales, half of
a bf16 copy) as the backward's residual. On kernel backends each operand's two orientations
come from one Pallas pass over it (pallas_kernels.dual_quant; `Fp8Backend(dual_quant=False)`
leaves them to XLA's fusions: the same values). Scales are amax / 448 with amax floored (1e-20 for
activations and gradients, 1e-12 for weights), so an all-zero tile gets a finite scale and
quantizes to zeros. The quantizers are the kernels' jnp references (act_quant_reference,
weight_quant_reference).

Experts use the grouped form: rows sorted by expert, w [E, N, K]. Wgrad's 128-token tiles must
not straddle two experts, so each expert's rows are padded to a multiple of 128
(`align_groups`, the contiguous layout DeepGEMM uses for the same reason).

Capacity-bucketed experts (E equal buckets of C rows, x [E, C, K]) need no alignment: each
bucket is its own group (`fp8_train_batched`).

Backends (`Fp8Backend.kind`): "xla" emulates the kernels exactly in float32 (dequantized operands,
HIGHEST-precision dots: the products of e4m3 values are exact in float32, so only the summation
order differs) — the CPU path and the tests' reference; "triton" and "mosaic" run
pallas_kernels. Mosaic (Hopper) runs every dense GEMM (Fprop, Dgrad, and Wgrad with per-row
scales on both operands) and every GEMM of the bucketed experts (one batched launch each);
ragged (dropless) expert groups run on Triton with either kind, and on "triton" everything does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.act_quant import act_quant_reference
from pallas_kernels.dual_quant import dual_quant, dual_quant_blocks
from pallas_kernels.fp8_gemm_mosaic import (fp8_gemm_mosaic, fp8_gemm_mosaic_batched,
                                             fp8_rowwise_gemm_mosaic)
from pallas_kernels.fp8_gemm_triton import (dequantize_activations, dequantize_weight,
                                            fp8_gemm_triton)
from pallas_kernels.fp8_grouped_gemm_triton import fp8_grouped_gemm_triton
from pallas_kernels.fp8_ops import Fp8Backend
from pallas_kernels.fp8_wgrad_triton import fp8_wgrad_reference, fp8_wgrad_triton
from pallas_kernels.weight_dequant import weight_quant_reference

BLOCK = 128
AMAX_FLOOR = 1e-20  # keeps all-zero tiles finite without touching real gradients' scales
_HI = jax.lax.Precision.HIGHEST


# ---- online quantization -------------------------------------------------------------------------
def quant_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """1×128 tiles along the last axis. x [..., R, C] (C % 128 == 0) → (e4m3 [..., R, C],
  float32 scales [..., R, C/128]) with x ≈ q · s."""
  return act_quant_reference(x, amax_floor=AMAX_FLOOR)


def _quant_rows_and_cols(x, backend: Fp8Backend):
  """x [(E,) R, C] (multiples of 128) → (q, s) per 1×128 tile and (qt, st) of xᵀ per 1×128 tile
  (128×1 tiles of x, transposed): one Pallas pass on kernel backends (dual_quant), XLA's
  fusions otherwise; the same values either way."""
  if backend.kind != "xla" and backend.dual_quant:
    return dual_quant(x, amax_floor=AMAX_FLOOR, interpret=backend.interpret)
  return (*quant_rows(x), *quant_rows(_t(x)))


def _quant_blocks_and_transpose(w, backend: Fp8Backend):
  """w [(E,) N, K] (multiples of 128) → 128×128-block (q, s) and their transposes (qᵀ, sᵀ)."""
  if backend.kind != "xla" and backend.dual_quant:
    return dual_quant_blocks(w, interpret=backend.interpret)
  q, s = quant_blocks(w)
  return q, s, _t(q), _t(s)


quant_blocks = weight_quant_reference        # 128×128 blocks: [..., N, K] → (e4m3, [..., N/128, K/128])
dequant_rows = dequantize_activations        # q [..., R, C] · s[..., R, C // 128]
dequant_blocks = dequantize_weight           # q [..., N, K] · s[..., N // 128, K // 128]


def _t(x):
  return jnp.swapaxes(x, -1, -2)


# ---- the GEMMs, per backend (operands already padded to multiples of 128) ----------------------
def _gemm(a, sa, b, sb, backend: Fp8Backend, out_dtype):
  """a [(E,) M, K] 1×128 scales; b [(E,) N, K] 128×128 scales → [(E,) M, N] (3-D: per group,
  on "xla" and "mosaic")."""
  if backend.kind == "xla":
    return jnp.matmul(dequant_rows(a, sa), _t(dequant_blocks(b, sb)),
                      precision=_HI).astype(out_dtype)
  if backend.kind == "mosaic":
    gemm = fp8_gemm_mosaic_batched if a.ndim == 3 else fp8_gemm_mosaic
    return gemm(a, sa, b, sb, out_dtype=out_dtype, interpret=backend.interpret)
  return fp8_gemm_triton(a, sa, b, sb, out_dtype=out_dtype, interpret=backend.interpret)


def _grouped_gemm(a, sa, b, sb, sizes, backend: Fp8Backend, out_dtype):
  """a [M, K] rows sorted by group; b [E, N, K] 128×128 scales → [M, N]."""
  if backend.kind == "xla":
    y = jax.lax.ragged_dot(dequant_rows(a, sa), _t(dequant_blocks(b, sb)), sizes, precision=_HI)
    return y.astype(out_dtype)
  return fp8_grouped_gemm_triton(a, sa, b, sb, sizes, out_dtype=out_dtype,
                                 interpret=backend.interpret)


def _wgrad(a, sa, b, sb, block_offsets, backend: Fp8Backend):
  """a [M, T], b [N, T], per-row scales along T → [G, M, N] float32."""
  if backend.kind == "xla":
    return fp8_wgrad_reference(a, sa, b, sb, block_offsets)
  return fp8_wgrad_triton(a, sa, b, sb, block_offsets, interpret=backend.interpret)


def _dense_wgrad(a, sa, b, sb, backend: Fp8Backend):
  """a [(E,) M, T], b [(E,) N, T], per-row scales along T, all tokens one group (per E on
  "mosaic") → [(E,) M, N] float32."""
  if backend.kind == "mosaic":
    return fp8_rowwise_gemm_mosaic(a, sa, b, sb, interpret=backend.interpret)
  offsets = jnp.array([0, a.shape[1] // BLOCK], jnp.int32)
  return _wgrad(a, sa, b, sb, offsets, backend)[0]


# ---- dense: y = x · Wᵀ ---------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x, w, backend):
  """x [(E,) M, K] · w [(E,) N, K]ᵀ; 3-D operands (equal buckets) on "mosaic" only."""
  return _linear_fwd(x, w, backend)[0]


def _linear_fwd(x, w, backend):
  # Fprop: x per token per 128 channels; the Wgrad operand: x per channel per 128 tokens
  xq, sx, xtq, sxt = _quant_rows_and_cols(x, backend)
  wq, sw, wtq, swt = _quant_blocks_and_transpose(w, backend)   # W per 128×128 block
  y = _gemm(xq, sx, wq, sw, backend, x.dtype)
  return y, (xtq, sxt, wtq, swt, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _linear_bwd(backend, res, dy):
  xtq, sxt, wtq, swt, x0, w0 = res
  # Dgrad: dy per token per 128 channels; Wgrad: dy per channel per 128 tokens
  dyq, sdy, dytq, sdyt = _quant_rows_and_cols(dy, backend)
  dx = _gemm(dyq, sdy, wtq, swt, backend, x0.dtype)   # the same blocks, transposed
  dw = _dense_wgrad(dytq, sdyt, xtq, sxt, backend)
  return dx, dw.astype(w0.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def _match_vma(*arrays):
  """Inside shard_map, casts the operands to vary over the same manual mesh axes. The custom
  VJP's cotangents vary like the product's operands together (a weight gradient summed over
  sharded tokens varies over the token axes); casting the weight first makes autodiff insert the
  matching psum in the backward pass. Outside shard_map: unchanged."""
  vmas = [frozenset(getattr(getattr(jax.typeof(a), "mat", None), "varying", None) or ())
          for a in arrays]
  union = frozenset().union(*vmas)
  return [a if v == union else jax.lax.pcast(a, tuple(sorted(union - v)), to="varying")
          for a, v in zip(arrays, vmas)]


def _pad_to(x, axis, multiple=BLOCK):
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def fp8_train_linear(x: jax.Array, w: jax.Array, *, backend: Fp8Backend) -> jax.Array:
  """y = x · Wᵀ through FP8 GEMMs in forward and backward (the training recipe above).

  Args:
    x: [..., K] activations (bf16 or float32); w: [N, K] high-precision weight (the master).
    backend: an Fp8Backend ("xla", "triton" or "mosaic").
  Returns:
    [..., N] in x.dtype. Differentiable in x and w (custom VJP). Any M, N, K: operands are
    zero-padded to multiples of 128 (exact; a no-op for aligned shapes).
  """
  *lead, k = x.shape
  n = w.shape[0]
  if w.ndim != 2 or w.shape[1] != k:
    raise ValueError(f"fp8_train_linear: {x.shape=} and weight {w.shape=} disagree on K")
  x, w = _match_vma(x, w)
  x2 = _pad_to(_pad_to(x.reshape(-1, k), 0), 1)
  y = _linear(x2, _pad_to(_pad_to(w, 0), 1), backend)
  m = 1
  for d in lead:
    m *= d
  return y[:m, :n].reshape(*lead, n)


# ---- grouped (experts): y[i] = x[i] · W[g(i)]ᵀ ------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(x, w, sizes, backend):
  return _grouped_fwd(x, w, sizes, backend)[0]


def _grouped_fwd(x, w, sizes, backend):
  xq, sx, xtq, sxt = _quant_rows_and_cols(x, backend)
  wq, sw, wtq, swt = _quant_blocks_and_transpose(w, backend)
  y = _grouped_gemm(xq, sx, wq, sw, sizes, backend, x.dtype)
  return y, (xtq, sxt, wtq, swt, sizes, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _grouped_bwd(backend, res, dy):
  xtq, sxt, wtq, swt, sizes, x0, w0 = res
  dyq, sdy, dytq, sdyt = _quant_rows_and_cols(dy, backend)
  dx = _grouped_gemm(dyq, sdy, wtq, swt, sizes, backend, x0.dtype)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                             jnp.cumsum(sizes.astype(jnp.int32)) // BLOCK])
  dw = _wgrad(dytq, sdyt, xtq, sxt, offsets, backend)
  return dx, dw.astype(w0.dtype), None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def align_groups(group_sizes: jax.Array, rows: int) -> tuple[jax.Array, jax.Array, int]:
  """The 128-aligned layout of rows sorted by group.

  Args:
    group_sizes: [E] int rows per group (summing to `rows`).
  Returns:
    (dest [rows] int32: each sorted row's slot in the aligned buffer, aligned_sizes [E] int32:
    every size a multiple of 128 and summing to the buffer's length, length: static buffer
    length, a multiple of 128 >= rows + 127·E). The last group absorbs the slack (zero rows).
  """
  e = group_sizes.shape[0]
  length = -(-(rows + (BLOCK - 1) * e) // BLOCK) * BLOCK
  sizes = group_sizes.astype(jnp.int32)
  padded = -(-sizes // BLOCK) * BLOCK
  padded = padded.at[-1].add(length - padded.sum())
  starts = jnp.cumsum(sizes) - sizes
  pstarts = jnp.cumsum(padded) - padded
  g = jnp.repeat(jnp.arange(e, dtype=jnp.int32), sizes, total_repeat_length=rows)
  dest = pstarts[g] + jnp.arange(rows, dtype=jnp.int32) - starts[g]
  return dest, padded, length


def fp8_train_grouped_aligned(x: jax.Array, w: jax.Array, aligned_sizes: jax.Array, *,
                              backend: Fp8Backend) -> jax.Array:
  """Grouped y[i] = x[i] · W[g(i)]ᵀ through FP8 GEMMs, for rows already in the aligned layout.

  Args:
    x: [R, K] rows sorted by group, R a multiple of 128; w: [E, N, K] masters.
    aligned_sizes: [E] int32, each a multiple of 128, summing to R (see align_groups).
  Returns:
    [R, N] in x.dtype; differentiable in x and w.
  """
  r, k = x.shape
  if r % BLOCK:
    raise ValueError(f"fp8_train_grouped_aligned: {r} rows is not a multiple of {BLOCK}")
  if w.ndim != 3 or w.shape[2] != k:
    raise ValueError(f"fp8_train_grouped_aligned: {x.shape=} and weight {w.shape=} disagree")
  n = w.shape[1]
  x, w, aligned_sizes = _match_vma(x, w, aligned_sizes)
  y = _grouped(_pad_to(x, 1), _pad_to(_pad_to(w, 1), 2), aligned_sizes.astype(jnp.int32),
               backend)
  return y[:, :n]


def to_aligned_rows(x: jax.Array, group_sizes: jax.Array):
  """Rows sorted by group (x [M, K], group_sizes [E] summing to M) scattered into the aligned
  layout (align_groups; padding rows are zero). Returns (x_aligned [length, K], aligned_sizes,
  dest): row i of x is row dest[i] of x_aligned (gather the products back with [dest])."""
  dest, sizes, length = align_groups(group_sizes, x.shape[0])
  xp = jnp.zeros((length, x.shape[1]), x.dtype).at[dest].set(x, unique_indices=True)
  return xp, sizes, dest


def fp8_train_grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                      backend: Fp8Backend) -> jax.Array:
  """fp8_train_grouped_aligned for rows sorted by group with any group sizes: the rows are
  scattered into the aligned layout and gathered back. x: [M, K]; w: [E, N, K];
  group_sizes: [E] summing to M. Returns [M, N] in x.dtype."""
  xp, sizes, dest = to_aligned_rows(x, group_sizes)
  return fp8_train_grouped_aligned(xp, w, sizes, backend=backend)[dest]


# ---- equal buckets (capacity-dispatched experts): y[e] = x[e] · W[e]ᵀ ---------------------------
def fp8_train_batched(x: jax.Array, w: jax.Array, *, backend: Fp8Backend) -> jax.Array:
  """Per-bucket y[e] = x[e] · W[e]ᵀ through FP8 GEMMs (capacity-dispatched experts).

  Every bucket is a group of its own, so a Wgrad token tile never straddles two experts and no
  aligned layout is needed. "mosaic": one batched Mosaic launch per GEMM (C and the widths are
  zero-padded to multiples of 128: exact); other kinds: the grouped product with E equal groups
  (fp8_train_grouped_aligned when C is a multiple of 128, else fp8_train_grouped) — the same
  function.

  Args:
    x: [E, C, K] bucketed activations; w: [E, N, K] masters.
  Returns:
    [E, C, N] in x.dtype; differentiable in x and w.
  """
  e, c, k = x.shape
  if w.ndim != 3 or w.shape[0] != e or w.shape[2] != k:
    raise ValueError(f"fp8_train_batched: {x.shape=} and weight {w.shape=} disagree on E or K")
  n = w.shape[1]
  if backend.kind != "mosaic":
    sizes = jnp.full((e,), c, jnp.int32)
    grouped = fp8_train_grouped_aligned if c % BLOCK == 0 else fp8_train_grouped
    return grouped(x.reshape(e * c, k), w, sizes, backend=backend).reshape(e, c, n)
  x, w = _match_vma(x, w)
  y = _linear(_pad_to(_pad_to(x, 1), 2), _pad_to(_pad_to(w, 1), 2), backend)
  return y[:, :c, :n]

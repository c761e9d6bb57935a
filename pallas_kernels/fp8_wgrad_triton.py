"""FP8 weight-gradient GEMM with per-row scales on both operands (Pallas, Triton lowering).

In the backward pass of y = x · Wᵀ the weight gradient dW = dyᵀ · x contracts over TOKENS, so
DeepSeek-V3's recipe quantizes both of its operands along the token dimension (128×1 tiles: one
scale per channel per 128 tokens). Laid out token-minor, both operands are K-major with one scale
per row per 128-wide K slab:

  A = dyᵀ [M, T] e4m3, sA [M, T/128];   B = xᵀ [N, T] e4m3, sB [N, T/128]   (T = tokens)
  C[g][m, n] = Σ_{kb ∈ group g} (A_kb · B_kbᵀ)[m, n] · sA[m, kb] · sB[n, kb]

accumulated in float32 one 128-token slab at a time (the promotion interval N_C = 128). For MoE
experts the token axis is cut into groups — expert g owns slabs block_offsets[g] ..
block_offsets[g + 1] (its rows were padded to a multiple of 128 by the caller) — and each group
yields its own [M, N] gradient; a dense layer is the one-group case. Each program owns one
block_m × block_n tile of one group's output and loops over that group's slabs (a loop with
run-time bounds, read from block_offsets). Runs on any CUDA GPU with FP8 tensor cores and on the
CPU with interpret=True.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fp8_gemm_triton import BLOCK, FP8, TuningConfig, tile_product


def default_config(m: int, n: int) -> TuningConfig:
  del m, n
  return TuningConfig(block_m=128, block_n=64, num_warps=4, num_stages=4)


def _kernel(off_ref, a_ref, sa_ref, b_ref, sb_ref, o_ref, *, m: int, n: int,
            config: TuningConfig):
  g = pl.program_id(0)
  acc, rows, cols, mask = tile_product(pl.program_id(1), a_ref, sa_ref, b_ref, sb_ref,
                                       off_ref[g], off_ref[g + 1], m=m, n=n, config=config,
                                       b_rowwise=True)
  plgpu.store(o_ref.at[g, rows, cols], acc.astype(o_ref.dtype), mask=mask)


def check_operands(a, sa, b, sb, block_offsets) -> tuple[int, int, int]:
  """Validates the operands; returns (M, N, T)."""
  for name, x in (("a", a), ("b", b)):
    if x.ndim != 2 or x.dtype != FP8:
      raise ValueError(f"{name}: {x.shape=} {x.dtype=}: expected 2-D float8_e4m3fn, tokens last")
  (m, t), (n, tb) = a.shape, b.shape
  if t % BLOCK or tb != t:
    raise ValueError(f"{a.shape=} {b.shape=}: the token axes must agree and be a multiple of "
                     f"{BLOCK}")
  for name, s, rows in (("sa", sa, m), ("sb", sb, n)):
    if s.shape != (rows, t // BLOCK) or s.dtype != jnp.float32:
      raise ValueError(f"{name}: {s.shape=} {s.dtype=}: expected float32 {(rows, t // BLOCK)}")
  if block_offsets.ndim != 1 or block_offsets.shape[0] < 2 or not jnp.issubdtype(
      block_offsets.dtype, jnp.integer):
    raise ValueError(f"{block_offsets.shape=} {block_offsets.dtype=}: expected integer [G + 1]")
  return m, n, t


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8_wgrad_triton(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array,
                     block_offsets: jax.Array, *, out_dtype=jnp.float32,
                     config: TuningConfig | None = None, interpret: bool = False) -> jax.Array:
  """Token-grouped C[g] = A_g · B_gᵀ with per-row scales.

  Args:
    a: [M, T] e4m3 (T tokens, a multiple of 128); sa: [M, T/128] float32.
    b: [N, T] e4m3; sb: [N, T/128] float32.
    block_offsets: [G + 1] int32, nondecreasing, block_offsets[0] = 0 and block_offsets[G] <=
      T/128: group g contracts over the 128-token slabs block_offsets[g] .. block_offsets[g+1].
  Returns:
    [G, M, N] in out_dtype (float32 by default: it feeds float32 master weights).
  """
  m, n, _ = check_operands(a, sa, b, sb, block_offsets)
  groups = block_offsets.shape[0] - 1
  if m == 0 or n == 0:
    return jnp.zeros((groups, m, n), out_dtype)
  config = config or default_config(m, n)
  return pl.pallas_call(
      functools.partial(_kernel, m=m, n=n, config=config),
      out_shape=jax.ShapeDtypeStruct((groups, m, n), out_dtype),
      grid=(groups, pl.cdiv(m, config.block_m) * pl.cdiv(n, config.block_n)),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="fp8_wgrad_triton",
  )(block_offsets.astype(jnp.int32), a, sa, b, sb)


def fp8_wgrad_reference(a, sa, b, sb, block_offsets, *, out_dtype=jnp.float32) -> jax.Array:
  """Pure-jnp fp8_wgrad_triton: per group, the float32 product of the dequantized operands."""
  m, n, t = check_operands(a, sa, b, sb, block_offsets)
  af = a.astype(jnp.float32) * jnp.repeat(sa, BLOCK, axis=1)
  bf = b.astype(jnp.float32) * jnp.repeat(sb, BLOCK, axis=1)
  slab = jnp.arange(t) // BLOCK
  offs = block_offsets.astype(jnp.int32)
  member = (slab[None, :] >= offs[:-1, None]) & (slab[None, :] < offs[1:, None])  # [G, T]
  c = jnp.einsum("mt,gt,nt->gmn", af, member.astype(jnp.float32), bf,
                 precision=jax.lax.Precision.HIGHEST)
  return c.astype(out_dtype)

"""Grouped (MoE) FP8 GEMM with DeepSeek's block scales (Pallas, Triton lowering).

Rows of A are sorted by expert: expert e owns group_sizes[e] consecutive rows and multiplies
them by its own weight B[e] [N, K] (e4m3, scales sB[e] [ceil(N/128), K/128]):
  C[i, n] = Σ_kb (A_kb · B[e(i)]_kbᵀ)[i, n] · sA[i, kb] · sB[e(i), n // 128, kb].
A tile schedule computed outside the kernel (a few small jnp ops over E) lists, for every
block_m-row tile, its expert, first row and the expert's end row; the grid has a static upper
bound of tiles (ceil(M / block_m) + E) and programs past the real count return at once. Rows of
a tile outside its expert are masked, so experts never share a tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fp8_gemm_triton import (BLOCK, TuningConfig, check_operands,
                                            dequantize_activations, dequantize_weight,
                                            scaled_slab)


def default_config(m: int, n: int, k: int, num_groups: int) -> TuningConfig:
  """Rows per expert average m / E: small tiles when experts see few tokens (decode)."""
  del k
  per_group = m / max(num_groups, 1)
  if per_group <= 16:
    return TuningConfig(block_m=16, block_n=64, num_warps=4, num_stages=5)
  if per_group <= 64:
    return TuningConfig(block_m=64, block_n=64, num_warps=4, num_stages=4)
  return TuningConfig(block_m=128 if per_group >= 512 else 64, block_n=128,
                      num_warps=8 if per_group >= 512 else 4, num_stages=3)


def tile_schedule(group_sizes: jax.Array, m: int, block_m: int):
  """Per tile (static count ceil(m / block_m) + E): (expert, first row, expert end row, valid).

  Tiles of expert e start at its first row and step by block_m; invalid tiles (past the real
  count) have valid == 0.
  """
  e = group_sizes.shape[0]
  num_tiles = pl.cdiv(m, block_m) + e
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  tiles = (sizes + block_m - 1) // block_m
  tile_ends = jnp.cumsum(tiles)
  t = jnp.arange(num_tiles, dtype=jnp.int32)
  g = jnp.minimum(jnp.searchsorted(tile_ends, t, side="right"), e - 1).astype(jnp.int32)
  first_tile = tile_ends[g] - tiles[g]
  row0 = starts[g] + (t - first_tile) * block_m
  valid = (t < tile_ends[-1]).astype(jnp.int32)
  return g, row0, ends[g], valid


def _kernel(g_ref, row0_ref, end_ref, valid_ref, a_ref, sa_ref, b_ref, sb_ref, o_ref, *,
            n: int, k: int, config: TuningConfig):
  bm, bn = config.block_m, config.block_n
  t, pid_n = pl.program_id(0), pl.program_id(1)

  @pl.when(valid_ref[t] != 0)
  def _():
    g, row0, end = g_ref[t], row0_ref[t], end_ref[t]
    row_ok = row0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0) < end
    col_ok = pid_n * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0) < n
    rows = pl.ds(row0, bm)

    def body(kb, acc):
      return acc + scaled_slab(a_ref, sa_ref, b_ref, sb_ref, kb, rows, row_ok, pid_n * bn,
                               col_ok, block_n=bn, n_blocks=pl.cdiv(n, BLOCK), b_index=(g,))

    acc = jax.lax.fori_loop(0, k // BLOCK, body, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(o_ref.at[rows, pl.ds(pid_n * bn, bn)], acc.astype(o_ref.dtype),
                mask=row_ok[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8_grouped_gemm_triton(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array,
                            group_sizes: jax.Array, *, out_dtype=jnp.bfloat16,
                            config: TuningConfig | None = None,
                            interpret: bool = False) -> jax.Array:
  """Row-grouped C = A · B[e]ᵀ with block scales.

  Args:
    a: [M, K] e4m3, rows sorted by expert; sa: [M, K/128] float32.
    b: [E, N, K] e4m3; sb: [E, ceil(N/128), K/128] float32.
    group_sizes: [E] int32 rows per expert, summing to M (rows past the sum are not written).
  Returns:
    [M, N] in out_dtype.
  """
  m, k, n = check_operands(a, sa, b, sb, grouped=True)
  if group_sizes.shape != (b.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{group_sizes.shape=} {group_sizes.dtype=}: expected integer "
                     f"[{b.shape[0]}] (one size per expert of b)")
  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype)
  config = config or default_config(m, n, k, b.shape[0])
  sched = tile_schedule(group_sizes, m, config.block_m)
  return pl.pallas_call(
      functools.partial(_kernel, n=n, k=k, config=config),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(sched[0].shape[0], pl.cdiv(n, config.block_n)),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="fp8_grouped_gemm_triton",
  )(*sched, a, sa, b, sb)


def fp8_grouped_gemm_reference(a, sa, b, sb, group_sizes, *, out_dtype=jnp.bfloat16):
  """Pure-jnp grouped GEMM: the dequantized operands through jax.lax.ragged_dot in float32."""
  check_operands(a, sa, b, sb, grouped=True)
  c = jax.lax.ragged_dot(dequantize_activations(a, sa),
                         jnp.swapaxes(dequantize_weight(b, sb), 1, 2),
                         group_sizes.astype(jnp.int32), precision=jax.lax.Precision.HIGHEST)
  return c.astype(out_dtype)

"""FP8 GEMM with 1×128 activation and 128×128 weight block scales (Pallas, Triton lowering).

C[m, n] = Σ_kb (A_kb · B_kbᵀ)[m, n] · sA[m, kb] · sB[n // 128, kb], accumulated in float32 one
128-wide K slab at a time (the report's promotion interval N_C = 128), output bf16 (SPEC.md, FP8).
Each program owns a block_m × block_n tile of C; ragged M and N are masked on load and store.
Runs on any CUDA GPU with FP8 tensor cores (sm89+), and on the CPU with interpret=True.
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
FP8 = jnp.float8_e4m3fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  block_m: int = 64
  block_n: int = 128     # divides 128, or 256 (then two weight-scale blocks per tile)
  group_m: int = 8       # programs along M that share a band of B (L2 reuse)
  num_warps: int = 4
  num_stages: int = 4

  def __post_init__(self):
    if self.block_m < 16 or self.block_m & (self.block_m - 1):
      raise ValueError(f"{self.block_m=} must be a power of two >= 16")
    if self.block_n not in (16, 32, 64, 128, 256):
      raise ValueError(f"{self.block_n=} must be one of 16, 32, 64, 128, 256")


def default_config(m: int, n: int, k: int) -> TuningConfig:
  """Tiles by problem size: small M streams the weight with narrow N tiles (more programs)."""
  del k
  if m <= 16:
    return TuningConfig(block_m=16, block_n=64, num_warps=4, num_stages=6)
  if m <= 64:
    return TuningConfig(block_m=64, block_n=64, num_warps=4, num_stages=6)
  if m <= 256:
    return TuningConfig(block_m=64, block_n=128, num_warps=4, num_stages=4)
  # Measured on H100 (docs/benchmarks.md): one warpgroup on 128×64 tiles beat 128×128 and
  # 128×256 with two warpgroups (the slab's wgmma is waited before its scales are applied).
  return TuningConfig(block_m=128, block_n=64, num_warps=4, num_stages=4)


def tile_index(pid, grid_m: int, grid_n: int, group_m: int):
  """Grouped ordering: group_m consecutive M tiles sweep N together, so B bands stay in L2."""
  width = group_m * grid_n
  group = pid // width
  first_m = group * group_m
  size_m = jnp.minimum(grid_m - first_m, group_m)
  return first_m + (pid % width) % size_m, (pid % width) // size_m


def scaled_slab(a_ref, sa_ref, b_ref, sb_ref, kb, rows, row_ok, n0, col_ok, *, block_n: int,
                n_blocks: int, b_index=(), b_rowwise: bool = False):
  """One K slab: (A_kb · B_kbᵀ) · sA[:, kb] · sB[n // 128, kb] for a block of rows × columns.

  rows/row_ok index A's (block_m) rows; n0 is the tile's first column; b_index selects a leading
  (expert) axis of b_ref / sb_ref. With b_rowwise, B has one scale per row per slab (sB[n, kb],
  1×128 tiles, as the weight-gradient GEMM's operands have) instead of 128×128 blocks.
  """
  ks = pl.ds(pl.multiple_of(kb * BLOCK, BLOCK), BLOCK)
  a = plgpu.load(a_ref.at[rows, ks], mask=row_ok[:, None], other=0.0)
  b = plgpu.load(b_ref.at[(*b_index, pl.ds(n0, block_n), ks)], mask=col_ok[:, None], other=0.0)
  sa = plgpu.load(sa_ref.at[rows, kb], mask=row_ok, other=0.0)
  p = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),                 # f32 [bm, bn]
                          preferred_element_type=jnp.float32)
  if b_rowwise:
    sb = plgpu.load(sb_ref.at[(*b_index, pl.ds(n0, block_n), kb)], mask=col_ok, other=0.0)
    return p * sa[:, None] * sb[None, :]
  nb = n0 // BLOCK
  if block_n <= BLOCK:                                  # the tile lies in one weight block
    return p * (sa * sb_ref[(*b_index, nb, kb)])[:, None]
  sb_lo = sb_ref[(*b_index, nb, kb)]
  sb_hi = sb_ref[(*b_index, jnp.minimum(nb + 1, n_blocks - 1), kb)]
  cols = jax.lax.broadcasted_iota(jnp.int32, (block_n,), 0)
  return p * sa[:, None] * jnp.where(cols < BLOCK, sb_lo, sb_hi)[None, :]


def tile_product(pid, a_ref, sa_ref, b_ref, sb_ref, kb_start, kb_end, *, m: int, n: int,
                 config: TuningConfig, b_rowwise: bool = False):
  """Program `pid`'s output tile (grouped order): Σ over K slabs kb_start..kb_end of
  scaled_slab, in float32. Returns (acc [bm, bn], rows, cols, mask) to store it with."""
  bm, bn = config.block_m, config.block_n
  pid_m, pid_n = tile_index(pid, pl.cdiv(m, bm), pl.cdiv(n, bn), config.group_m)
  row_ok = pid_m * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0) < m
  col_ok = pid_n * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0) < n
  rows = pl.ds(pid_m * bm, bm)

  def body(kb, acc):
    return acc + scaled_slab(a_ref, sa_ref, b_ref, sb_ref, kb, rows, row_ok, pid_n * bn, col_ok,
                             block_n=bn, n_blocks=pl.cdiv(n, BLOCK), b_rowwise=b_rowwise)

  acc = jax.lax.fori_loop(kb_start, kb_end, body, jnp.zeros((bm, bn), jnp.float32))
  return acc, rows, pl.ds(pid_n * bn, bn), row_ok[:, None] & col_ok[None, :]


def _kernel(a_ref, sa_ref, b_ref, sb_ref, o_ref, *, m: int, n: int, k: int,
            config: TuningConfig):
  acc, rows, cols, mask = tile_product(pl.program_id(0), a_ref, sa_ref, b_ref, sb_ref, 0,
                                       k // BLOCK, m=m, n=n, config=config)
  plgpu.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8_gemm_triton(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, *,
                    out_dtype=jnp.bfloat16, config: TuningConfig | None = None,
                    interpret: bool = False) -> jax.Array:
  """C = A · Bᵀ with DeepSeek's block scales.

  Args:
    a: [M, K] e4m3 activations (K a multiple of 128); sa: [M, K/128] float32 scales.
    b: [N, K] e4m3 weight; sb: [ceil(N/128), K/128] float32 (`weight_scale_inv`, a multiplier).
  Returns:
    [M, N] in out_dtype.
  """
  m, k, n = check_operands(a, sa, b, sb)
  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype)
  config = config or default_config(m, n, k)
  grid = pl.cdiv(m, config.block_m) * pl.cdiv(n, config.block_n)
  return pl.pallas_call(
      functools.partial(_kernel, m=m, n=n, k=k, config=config),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(grid,),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="fp8_gemm_triton",
  )(a, sa, b, sb)


def check_operands(a, sa, b, sb, *, grouped: bool = False) -> tuple[int, int, int]:
  """Validates GEMM operands (b, sb with a leading expert axis when grouped); returns M, K, N."""
  lead = 1 if grouped else 0
  if a.ndim != 2 or a.dtype != FP8:
    raise ValueError(f"{a.shape=} {a.dtype=}: expected 2-D float8_e4m3fn activations [M, K]")
  if b.ndim != 2 + lead or b.dtype != FP8:
    what = "[E, N, K]" if grouped else "[N, K]"
    raise ValueError(f"{b.shape=} {b.dtype=}: expected a float8_e4m3fn weight {what}")
  m, k = a.shape
  n, kb_ = b.shape[-2:]
  if k % BLOCK:
    raise ValueError(f"{k=} (a.shape[1]) must be a multiple of {BLOCK}")
  if kb_ != k:
    raise ValueError(f"{a.shape=} and {b.shape=} disagree on K")
  if sa.shape != (m, k // BLOCK) or sa.dtype != jnp.float32:
    raise ValueError(f"{sa.shape=} {sa.dtype=}: expected float32 {(m, k // BLOCK)}")
  expected = (*b.shape[:lead], math.ceil(n / BLOCK), k // BLOCK)
  if sb.shape != expected or sb.dtype != jnp.float32:
    raise ValueError(f"{sb.shape=} {sb.dtype=}: expected float32 {expected}")
  return m, k, n


def dequantize_activations(a: jax.Array, sa: jax.Array) -> jax.Array:
  """A[m, k] · sA[m, k // 128] in float32."""
  return a.astype(jnp.float32) * jnp.repeat(sa, BLOCK, axis=-1)


def dequantize_weight(b: jax.Array, sb: jax.Array) -> jax.Array:
  """B[..., n, k] · sB[..., n // 128, k // 128] in float32."""
  n = b.shape[-2]
  s = jnp.repeat(jnp.repeat(sb, BLOCK, axis=-2), BLOCK, axis=-1)[..., :n, :]
  return b.astype(jnp.float32) * s


def fp8_gemm_reference(a, sa, b, sb, *, out_dtype=jnp.bfloat16) -> jax.Array:
  """Pure-jnp fp8_gemm: Σ_kb (A_kb·B_kbᵀ)·sA·sB equals the product of the dequantized operands
  (both scales are constant over a K slab), computed here in float32 at HIGHEST precision."""
  check_operands(a, sa, b, sb)
  c = jnp.dot(dequantize_activations(a, sa), dequantize_weight(b, sb).T,
              precision=jax.lax.Precision.HIGHEST)
  return c.astype(out_dtype)

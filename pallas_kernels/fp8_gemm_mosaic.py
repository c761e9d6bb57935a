"""FP8 block-scaled GEMM for Hopper (Pallas, Mosaic GPU lowering): wgmma + TMA, warp-specialized.

C[m, n] = Σ_kb (A_kb · B_kbᵀ)[m, n] · sA[m, kb] · sB[n // 128, kb] (SPEC.md, FP8), the schedule
of DeepGEMM: a memory warpgroup streams 128-wide K slabs of A [M, K] and B [N, K] (both K-major,
as e4m3 wgmma requires) and the slab's activation scales into a ring of shared-memory stages
with TMA; two compute warpgroups each issue the slab's wgmma into a fresh fp32 accumulator, wait,
and promote it into a register accumulator with the slab's scales (the report's N_C = 128).
The grid is persistent (one CTA per SM walking output tiles in a snake order for L2 reuse).
Ragged M and N rely on TMA: out-of-bounds loads read zeros and out-of-bounds stores are dropped.
Optional split-K (for decode, where few output tiles cannot fill the chip) writes float32
partials that the wrapper sums.

The same kernel body serves two generalizations for training (pallas_kernels.fp8_train_ops):
- per-row B scales, C = Σ_kb (A_kb · B_kbᵀ) · sA[m, kb] · sB[n, kb] (`fp8_rowwise_gemm_mosaic`,
  the weight gradient, where both operands are quantized along the contracted token axis): sB
  travels transposed, [K/128, N'], through the pipeline beside sA and is broadcast along the
  accumulator's rows;
- a leading group axis, A [E, M, K], B [E, N, K] → C [E, M, N] (`fp8_gemm_mosaic_batched`, and
  the row-wise kernel on 3-D operands: capacity-bucketed experts, E equal groups): the
  persistent loop walks groups × tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8_gemm_triton import (BLOCK, FP8, check_operands, dequantize_activations,
                                            dequantize_weight, fp8_gemm_reference)

WG_M = 64  # rows per compute warpgroup: Hopper's wgmma M
SMEM_BYTES = 227 * 1024 - 2048  # per-block shared memory on sm90, less barriers and scratch


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  tile_n: int = 128            # columns per compute warpgroup; divides 128 (one sB per tile)
  wg_dimension: str = "m"      # the 2 compute warpgroups split M (CTA 128×tile_n) or N (64×2·tile_n)
  max_concurrent_steps: int = 4
  k_splits: int = 1            # > 1: K split over CTAs, float32 partials summed afterwards
  grid_minor_dim: str = "n"    # snake order over output tiles
  grid_tile_width: int = 4

  def __post_init__(self):
    if self.tile_n not in (16, 32, 64, 128):
      raise ValueError(f"{self.tile_n=} must be one of 16, 32, 64, 128 (divide 128)")
    if self.wg_dimension not in ("m", "n"):
      raise ValueError(f"{self.wg_dimension=} must be 'm' or 'n'")
    if self.grid_minor_dim not in ("m", "n"):
      raise ValueError(f"{self.grid_minor_dim=} must be 'm' or 'n'")
    if self.k_splits < 1 or self.max_concurrent_steps < 2:
      raise ValueError(f"{self.k_splits=} must be >= 1 and {self.max_concurrent_steps=} >= 2")

  @property
  def cta_m(self) -> int:
    return WG_M * (2 if self.wg_dimension == "m" else 1)

  @property
  def cta_n(self) -> int:
    return self.tile_n * (2 if self.wg_dimension == "n" else 1)


def default_config(m: int, n: int, k: int, num_sms: int = 132) -> TuningConfig:
  """Large M: 128×128 CTA tiles. Small M (decode): 64-row CTAs with narrow N tiles, and split-K
  when there are too few tiles to give every SM a share of the weight."""
  kb = k // BLOCK
  if m > WG_M:
    # 4 stages beat 5 and 6 on all six DeepSeek shapes at M = 4096 on H100 (docs/benchmarks.md);
    # 128×64 tiles (fewer partial waves for N = 2112) were slower everywhere.
    return TuningConfig(tile_n=128, wg_dimension="m", max_concurrent_steps=4)
  tile_n = 64 if n >= 64 * num_sms else 32
  tiles = math.ceil(n / (2 * tile_n))
  splits = 1
  while tiles * splits * 2 <= num_sms and kb % (splits * 2) == 0 and kb // (splits * 2) >= 4:
    splits *= 2
  return TuningConfig(tile_n=tile_n, wg_dimension="n", max_concurrent_steps=8, k_splits=splits)


def _transforms(dtype, minor: int):
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _kernel(a_gmem, b_gmem, sat_gmem, sb_gmem, out_gmem, *, m: int, n: int, k: int,
            n_blocks: int, batched: bool, b_rowwise: bool, config: TuningConfig):
  cta_m, cta_n, tile_n = config.cta_m, config.cta_n, config.tile_n
  m_iters, n_iters = pl.cdiv(m, cta_m), pl.cdiv(n, cta_n)
  k_steps = k // BLOCK // config.k_splits           # K slabs per CTA
  split_k = config.k_splits > 1
  groups = a_gmem.shape[0] if batched else 1
  ab_transforms = _transforms(a_gmem.dtype, BLOCK)
  # Per-row B scales (sb_gmem is sB transposed, [(E,) K/128, N']) travel with the slab like
  # sA's; block scales ([(E,) ceil(N/128), K/128]) are one scalar per tile and slab.
  sb_specs = [plgpu.BlockSpec((None, cta_n), lambda kk: (kk, 0))] if b_rowwise else []

  def get_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_steps,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_m, BLOCK), lambda kk: (0, kk), transforms=ab_transforms),
            plgpu.BlockSpec((cta_n, BLOCK), lambda kk: (0, kk), transforms=ab_transforms),
            plgpu.BlockSpec((None, cta_m), lambda kk: (kk, 0)),
            *sb_specs,
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=config.max_concurrent_steps,
        compute_context=compute_context,
    )

  ignore = lambda *_, **__: None
  out_dtype = out_gmem.dtype
  first = (lambda ref: ref.at[0]) if batched else (lambda ref: ref)
  streamed = [a_gmem, b_gmem, sat_gmem] + ([sb_gmem] if b_rowwise else [])

  @functools.partial(
      pl.run_scoped,
      allocs=get_pipeline(ignore, ignore).get_allocations(*map(first, streamed)),
      out_smem=plgpu.SMEM((2, WG_M, tile_n), out_dtype),
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = lax.axis_index("wg")

    # Batched: the group is the slowest index, so a group's tiles run together (its A and B
    # stay in L2) and the snake order applies within the group.
    @plgpu.nd_loop((groups * m_iters * n_iters * config.k_splits,), collective_axes="sm")
    def _tile_loop(info: plgpu.NDLoopInfo):
      (lin,) = info.index
      split = lax.rem(lin, config.k_splits)
      tile = lax.div(lin, config.k_splits)
      if batched:
        g = lax.div(tile, m_iters * n_iters)
        tile = lax.rem(tile, m_iters * n_iters)
        in_group = lambda ref: ref.at[g]
      else:
        in_group = lambda ref: ref
      m_idx, n_idx = plgpu.planar_snake(
          tile, (m_iters, n_iters),
          0 if config.grid_minor_dim == "m" else 1, config.grid_tile_width)
      m0, n0 = m_idx * cta_m, n_idx * cta_n
      if config.wg_dimension == "m":
        wg_m, wg_n = pl.ds(wg * WG_M, WG_M), slice(None)
        out_m0, out_n0 = m0 + wg * WG_M, n0
      else:
        wg_m, wg_n = slice(None), pl.ds(wg * tile_n, tile_n)
        out_m0, out_n0 = m0, n0 + wg * tile_n
      nb = jnp.minimum(lax.div(out_n0, BLOCK), n_blocks - 1)
      kb0 = split * k_steps

      def compute_context(eval_pipeline):
        acc = eval_pipeline(plgpu.layout_cast(jnp.zeros((WG_M, tile_n), jnp.float32),
                                              plgpu.Layout.WGMMA))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # the last tile's store has read
        out_smem[wg] = acc.astype(out_dtype)
        plgpu.commit_smem()
        dst = in_group(out_gmem.at[split] if split_k else out_gmem)
        plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                dst.at[pl.ds(out_m0, WG_M), pl.ds(out_n0, tile_n)])

      def mma_body(idxs, a_smem, b_smem, sa_smem, *sb_smem_and_acc):
        (kk,) = idxs
        *sb_smem, acc = sb_smem_and_acc

        def slab(acc_ref):
          plgpu.wgmma(acc_ref, a_smem.at[wg_m], b_smem.at[wg_n].transpose((1, 0)))
          return acc_ref[...]

        part = pl.run_scoped(slab, plgpu.ACC((WG_M, tile_n), jnp.float32))
        sa = plgpu.load(sa_smem.at[wg_m], layout=plgpu.Layout.WGMMA.reduce(1))
        if b_rowwise:
          # one scale per output column: broadcast along the accumulator's rows
          sb = plgpu.load(sb_smem[0].at[wg_n], layout=plgpu.Layout.WGMMA.reduce(0))
          return acc + (part * lax.broadcast_in_dim(sa, part.shape, [0])
                        * lax.broadcast_in_dim(sb, part.shape, [1]))
        sb = sb_gmem[g, nb, kb0 + kk] if batched else sb_gmem[nb, kb0 + kk]
        return acc + part * lax.broadcast_in_dim(sa * sb, part.shape, [0])

      k_slice = pl.ds(kb0 * BLOCK, k_steps * BLOCK)
      sb_views = ([in_group(sb_gmem).at[pl.ds(kb0, k_steps), pl.ds(n0, cta_n)]]
                  if b_rowwise else [])
      get_pipeline(mma_body, compute_context)(
          in_group(a_gmem).at[pl.ds(m0, cta_m), k_slice],
          in_group(b_gmem).at[pl.ds(n0, cta_n), k_slice],
          in_group(sat_gmem).at[pl.ds(kb0, k_steps), pl.ds(m0, cta_m)],
          *sb_views,
          allocations=allocs,
      )

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def num_sms() -> int:
  dev = jax.devices()[0]
  return getattr(dev, "core_count", 0) if dev.platform == "gpu" else 4


def _launch(a, sa_t, b, sb, *, b_rowwise: bool, out_dtype, config: TuningConfig | None,
            interpret: bool) -> jax.Array:
  """The kernel on validated operands, with or without a leading group axis (a.ndim == 3).

  a [(E,) M, K]; sa_t [(E,) K/128, M'] (M' >= M, M' % 4 == 0); b [(E,) N, K]; sb: block scales
  [(E,) ceil(N/128), K/128], or with b_rowwise per-row scales transposed [(E,) K/128, N']
  (N' >= N, N' % 4 == 0). Returns [(E,) M, N] in out_dtype.
  """
  batched = a.ndim == 3
  *lead, m, k = a.shape
  n = b.shape[-2]
  kb = k // BLOCK
  if n % 8:
    raise ValueError(f"{n=} must be a multiple of 8 (16-byte TMA rows of the bf16 output)")
  for name, s in (("sa_t", sa_t),) + ((("sb_t", sb),) if b_rowwise else ()):
    if s.shape[-1] % 4:
      raise ValueError(f"{name}: {s.shape=}: the last axis must be padded to a multiple of 4")
  sms = num_sms()
  groups = lead[0] if batched else 1
  if config is None:
    config = (wgrad_config(m, n, k, sms, groups=groups) if b_rowwise
              else default_config(m, n, k, sms))
    if batched and not b_rowwise:
      config = dataclasses.replace(config, k_splits=1)   # the groups' tiles fill the chip
  if kb % config.k_splits:
    raise ValueError(f"{config.k_splits=} must divide the {kb} K slabs")
  if m == 0 or n == 0 or groups == 0:
    return jnp.zeros((*lead, m, n), out_dtype)
  # Swizzled TMA transfers view global memory in (8, 64)-element tiles (8 × 128 bytes for A
  # and B), so M (when over 8) is padded to a multiple of 8 and the output's N to one of 64;
  # the pad rows read zeros and the pad columns are sliced off. Released shapes need neither.
  mp = m if m <= 8 or m % 8 == 0 else m + (-m % 8)
  np_ = n + (-n % 64)
  if mp != m:
    a = jnp.pad(a, [(0, 0)] * len(lead) + [(0, mp - m), (0, 0)])
  split_k = config.k_splits > 1
  acc_dtype = jnp.float32 if split_k else out_dtype
  # Shared memory: the stage ring plus one output tile per compute warpgroup (227 KiB on H100).
  stage_bytes = (config.cta_m + config.cta_n) * BLOCK + config.cta_m * 4
  stage_bytes += config.cta_n * 4 if b_rowwise else 0
  out_bytes = 2 * WG_M * config.tile_n * jnp.dtype(acc_dtype).itemsize
  stages = min(config.max_concurrent_steps, (SMEM_BYTES - out_bytes) // stage_bytes)
  config = dataclasses.replace(config, max_concurrent_steps=stages)
  out_shape = (*([config.k_splits] if split_k else []), *lead, mp, np_)
  out = plgpu.kernel(
      functools.partial(_kernel, m=mp, n=np_, k=k, n_blocks=0 if b_rowwise else sb.shape[-2],
                        batched=batched, b_rowwise=b_rowwise, config=config),
      out_type=jax.ShapeDtypeStruct(out_shape, acc_dtype),
      grid=(sms,),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(a, b, sa_t, sb)
  if split_k:
    out = out.sum(0).astype(out_dtype)
  return out[..., :m, :n] if (mp, np_) != (m, n) else out


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8_gemm_mosaic_t(a: jax.Array, sa_t: jax.Array, b: jax.Array, sb: jax.Array, *,
                      out_dtype=jnp.bfloat16, config: TuningConfig | None = None,
                      interpret: bool = False) -> jax.Array:
  """fp8_gemm_mosaic with the activation scales already transposed.

  Args:
    a: [M, K] e4m3; sa_t: [K/128, M'] float32 with M' >= M, M' % 4 == 0 (TMA row alignment),
      sa_t[kb, m] = sA[m, kb]; b: [N, K] e4m3; sb: [ceil(N/128), K/128] float32.
  Returns:
    [M, N] in out_dtype.
  """
  check_operands(a, sa_t[:, :a.shape[0]].T, b, sb)
  return _launch(a, sa_t, b, sb, b_rowwise=False, out_dtype=out_dtype, config=config,
                 interpret=interpret)


def transpose_scales(sa: jax.Array) -> jax.Array:
  """[..., M, K/128] → [..., K/128, M'] with M' = M rounded up to a multiple of 4."""
  m = sa.shape[-2]
  return jnp.pad(jnp.swapaxes(sa, -1, -2), [(0, 0)] * (sa.ndim - 1) + [(0, -m % 4)])


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8_gemm_mosaic(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, *,
                    out_dtype=jnp.bfloat16, config: TuningConfig | None = None,
                    interpret: bool = False) -> jax.Array:
  """C = A · Bᵀ with DeepSeek's block scales, on Hopper (sm90a).

  Args:
    a: [M, K] e4m3 activations (K a multiple of 128); sa: [M, K/128] float32 scales.
    b: [N, K] e4m3 weight (N a multiple of 8); sb: [ceil(N/128), K/128] float32.
  Returns:
    [M, N] in out_dtype.
  """
  check_operands(a, sa, b, sb)
  return fp8_gemm_mosaic_t(a, transpose_scales(sa), b, sb, out_dtype=out_dtype, config=config,
                           interpret=interpret)


def _check_batched(a, sa, b, sb, *, rowwise: bool) -> None:
  """Equal leading group axes, then each group's operands as the 2-D kernels check them."""
  for name, x in (("a", a), ("sa", sa), ("b", b), ("sb", sb)):
    if x.ndim != 3 or x.shape[0] != a.shape[0]:
      raise ValueError(f"{name}: {x.shape=}: expected 3 axes, the first the {a.shape[0]} groups "
                       f"of a.shape={a.shape}")
  one = lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  if rowwise:
    check_rowwise_operands(*map(one, (a, sa, b, sb)))
  else:
    check_operands(*map(one, (a, sa, b, sb)))


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8_gemm_mosaic_batched(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, *,
                            out_dtype=jnp.bfloat16, config: TuningConfig | None = None,
                            interpret: bool = False) -> jax.Array:
  """C[e] = A[e] · B[e]ᵀ with block scales for E equal groups (capacity-bucketed experts).

  Args:
    a: [E, M, K] e4m3; sa: [E, M, K/128] float32; b: [E, N, K] e4m3 (N a multiple of 8);
      sb: [E, ceil(N/128), K/128] float32.
  Returns:
    [E, M, N] in out_dtype.
  """
  _check_batched(a, sa, b, sb, rowwise=False)
  return _launch(a, transpose_scales(sa), b, sb, b_rowwise=False, out_dtype=out_dtype,
                 config=config, interpret=interpret)


def check_rowwise_operands(a, sa, b, sb) -> tuple[int, int, int]:
  """Validates 2-D operands with per-row scales on both sides; returns M, K, N."""
  for name, x in (("a", a), ("b", b)):
    if x.ndim != 2 or x.dtype != FP8:
      raise ValueError(f"{name}: {x.shape=} {x.dtype=}: expected 2-D float8_e4m3fn, K last")
  (m, k), (n, kb_) = a.shape, b.shape
  if k % BLOCK or kb_ != k:
    raise ValueError(f"{a.shape=} {b.shape=}: the K axes must agree and be a multiple of {BLOCK}")
  for name, s, rows in (("sa", sa, m), ("sb", sb, n)):
    if s.shape != (rows, k // BLOCK) or s.dtype != jnp.float32:
      raise ValueError(f"{name}.shape={s.shape} {name}.dtype={s.dtype}: expected float32 "
                       f"{(rows, k // BLOCK)}")
  return m, k, n


def wgrad_config(m: int, n: int, k: int, num_sms: int = 132, *, groups: int = 1) -> TuningConfig:
  """Weight gradients: K is the token count (long) and M × N the weight (few tiles), so K is
  split over CTAs while that fills the SMs' waves markedly better (>= 10 points), keeping at
  least 8 slabs per CTA."""
  tiles = groups * math.ceil(m / (2 * WG_M)) * math.ceil(n / 128)
  fill = lambda work: work / (math.ceil(work / num_sms) * num_sms)
  kb, splits = k // BLOCK, 1
  for s in (2, 4, 8, 16):
    if kb % s or kb // s < 8:
      break
    if fill(tiles * s) > fill(tiles * splits) + 0.1:
      splits = s
  return TuningConfig(tile_n=128, wg_dimension="m", max_concurrent_steps=4, k_splits=splits)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8_rowwise_gemm_mosaic(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, *,
                            out_dtype=jnp.float32, config: TuningConfig | None = None,
                            interpret: bool = False) -> jax.Array:
  """C = Σ_kb (A_kb · B_kbᵀ) · sA[m, kb] · sB[n, kb]: per-row scales on both operands (Wgrad).

  The weight gradient dW = dyᵀ · x contracts over tokens, so both operands are quantized along
  tokens (128×1 tiles) and laid out token-minor: A = dyᵀ [N_out, T], B = xᵀ [K_in, T].

  Args:
    a: [(E,) M, K] e4m3 (K a multiple of 128); sa: [(E,) M, K/128] float32.
    b: [(E,) N, K] e4m3 (N a multiple of 8); sb: [(E,) N, K/128] float32.
  Returns:
    [(E,) M, N] in out_dtype (float32 by default: it feeds float32 master weights).
  """
  if a.ndim == 3:
    _check_batched(a, sa, b, sb, rowwise=True)
  else:
    check_rowwise_operands(a, sa, b, sb)
  return _launch(a, transpose_scales(sa), b, transpose_scales(sb), b_rowwise=True,
                 out_dtype=out_dtype, config=config, interpret=interpret)


def fp8_gemm_mosaic_reference(a, sa, b, sb, *, out_dtype=jnp.bfloat16) -> jax.Array:
  """Pure-jnp fp8_gemm_mosaic: the same function as the Triton kernel's reference."""
  return fp8_gemm_reference(a, sa, b, sb, out_dtype=out_dtype)


def fp8_gemm_mosaic_batched_reference(a, sa, b, sb, *, out_dtype=jnp.bfloat16) -> jax.Array:
  """Pure-jnp fp8_gemm_mosaic_batched: each group's product of the dequantized operands."""
  c = jnp.einsum("emk,enk->emn", dequantize_activations(a, sa), dequantize_weight(b, sb),
                 precision=jax.lax.Precision.HIGHEST)
  return c.astype(out_dtype)


def fp8_rowwise_gemm_reference(a, sa, b, sb, *, out_dtype=jnp.float32) -> jax.Array:
  """Pure-jnp fp8_rowwise_gemm_mosaic: the product of the dequantized operands (both scales are
  constant over a K slab, so Σ_kb of the scaled slabs equals it up to summation order)."""
  c = jnp.einsum("...mk,...nk->...mn", dequantize_activations(a, sa),
                 dequantize_activations(b, sb), precision=jax.lax.Precision.HIGHEST)
  return c.astype(out_dtype)

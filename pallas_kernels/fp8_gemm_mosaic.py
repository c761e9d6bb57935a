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

from pallas_kernels.fp8_gemm_triton import BLOCK, check_operands, fp8_gemm_reference

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
            n_blocks: int, config: TuningConfig):
  cta_m, cta_n, tile_n = config.cta_m, config.cta_n, config.tile_n
  m_iters, n_iters = pl.cdiv(m, cta_m), pl.cdiv(n, cta_n)
  k_steps = k // BLOCK // config.k_splits           # K slabs per CTA
  split_k = config.k_splits > 1
  ab_transforms = _transforms(a_gmem.dtype, BLOCK)

  def get_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_steps,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_m, BLOCK), lambda kk: (0, kk), transforms=ab_transforms),
            plgpu.BlockSpec((cta_n, BLOCK), lambda kk: (0, kk), transforms=ab_transforms),
            plgpu.BlockSpec((None, cta_m), lambda kk: (kk, 0)),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=config.max_concurrent_steps,
        compute_context=compute_context,
    )

  ignore = lambda *_, **__: None
  out_dtype = out_gmem.dtype

  @functools.partial(
      pl.run_scoped,
      allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, sat_gmem),
      out_smem=plgpu.SMEM((2, WG_M, tile_n), out_dtype),
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_iters * n_iters * config.k_splits,), collective_axes="sm")
    def _tile_loop(info: plgpu.NDLoopInfo):
      (lin,) = info.index
      split = lax.rem(lin, config.k_splits)
      m_idx, n_idx = plgpu.planar_snake(
          lax.div(lin, config.k_splits), (m_iters, n_iters),
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
        dst = out_gmem.at[split] if split_k else out_gmem
        plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                dst.at[pl.ds(out_m0, WG_M), pl.ds(out_n0, tile_n)])

      def mma_body(idxs, a_smem, b_smem, sa_smem, acc):
        (kk,) = idxs

        def slab(acc_ref):
          plgpu.wgmma(acc_ref, a_smem.at[wg_m], b_smem.at[wg_n].transpose((1, 0)))
          return acc_ref[...]

        part = pl.run_scoped(slab, plgpu.ACC((WG_M, tile_n), jnp.float32))
        sa = plgpu.load(sa_smem.at[wg_m], layout=plgpu.Layout.WGMMA.reduce(1))
        scale = sa * sb_gmem[nb, kb0 + kk]
        return acc + part * lax.broadcast_in_dim(scale, part.shape, [0])

      k_slice = pl.ds(kb0 * BLOCK, k_steps * BLOCK)
      get_pipeline(mma_body, compute_context)(
          a_gmem.at[pl.ds(m0, cta_m), k_slice],
          b_gmem.at[pl.ds(n0, cta_n), k_slice],
          sat_gmem.at[pl.ds(kb0, k_steps), pl.ds(m0, cta_m)],
          allocations=allocs,
      )

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def num_sms() -> int:
  dev = jax.devices()[0]
  return getattr(dev, "core_count", 0) if dev.platform == "gpu" else 4


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
  m, k = a.shape
  n = b.shape[0]
  kb = k // BLOCK
  check_operands(a, sa_t[:, :m].T, b, sb)
  if sa_t.shape[1] % 4:
    raise ValueError(f"{sa_t.shape=}: the M axis must be padded to a multiple of 4")
  if n % 8:
    raise ValueError(f"{n=} must be a multiple of 8 (16-byte TMA rows of the bf16 output)")
  sms = num_sms()
  config = config or default_config(m, n, k, sms)
  if kb % config.k_splits:
    raise ValueError(f"{config.k_splits=} must divide the {kb} K slabs")
  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype)
  # Swizzled TMA transfers view global memory in (8, 64)-element tiles (8 × 128 bytes for A
  # and B), so M (when over 8) is padded to a multiple of 8 and the output's N to one of 64;
  # the pad rows read zeros and the pad columns are sliced off. Released shapes need neither.
  mp = m if m <= 8 or m % 8 == 0 else m + (-m % 8)
  np_ = n + (-n % 64)
  if mp != m:
    a = jnp.pad(a, ((0, mp - m), (0, 0)))
  split_k = config.k_splits > 1
  acc_dtype = jnp.float32 if split_k else out_dtype
  # Shared memory: the stage ring plus one output tile per compute warpgroup (227 KiB on H100).
  stage_bytes = (config.cta_m + config.cta_n) * BLOCK + config.cta_m * 4
  out_bytes = 2 * WG_M * config.tile_n * jnp.dtype(acc_dtype).itemsize
  stages = min(config.max_concurrent_steps, (SMEM_BYTES - out_bytes) // stage_bytes)
  config = dataclasses.replace(config, max_concurrent_steps=stages)
  out_shape = (config.k_splits, mp, np_) if split_k else (mp, np_)
  out = plgpu.kernel(
      functools.partial(_kernel, m=mp, n=np_, k=k, n_blocks=sb.shape[0], config=config),
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
  return out[:m, :n] if (mp, np_) != (m, n) else out


def transpose_scales(sa: jax.Array) -> jax.Array:
  """[M, K/128] → [K/128, M'] with M' = M rounded up to a multiple of 4."""
  m = sa.shape[0]
  return jnp.pad(sa.T, ((0, 0), (0, -m % 4)))


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


def fp8_gemm_mosaic_reference(a, sa, b, sb, *, out_dtype=jnp.bfloat16) -> jax.Array:
  """Pure-jnp fp8_gemm_mosaic: the same function as the Triton kernel's reference."""
  return fp8_gemm_reference(a, sa, b, sb, out_dtype=out_dtype)

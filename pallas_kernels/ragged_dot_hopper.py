"""bf16 grouped (ragged) matmul for Hopper, differentiable: y[i] = x[i] · w[g(i)]ᵀ.

x [M, K] holds rows sorted by group (group g owns group_sizes[g] consecutive rows); w [E, N, K]
is in the checkpoint layout (one [out, in] matrix per expert). XLA:GPU runs
`jax.lax.ragged_dot_general` 8–33× slower than these kernels forward, 16–57× forward +
backward (H100, docs/benchmarks.md), so on Hopper the three products of a training step go
through JAX's own Mosaic GPU kernels (`jax.experimental.pallas.ops.gpu`), composed here under a
`jax.custom_vjp`:

  forward   y  = x · w[g]ᵀ     ragged_dot(x, w, transpose_rhs=True)     [M, N]
  dx        dx = dy · w[g]     ragged_dot(dy, w, transpose_rhs=False)   [M, K]  (w as [E, K', N'])
  dw        dw[g] = dy_gᵀ·x_g  transposed_ragged_dot(dy, x)            [E, N, K]

All three accumulate in float32 and return the operands' dtype. The kernels' constraints, and
what this wrapper does about them:
  * both operands the same 16-bit float dtype (bf16 or f16) — else the XLA fallback;
  * K and N multiples of the tiles (128 with the defaults: the forward tiles N by block_n and
    steps K by block_k; dx swaps the two roles; dw tiles N by its block_m and K by its block_n)
    — else the XLA fallback (`supported`);
  * M: tiles of block_m rows are read with TMA; M is zero-padded to a multiple of block_m here
    (the padding is outside every group) so no tile hangs past the array;
  * rows outside every group (Σ group_sizes < M, e.g. expert-parallel padding) are never written
    by the kernels; the wrapper zeroes them in y and dx, as ragged_dot does;
  * one persistent CTA per SM (132 on H100/H200 SXM), Hopper (sm90) only: callers choose this
    path only on a resolved Mosaic backend (moe.grouped_matmul).

The forward kernel finds each tile's group with a loop over E that is unrolled at trace time
(E scalar steps per tile).
`Kernels` makes the two kernel entry points injectable, so that the custom VJP's wiring is
tested on the CPU against `jax.lax.ragged_dot` with reference kernels (the Mosaic kernels
compile only for a GPU).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

_DIMS = jax.lax.RaggedDotDimensionNumbers(  # x [M, K] · w [E, N, K] over K
    dot_dimension_numbers=(((1,), (2,)), ((), ())),
    lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
_DIMS_NT = jax.lax.RaggedDotDimensionNumbers(  # dy [M, N] · w [E, N, K] over N → [M, K]
    dot_dimension_numbers=(((1,), (1,)), ((), ())),
    lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
_DIMS_T = jax.lax.RaggedDotDimensionNumbers(  # dy [M, N], x [M, K] over the ragged M → [E, N, K]
    dot_dimension_numbers=(((0,), (0,)), ((), ())),
    lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  """Tiles of one kernel launch (the arguments of JAX's ragged_dot_mgpu kernels).

  block_m × block_n output tiles, block_k-deep pipeline steps, max_concurrent_steps stages in
  shared memory, grid_block_n: width of the snake order over output tiles (L2 reuse).
  """

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 1

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      if getattr(self, name) % 64:
        raise ValueError(f"{name}={getattr(self, name)} must be a multiple of 64 (wgmma tiles)")
    if self.max_concurrent_steps < 1 or self.grid_block_n < 1:
      raise ValueError(f"{self.max_concurrent_steps=} and {self.grid_block_n=} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Configs:
  """One TuningConfig per product: forward (y), dx, and dw (the transposed kernel, whose block_m
  tiles N, block_n tiles K and block_k steps over the group's rows)."""

  # H100, 65,536 rows over 32 experts ([512, 2048] and [2048, 512] weights): snake order over 4
  # N tiles made y 1.3-1.7x and dx 1.3-1.7x faster than grid_block_n=1; 6 stages for dw
  # (docs/benchmarks.md, benchmarks/results/grouped_matmul_h100_run1.txt).
  fwd: TuningConfig = TuningConfig(grid_block_n=4)
  dx: TuningConfig = TuningConfig(grid_block_n=4)
  dw: TuningConfig = TuningConfig(max_concurrent_steps=6, grid_block_n=4)

  @property
  def row_tile(self) -> int:
    """M is padded to a multiple of this."""
    return max(self.fwd.block_m, self.dx.block_m, self.dw.block_k)


# ---- the kernels (Mosaic GPU) and their references -----------------------------------------------
def mosaic_ragged(lhs, rhs, group_sizes, *, transpose_rhs: bool, config: TuningConfig):
  """lhs [M, Kc] · rhs[g] → [M, Nc] in lhs.dtype; rhs [G, Nc, Kc] if transpose_rhs else
  [G, Kc, Nc]. Rows outside every group are left unwritten."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # GPU-only dependency: lazy
  return ragged_dot_mgpu.ragged_dot(
      lhs, rhs, group_sizes=group_sizes, block_m=config.block_m, block_n=config.block_n,
      block_k=config.block_k, max_concurrent_steps=config.max_concurrent_steps,
      grid_block_n=config.grid_block_n, transpose_rhs=transpose_rhs)


def mosaic_transposed(lhs, rhs, group_sizes, *, config: TuningConfig):
  """Per group g: lhs_gᵀ · rhs_g with lhs [M, P], rhs [M, Q] → [G, P, Q] in lhs.dtype (zeros
  for an empty group)."""
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as t
  return t.transposed_ragged_dot(
      lhs, rhs, group_sizes=group_sizes, block_m=config.block_m, block_n=config.block_n,
      block_k=config.block_k, max_concurrent_steps=config.max_concurrent_steps,
      grid_block_n=config.grid_block_n)


def ragged_reference(lhs, rhs, group_sizes, *, transpose_rhs: bool, config=None):
  """`mosaic_ragged` in plain JAX (float32 accumulation, rows outside every group → 0)."""
  del config
  dims = _DIMS if transpose_rhs else _DIMS_NT
  return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims,
                                    preferred_element_type=jnp.float32).astype(lhs.dtype)


def transposed_reference(lhs, rhs, group_sizes, *, config=None):
  """`mosaic_transposed` in plain JAX."""
  del config
  return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, _DIMS_T,
                                    preferred_element_type=jnp.float32).astype(lhs.dtype)


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The two kernel entry points the custom VJP composes (signatures of mosaic_ragged and
  mosaic_transposed). Tests substitute references; the model always uses MOSAIC."""

  ragged: Callable = mosaic_ragged
  transposed: Callable = mosaic_transposed


MOSAIC = Kernels()


# ---- the differentiable grouped matmul -----------------------------------------------------------
def supported(x: jax.Array, w: jax.Array, configs: Configs = Configs()) -> bool:
  """Whether the kernels take x [M, K] and w [E, N, K] with these tiles (else ragged_dot_hopper
  falls back to XLA). Forward and both gradients are checked: a forward may be differentiated."""
  if not (x.ndim == 2 and w.ndim == 3 and x.shape[0] > 0 and x.shape[1] == w.shape[2]
          and x.dtype in (jnp.bfloat16, jnp.float16)):
    return False
  n, k = w.shape[1:]
  f, dx, dw = configs.fwd, configs.dx, configs.dw
  return (k % f.block_k == 0 and n % f.block_n == 0        # y:  N tiled by block_n, K stepped
          and n % dx.block_k == 0 and k % dx.block_n == 0  # dx: the roles of N and K swap
          and n % dw.block_m == 0 and k % dw.block_n == 0)  # dw: [E, N, K] output tiles


def ragged_dot_hopper(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                      configs: Configs = Configs(), kernels: Kernels | None = None) -> jax.Array:
  """y[i] = x[i] · w[g(i)]ᵀ on the Mosaic kernels, differentiable in x and w.

  Args:
    x: [M, K] bf16 (or f16) rows sorted by group; group g owns group_sizes[g] consecutive rows.
    w: [E, N, K] per-group weights (cast to x.dtype).
    group_sizes: [E] integers, Σ ≤ M; rows past the last group give zeros.
    configs: the tiles of the three kernels.
    kernels: the kernel entry points (default MOSAIC; tests pass references).
  Returns:
    [M, N] in x.dtype (float32 accumulation). Falls back to jax.lax.ragged_dot_general where
    `supported` is False.
  """
  w = w.astype(x.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  if not supported(x, w, configs):
    return jax.lax.ragged_dot_general(x, w, group_sizes, _DIMS,
                                      preferred_element_type=jnp.float32).astype(x.dtype)
  m = x.shape[0]
  pad = -m % configs.row_tile
  if pad:  # the padded rows belong to no group: zero in y, and their dx is dropped by the slice
    x = jnp.pad(x, ((0, pad), (0, 0)))
  y = _ragged_dot(x, w, group_sizes, configs, kernels or MOSAIC)
  return y[:m] if pad else y


def _zero_ungrouped(y, group_sizes):
  """Rows past Σ group_sizes are never written by the kernels: make them 0."""
  inside = jnp.arange(y.shape[0], dtype=jnp.int32)[:, None] < jnp.sum(group_sizes)
  return jnp.where(inside, y, jnp.zeros((), y.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ragged_dot(x, w, group_sizes, configs: Configs, kernels: Kernels):
  return _zero_ungrouped(kernels.ragged(x, w, group_sizes, transpose_rhs=True,
                                        config=configs.fwd), group_sizes)


def _fwd(x, w, group_sizes, configs, kernels):
  return _ragged_dot(x, w, group_sizes, configs, kernels), (x, w, group_sizes)


def _bwd(configs, kernels, res, dy):
  x, w, group_sizes = res
  dy = dy.astype(x.dtype)
  dx = _zero_ungrouped(kernels.ragged(dy, w, group_sizes, transpose_rhs=False,
                                      config=configs.dx), group_sizes)
  dw = kernels.transposed(dy, x, group_sizes, config=configs.dw)
  return dx, dw.astype(w.dtype), None


_ragged_dot.defvjp(_fwd, _bwd)

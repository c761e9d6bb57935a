"""Absorbed MLA attention of a few decoding queries over the compressed cache (Pallas, Triton
lowering): o_lat = softmax(scale · [q_lat; q_pe] · kvᵀ, slots ≤ position) · c_kv.

At decode time each query row attends over its row of the cache, kv [S, C + R] (the normalised
latent c_kv ‖ the roped shared key k_pe, one array: dsv3_jax.cache.LayerCache). In XLA that is
the layer's slice of the stacked cache, two GEMM fusions, a softmax and a slice of the output,
over every slot of the cache (a deviceless H100 compile of a V2-Lite decode step counts 5
kernels); here it is one launch plus the combine (2 small fusions), and the kernel reads the
layer of the stacked [L, B, S, C + R] cache in place (the layer index is an operand), only the
slots up to each query's position. Opt-in (H100, V2-Lite: faster at batch 8, slower at bf16 batch 1;
docs/benchmarks.md, decode round 5).

Flash-decoding: the grid is (query rows B·T, head blocks, key splits); each program streams its
split's slots in blocks of `block_s` keys through an online softmax (tensor-core products of the
program's `block_h` heads against each key block) and writes an unnormalised partial output
with its running max and sum (`Partials`), which XLA combines afterwards (`mla_decode`).
Splitting the keys keeps many SMs streaming at batch 1, where a program per query would read a
whole layer's cache through one SM.

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

NEG_INF = -1e30   # finite: masked slots and empty splits stay NaN-free


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  block_h: int = 16       # heads per program (the M of its tensor-core products: >= 16 on GPUs)
  block_s: int = 32       # keys per loop step
  split_len: int = 64     # keys per program (a multiple of block_s)
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    # Triton's 16-bit tensor-core products need every dimension >= 16: with block_s = 8 the
    # value product (K = block_s) of bf16 operands came out doubled on an H100 (float32 was
    # right), so both tiles are powers of two from 16 on, whatever the dtype
    for name in ("block_h", "block_s"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of two >= 16")
    if self.split_len % self.block_s:
      raise ValueError(f"{self.split_len=} must be a positive multiple of {self.block_s=}")


def default_config(rows: int, heads: int, slots: int, num_sms: int = 132) -> TuningConfig:
  """16 heads and 32 keys per step; 64 keys per program, more (doubling) only while the grid
  would exceed two programs per SM. Not tuned on a GPU yet."""
  split = 64
  while rows * math.ceil(heads / 16) * math.ceil(slots / split) > 2 * num_sms and split < slots:
    split *= 2
  return TuningConfig(split_len=split)


def _kernel(idx_ref, pos_ref, q_ref, kv_ref, *out_refs, t: int, heads: int, rank: int,
            slots: int, scale: float, config: TuningConfig):
  bt, hb, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  layer, b, pos = idx_ref[0], bt // t, pos_ref[bt]
  bh, bs = config.block_h, config.block_s
  rope = q_ref.shape[-1] - rank
  h0 = hb * bh
  head_ok = (h0 + jax.lax.broadcasted_iota(jnp.int32, (bh,), 0)) < heads
  hs = pl.ds(h0, bh)
  q_c = plgpu.load(q_ref.at[bt, hs, pl.ds(0, rank)], mask=head_ok[:, None], other=0.0)
  q_r = plgpu.load(q_ref.at[bt, hs, pl.ds(rank, rope)], mask=head_ok[:, None], other=0.0)
  precision = jax.lax.Precision.HIGHEST if q_c.dtype == jnp.float32 else None
  dot_t = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                                           preferred_element_type=jnp.float32)   # a · bᵀ
  lo = j * config.split_len
  hi = jnp.minimum(jnp.minimum(lo + config.split_len, pos + 1), slots)   # slots <= pos visible

  def body(i, carry):
    acc, m, den = carry
    s0 = lo + i * bs
    ok = (s0 + jax.lax.broadcasted_iota(jnp.int32, (bs,), 0)) < hi
    keys = pl.ds(s0, bs)
    c = plgpu.load(kv_ref.at[layer, b, keys, pl.ds(0, rank)], mask=ok[:, None], other=0.0)
    r = plgpu.load(kv_ref.at[layer, b, keys, pl.ds(rank, rope)], mask=ok[:, None], other=0.0)
    s = jnp.where(ok[None, :], (dot_t(q_c, c) + dot_t(q_r, r)) * scale, NEG_INF)  # [bh, bs]
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    pv = jax.lax.dot_general(p.astype(c.dtype), c, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_new, den * alpha + p.sum(axis=1)

  init = (jnp.zeros((bh, rank), jnp.float32), jnp.full((bh,), NEG_INF, jnp.float32),
          jnp.zeros((bh,), jnp.float32))
  acc, m, den = jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(hi - lo, 0), bs), body, init)
  o_ref, m_ref, den_ref = out_refs
  plgpu.store(o_ref.at[j, bt, hs, :], acc, mask=head_ok[:, None])
  plgpu.store(m_ref.at[j, bt, hs], m, mask=head_ok)
  plgpu.store(den_ref.at[j, bt, hs], den, mask=head_ok)


def check_operands(q, kv, positions, layer, rank):
  """Validates the operands; returns (B, T, N, S)."""
  if q.ndim != 4 or positions.shape != q.shape[:2]:
    raise ValueError(f"{q.shape=}, {positions.shape=}: expected q [B, T, N, C + R] and "
                     "positions [B, T]")
  if kv.ndim not in (3, 4) or kv.shape[-1] != q.shape[-1] or kv.shape[-3] != q.shape[0]:
    raise ValueError(f"{kv.shape=} must be [B, S, C + R] or [L, B, S, C + R] with B, C + R of "
                     f"q {q.shape}")
  if kv.ndim == 4 and layer is None:
    raise ValueError(f"a stacked cache {kv.shape} needs the layer index")
  if not 0 < rank < q.shape[-1]:
    raise ValueError(f"{rank=} (C) must split the last axis {q.shape[-1]} into C and R > 0")
  return (*q.shape[:3], kv.shape[-2])


@dataclasses.dataclass(frozen=True)
class Partials:
  """Unnormalised split outputs of mla_decode_partials: acc [S, M, N, C] float32 (Σ e^{s - m}·v
  over a split's slots), m [S, M, N] its running max, den [S, M, N] its Σ e^{s - m}; M = B·T."""

  acc: jax.Array
  m: jax.Array
  den: jax.Array

  def combine(self, out_dtype) -> jax.Array:
    """o_lat [M, N, C] = Σ_s e^{m_s - m*}·acc_s / Σ_s e^{m_s - m*}·den_s (zeros where no slot)."""
    w = jnp.exp(self.m - self.m.max(axis=0))                         # [S, M, N]
    o = (w[..., None] * self.acc).sum(0) / jnp.maximum((w * self.den).sum(0), 1e-30)[..., None]
    return o.astype(out_dtype)


jax.tree_util.register_dataclass(Partials, data_fields=["acc", "m", "den"], meta_fields=[])


@functools.partial(jax.jit, static_argnames=("rank", "scale", "config", "interpret"))
def mla_decode_partials(q: jax.Array, kv: jax.Array, positions: jax.Array,
                        layer: jax.Array | int | None = None, *, rank: int, scale: float,
                        config: TuningConfig | None = None, interpret: bool = False) -> Partials:
  """The kernel: per key split, the unnormalised attention output of every query and head.

  Args:
    q: [B, T, N, C + R] queries [q_lat; q_pe] (q_nope absorbed into the latent, q_pe roped).
    kv: [B, S, C + R] cache rows (c_kv ‖ k_pe), or a stack [L, B, S, C + R] read in place at
      `layer` (a scalar, not checked on the device).
    positions: [B, T] int; query (b, t) attends to the slots 0..positions[b, t] of row b.
    rank: C, the width of c_kv (the values: o_lat is p · c_kv).
    scale: softmax scale of the scores.
    config: tiles and key splits (default: `default_config` for these sizes).
  Returns:
    Partials over ceil(S / config.split_len) splits, rows M = B·T in (b, t) order.
  """
  b, t, n, s = check_operands(q, kv, positions, layer, rank)
  if kv.ndim == 3:
    kv, layer = kv[None], 0
  if config is None:
    config = default_config(b * t, n, s, getattr(jax.devices()[0], "core_count", 0) or 132)
  bh = config.block_h          # heads past N are masked (not shrunk: M >= 16 on tensor cores)
  splits = math.ceil(s / config.split_len)
  rows, d = b * t, q.shape[-1]
  idx = jnp.asarray(layer, jnp.int32).reshape(1)
  pos = positions.reshape(rows).astype(jnp.int32)
  f32 = jnp.float32
  acc, m, den = pl.pallas_call(
      functools.partial(_kernel, t=t, heads=n, rank=rank, slots=s, scale=scale, config=config),
      out_shape=(jax.ShapeDtypeStruct((splits, rows, n, rank), f32),
                 jax.ShapeDtypeStruct((splits, rows, n), f32),
                 jax.ShapeDtypeStruct((splits, rows, n), f32)),
      grid=(rows, pl.cdiv(n, bh), splits),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="mla_decode",
  )(idx, pos, q.reshape(rows, n, d), kv)
  return Partials(acc, m, den)


def mla_decode(q, kv, positions, layer=None, *, rank: int, scale: float, out_dtype=None,
               config: TuningConfig | None = None, interpret: bool = False) -> jax.Array:
  """Absorbed MLA attention over the cache (arguments as mla_decode_partials): the kernel, then
  the split outputs combined by XLA. Returns o_lat [B, T, N, C] in out_dtype (default q.dtype);
  a query that sees no slot gives zeros."""
  b, t, n, _ = q.shape
  parts = mla_decode_partials(q, kv, positions, layer, rank=rank, scale=scale, config=config,
                              interpret=interpret)
  return parts.combine(out_dtype or q.dtype).reshape(b, t, n, rank)


def mla_decode_reference(q, kv, positions, layer=None, *, rank: int, scale: float,
                         out_dtype=None) -> jax.Array:
  """Pure jnp, float32: the masked softmax over all slots, then p · c_kv."""
  check_operands(q, kv, positions, layer, rank)
  if kv.ndim == 4:
    kv = kv[layer]
  hi = jax.lax.Precision.HIGHEST
  f32 = jnp.float32
  scores = jnp.einsum("btnd,bsd->btns", q.astype(f32), kv.astype(f32), precision=hi) * scale
  visible = jnp.arange(kv.shape[1])[None, None, None, :] <= positions[:, :, None, None]
  p = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
  o = jnp.einsum("btns,bsc->btnc", p, kv[..., :rank].astype(f32), precision=hi)
  return o.astype(out_dtype or q.dtype)

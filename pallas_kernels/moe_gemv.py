"""Expert-indexed GEMV for MoE decoding (Pallas, Triton lowering): y[r] = W[ids[r]] · x[r].

At decode time an MoE layer sees a handful of (token, expert) rows. Each program reads one
block_n × D band of its row's expert weight straight from HBM (the expert id is loaded inside the
kernel), so only the chosen experts are read, once, and nothing is gathered into a copy first.
Weights are bf16/fp16/fp32, or e4m3 with DeepSeek's 128×128 block scales (dequantized in
registers; the activation stays in high precision). Runs on any CUDA GPU, and on the CPU with
interpret=True.

With one token there are only a handful of rows, so the reduction over D can also be split over
`k_splits` programs (float32 partials summed afterwards) to put enough loads in flight to stream
the weights at HBM speed.

`moe_swiglu_gemv` runs a few tokens' whole SwiGLU experts in two launches on the same tiles; the
model uses it (`moe.Experts.takes_gemv`) with the whole stacked weight of a scanned layer group
and the layer's index folded into the expert ids: a slice of the scanned stack would be copied by
XLA (all experts of the layer) before the custom call (measured: 22.9 ms per V2-Lite decode step
instead of 3.4; docs/benchmarks.md, decode section).
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  block_n: int = 32    # output columns per program (divides 128, so one scale block per tile);
                       # 32 was fastest at one V2-Lite token on an H100 (docs/benchmarks.md)
  block_k: int = 128   # reduction slab (one scale block)
  num_warps: int = 4
  num_stages: int = 4
  k_splits: int = 1    # programs sharing one row's reduction over D (float32 partials summed)

  def __post_init__(self):
    if self.block_n not in (16, 32, 64, 128):
      raise ValueError(f"{self.block_n=} must be one of 16, 32, 64, 128")
    if self.block_k != BLOCK:
      raise ValueError(f"{self.block_k=} must be {BLOCK}")
    if self.k_splits < 1:
      raise ValueError(f"{self.k_splits=} must be >= 1")


def default_config(rows: int, n: int, d: int, num_sms: int = 132) -> TuningConfig:
  """64-column programs; with few rows, the reduction is split until every SM has about four
  programs (the loads in flight one program per SM cannot cover HBM latency with)."""
  block_n = 64
  programs = rows * math.ceil(n / block_n)
  splits = 1
  while programs * splits * 2 <= 4 * num_sms and splits * 2 <= d // BLOCK:
    splits *= 2
  return TuningConfig(block_n=block_n, k_splits=splits)


def _band(ids_ref, n: int, config: TuningConfig):
  """This program's row r, the row's expert, its first column n0 and the in-range column mask
  (grid: rows × column bands × K splits)."""
  r, n0 = pl.program_id(0), pl.program_id(1) * config.block_n
  col_ok = n0 + jax.lax.broadcasted_iota(jnp.int32, (config.block_n,), 0) < n
  return r, ids_ref[r], n0, col_ok


def _reduce_slabs(width: int, config: TuningConfig, body, init):
  """fori_loop over this program's 128-wide slabs of the reduction: split s of S takes slabs
  [s·kbs/S, (s+1)·kbs/S). body(kb, ks, acc) gets the slab index and its slice."""
  split, kbs, parts = pl.program_id(2), width // BLOCK, config.k_splits
  step = lambda kb, acc: body(kb, pl.ds(pl.multiple_of(kb * BLOCK, BLOCK), BLOCK), acc)
  return jax.lax.fori_loop(split * kbs // parts, (split + 1) * kbs // parts, step, init)


def _weight_tile(w_ref, s_ref, e, n0, col_ok, kb, ks):
  """Expert e's [block_n, 128] weight tile in float32, dequantized when s_ref is given."""
  w = plgpu.load(w_ref.at[e, pl.ds(n0, col_ok.shape[0]), ks], mask=col_ok[:, None], other=0.0)
  w = w.astype(jnp.float32)
  return w * s_ref[e, n0 // BLOCK, kb] if s_ref is not None else w


def _kernel(ids_ref, x_ref, w_ref, *rest, n: int, d: int, config: TuningConfig, scaled: bool):
  s_ref, o_ref = rest if scaled else (None, rest[0])
  r, e, n0, col_ok = _band(ids_ref, n, config)

  def body(kb, ks, acc):
    x = x_ref[r, ks].astype(jnp.float32)                                         # [bk]
    return acc + _weight_tile(w_ref, s_ref, e, n0, col_ok, kb, ks) * x[None, :]

  acc = _reduce_slabs(d, config, body, jnp.zeros((config.block_n, BLOCK), jnp.float32))
  cols = pl.ds(n0, config.block_n)
  dst = o_ref.at[pl.program_id(2), r, cols] if config.k_splits > 1 else o_ref.at[r, cols]
  plgpu.store(dst, acc.sum(axis=1).astype(o_ref.dtype), mask=col_ok)


def check_weight(w, scale, width: str = "k") -> None:
  """A [..., N, K] weight for the GEMV kernels: K whole 128-wide slabs; e4m3 exactly when its
  float32 block scales [..., ceil(N/128), K/128] are given. `width`: K's name in messages."""
  n, k = w.shape[-2:]
  if k % BLOCK:
    raise ValueError(f"{width}={k} (the reduction width) must be a multiple of {BLOCK}")
  if scale is not None:
    want = (*w.shape[:-2], math.ceil(n / BLOCK), k // BLOCK)
    if w.dtype != jnp.float8_e4m3fn or scale.shape != want or scale.dtype != jnp.float32:
      raise ValueError(f"{w.dtype=}, {scale.shape=} {scale.dtype=}: FP8 weights need float32 "
                       f"block scales {want}")
  elif w.dtype == jnp.float8_e4m3fn:
    raise ValueError("e4m3 weights need their weight_scale_inv block scales")


def check_operands(x, ids, w, scale):
  if x.ndim != 2 or ids.shape != x.shape[:1] or ids.dtype != jnp.int32:
    raise ValueError(f"{x.shape=}, {ids.shape=} {ids.dtype=}: expected x [R, D] and int32 ids [R]")
  if w.ndim != 3 or w.shape[2] != x.shape[1]:
    raise ValueError(f"{w.shape=} must be [E, N, D] with D = x.shape[1] = {x.shape[1]}")
  check_weight(w, scale, "d")
  return w.shape


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def moe_gemv(x: jax.Array, ids: jax.Array, w: jax.Array, scale: jax.Array | None = None, *,
             out_dtype=None, config: TuningConfig | None = None,
             interpret: bool = False) -> jax.Array:
  """y[r] = W[ids[r]] · x[r].

  Args:
    x: [R, D] activations, one row per (token, expert) pair.
    ids: [R] int32 expert of each row (must be in [0, E); not checked on the device).
    w: [E, N, D] expert weights; e4m3 when `scale` [E, ceil(N/128), D/128] float32 is given.
    config: tiles and K splits (default: `default_config` for these sizes).
  Returns:
    [R, N] in out_dtype (default x.dtype), float32 accumulation.
  """
  _, n, d = check_operands(x, ids, w, scale)
  out_dtype = out_dtype or x.dtype
  scaled = scale is not None
  r = x.shape[0]
  if config is None:
    dev = jax.devices()[0]
    config = default_config(r, n, d, getattr(dev, "core_count", 0) or 132)
  splits = min(config.k_splits, d // BLOCK)
  config = dataclasses.replace(config, k_splits=splits)
  out_shape = (splits, r, n) if splits > 1 else (r, n)
  y = pl.pallas_call(
      functools.partial(_kernel, n=n, d=d, config=config, scaled=scaled),
      out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32 if splits > 1 else out_dtype),
      grid=(r, pl.cdiv(n, config.block_n), splits),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="moe_gemv",
  )(ids, x, w, *([scale] if scaled else []))
  return y.sum(0).astype(out_dtype) if splits > 1 else y


def _gate_up_kernel(ids_ref, x_ref, wg_ref, wu_ref, *rest, n: int, d: int, k: int,
                    config: TuningConfig, scaled: bool):
  """Row r = (token r // k, its expert ids[r]): partial gate and up sums of one column band."""
  sg_ref, su_ref, og_ref, ou_ref = rest if scaled else (None, None, *rest)
  r, e, n0, col_ok = _band(ids_ref, n, config)

  def body(kb, ks, accs):
    x = x_ref[r // k, ks].astype(jnp.float32)[None, :]
    return (accs[0] + _weight_tile(wg_ref, sg_ref, e, n0, col_ok, kb, ks) * x,
            accs[1] + _weight_tile(wu_ref, su_ref, e, n0, col_ok, kb, ks) * x)

  zero = jnp.zeros((config.block_n, BLOCK), jnp.float32)
  g, u = _reduce_slabs(d, config, body, (zero, zero))
  cols = pl.ds(n0, config.block_n)
  plgpu.store(og_ref.at[pl.program_id(2), r, cols], g.sum(axis=1), mask=col_ok)
  plgpu.store(ou_ref.at[pl.program_id(2), r, cols], u.sum(axis=1), mask=col_ok)


def _down_kernel(ids_ref, g_ref, u_ref, w_ref, *rest, n: int, f: int, parts: int, h_dtype,
                 config: TuningConfig, scaled: bool):
  """y[r] partial = W_down[ids[r]] · h[r], where h = silu(Σ gate partials) · (Σ up partials) is
  formed slab by slab from kernel A's partials and rounded to h_dtype (as the sorted path's
  activations are)."""
  s_ref, o_ref = rest if scaled else (None, rest[0])
  r, e, n0, col_ok = _band(ids_ref, n, config)

  def body(kb, ks, acc):
    g = sum(g_ref[jnp.int32(s), r, ks] for s in range(parts))
    u = sum(u_ref[jnp.int32(s), r, ks] for s in range(parts))
    h = (g / (1.0 + jnp.exp(-g)) * u).astype(h_dtype).astype(jnp.float32)
    return acc + _weight_tile(w_ref, s_ref, e, n0, col_ok, kb, ks) * h[None, :]

  acc = _reduce_slabs(f, config, body, jnp.zeros((config.block_n, BLOCK), jnp.float32))
  plgpu.store(o_ref.at[pl.program_id(2), r, pl.ds(n0, config.block_n)], acc.sum(axis=1),
              mask=col_ok)


@functools.partial(jax.jit, static_argnames=("k", "h_dtype", "configs", "interpret"))
def moe_swiglu_gemv(x: jax.Array, ids: jax.Array, gate: jax.Array, up: jax.Array,
                    down: jax.Array, scales: tuple | None = None, *, k: int, h_dtype=None,
                    configs: tuple[TuningConfig, TuningConfig] | None = None,
                    interpret: bool = False) -> jax.Array:
  """The routed SwiGLU experts of few tokens in two kernel launches, reading only the chosen
  experts' weights: y[r] = W_down[e] · (silu(W_gate[e] · x[t]) ⊙ (W_up[e] · x[t])) for the row
  r = (t, slot) = (r // k, r % k) with e = ids[r].

  Kernel A writes float32 partial gate and up sums (its reduction over D split over programs);
  kernel B sums them slab by slab, applies silu ⊙ and rounds to h_dtype before W_down. The
  float32 partials of B's own split reduction are summed by the caller's XLA fusion.

  Args:
    x: [M, D] tokens; ids: [M·k] int32 experts, row-major over (token, slot).
    gate, up: [E, F, D]; down: [E, D, F]; e4m3 when `scales` = their three float32 block scales
      (weight_scale_inv) is given. D and F multiples of 128.
    h_dtype: rounding of the hidden activation (default x.dtype).
  Returns:
    [S, M·k, D] float32 partial outputs (sum over the first axis).
  """
  m, d = x.shape
  e, f, _ = gate.shape
  scaled = scales is not None
  for w, s in zip((gate, up, down), scales or (None,) * 3):
    check_operands(jax.ShapeDtypeStruct((ids.shape[0], w.shape[2]), x.dtype), ids, w, s)
  if up.shape != gate.shape or down.shape != (e, d, f) or ids.shape != (m * k,):
    raise ValueError(f"{gate.shape=} {up.shape=} {down.shape=} {ids.shape=}: expected gate/up "
                     f"[E, F, D], down [E, D, F], ids [M·k] for x {x.shape} and {k=}")
  rows = m * k
  if configs is None:
    sms = getattr(jax.devices()[0], "core_count", 0) or 132
    configs = (default_config(rows, f, d, sms), default_config(rows, d, f, sms))
  ca, cb = (dataclasses.replace(c, k_splits=min(c.k_splits, w // BLOCK))
            for c, w in zip(configs, (d, f)))
  params = lambda c: plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)
  sg, su, sd = scales if scaled else (None, None, None)
  part = jax.ShapeDtypeStruct((ca.k_splits, rows, f), jnp.float32)
  g_parts, u_parts = pl.pallas_call(
      functools.partial(_gate_up_kernel, n=f, d=d, k=k, config=ca, scaled=scaled),
      out_shape=(part, part),
      grid=(rows, pl.cdiv(f, ca.block_n), ca.k_splits),
      compiler_params=params(ca), interpret=interpret, name="moe_gate_up_gemv",
  )(ids, x, gate, up, *((sg, su) if scaled else ()))
  return pl.pallas_call(
      functools.partial(_down_kernel, n=d, f=f, parts=ca.k_splits, h_dtype=h_dtype or x.dtype,
                        config=cb, scaled=scaled),
      out_shape=jax.ShapeDtypeStruct((cb.k_splits, rows, d), jnp.float32),
      grid=(rows, pl.cdiv(d, cb.block_n), cb.k_splits),
      compiler_params=params(cb), interpret=interpret, name="moe_down_gemv",
  )(ids, g_parts, u_parts, down, *((sd,) if scaled else ()))


def moe_gemv_reference(x, ids, w, scale=None, *, out_dtype=None) -> jax.Array:
  """Pure jnp: gather each row's expert weight (dequantized) and contract in float32."""
  check_operands(x, ids, w, scale)
  wf = w.astype(jnp.float32)
  if scale is not None:
    n = w.shape[1]
    wf = wf * jnp.repeat(jnp.repeat(scale, BLOCK, axis=1), BLOCK, axis=2)[:, :n]
  y = jnp.einsum("rd,rnd->rn", x.astype(jnp.float32), wf[ids],
                 precision=jax.lax.Precision.HIGHEST)
  return y.astype(out_dtype or x.dtype)

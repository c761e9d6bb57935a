"""W_UK absorption of decoding queries (Pallas, Triton lowering): q_lat = q_nope · W_UK per head.

Absorbed MLA (SPEC.md) scores a query against the compressed cache through
q_lat[m, n, c] = Σ_h q_nope[m, n, h] · W_UK[n, h, c], where W_UK is the first `nope` rows of each
head's block of kv_b_proj's [N·(H + V), C] weight (PyTorch layout: C, the latent, is the
contiguous axis). For a few decoding rows that is a read of W_UK and little else, but the sum runs
down the weight's columns: XLA:GPU emits it as a column reduction fused with RoPE and the
concatenation [q_lat; q_pe], which ran at about 0.2 TB/s on an H100 (9.9 µs per V2-Lite layer for
2 MB; docs/benchmarks.md, decode round 5 profile).

Here each program owns one head and `block_c` latent columns: it loads the head's [H, block_c]
tile of W_UK (coalesced along C) and the head's query rows, and forms the product (one row:
float32 multiply-adds; more rows: a 16-row tensor-core dot, rows past M masked). It can read one
matrix of a stacked [L, N·(H + V), C] weight in place at a layer index, as the GEMV kernels do
inside the scanned layer stack. e4m3 weights are dequantized to the compute dtype tile by tile,
with their 128×128 block scale (one per tile: H and block_c lie inside one block), which is what
the XLA path computes (`Linear.dense_weight` then the product), so the two agree up to the order
of the float32 sums. Runs on any CUDA GPU, and on the CPU with interpret=True.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 128      # DeepSeek's weight-scale blocks
MAX_ROWS = 16    # query rows per call (B·T): one 16-row tensor-core tile


def supported(heads: int, nope: int, v_dim: int, rank: int, fp8: bool) -> bool:
  """Whether the kernel takes these widths: H and the column tile powers of two from 16 on (the
  tensor cores' minimum), and for e4m3 weights each head's H rows inside one 128-row scale
  block."""
  pow2 = lambda v: v >= 16 and v & (v - 1) == 0
  bc = min(BLOCK, rank)
  if not (pow2(nope) and pow2(bc) and rank % bc == 0):
    return False
  if fp8:
    stride = nope + v_dim
    return nope <= BLOCK and (stride % BLOCK == 0 or BLOCK % stride == 0)
  return True


def _kernel(idx_ref, q_ref, w_ref, *rest, rows: int, nope: int, stride: int, block_c: int,
            dtype):
  s_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
  n, j = pl.program_id(0), pl.program_id(1)
  layer = idx_ref[0]
  r0 = n * stride
  cols = pl.ds(j * block_c, block_c)
  w = w_ref[layer, pl.ds(r0, nope), cols]                                   # [H, block_c]
  if s_ref is not None:
    s = s_ref[layer, r0 // BLOCK, (j * block_c) // BLOCK]
    w = (w.astype(jnp.float32) * s).astype(dtype)
  else:
    w = w.astype(dtype)
  if rows == 1:
    x = q_ref[0, n, :].astype(jnp.float32)                                 # [H]
    y = jnp.sum(x[:, None] * w.astype(jnp.float32), axis=0)[None]           # [1, block_c]
    o_ref[pl.ds(0, 1), n, cols] = y.astype(o_ref.dtype)
  else:
    ok = jax.lax.broadcasted_iota(jnp.int32, (MAX_ROWS,), 0) < rows
    x = plgpu.load(q_ref.at[pl.ds(0, MAX_ROWS), n, :], mask=ok[:, None], other=0.0)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    y = jax.lax.dot_general(x.astype(dtype), w, (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)             # [16, block_c]
    plgpu.store(o_ref.at[pl.ds(0, MAX_ROWS), n, cols], y.astype(o_ref.dtype), mask=ok[:, None])


def check_operands(q, w, scale, index, v_dim):
  """Validates the operands; returns (M, N, H, C)."""
  if q.ndim != 3:
    raise ValueError(f"{q.shape=}: expected q_nope [M, N, H]")
  m, n, h = q.shape
  if not 1 <= m <= MAX_ROWS:
    raise ValueError(f"{m} query rows: the kernel takes 1 to {MAX_ROWS}")
  if w.ndim not in (2, 3) or w.shape[-2] != n * (h + v_dim):
    raise ValueError(f"{w.shape=} must be [N·(H + V), C] or [L, N·(H + V), C] with "
                     f"N·(H + V) = {n}·({h} + {v_dim})")
  if w.ndim == 3 and index is None:
    raise ValueError(f"a stacked weight {w.shape} needs the layer index")
  c = w.shape[-1]
  fp8 = scale is not None
  if fp8 and scale.shape != (*w.shape[:-2], -(-w.shape[-2] // BLOCK), -(-c // BLOCK)):
    raise ValueError(f"{scale.shape=} does not match the 128×128 blocks of {w.shape=}")
  if not supported(n, h, v_dim, c, fp8):
    raise ValueError(f"widths H={h}, V={v_dim}, C={c} (fp8={fp8}) are not ones the kernel "
                     "takes (see mla_absorb.supported)")
  return m, n, h, c


@functools.partial(jax.jit, static_argnames=("v_dim", "interpret"))
def absorb_uk(q_nope: jax.Array, w: jax.Array, scale: jax.Array | None = None,
              index: jax.Array | int | None = None, *, v_dim: int,
              interpret: bool = False) -> jax.Array:
  """q_lat = q_nope · W_UK for each head.

  Args:
    q_nope: [M, N, H] queries' non-rotary part (M = B·T ≤ 16 rows); its dtype is the compute
      dtype (the weight is cast, or dequantized, to it).
    w: kv_b_proj's weight [N·(H + V), C] (head n's W_UK is rows n·(H + V) .. n·(H + V) + H), or
      a stack [L, N·(H + V), C] read in place at `index`; bf16/fp16/fp32 or e4m3.
    scale: e4m3 weights' float32 block scales [(L,) ceil(N·(H+V)/128), ceil(C/128)].
    index: the layer of a stacked weight (a scalar, not checked on the device).
    v_dim: V, the value rows that follow each head's H rows.
  Returns:
    q_lat [M, N, C] in q_nope's dtype (float32 sums, rounded once).
  """
  m, n, h, c = check_operands(q_nope, w, scale, index, v_dim)
  if w.ndim == 2:
    w, scale, index = w[None], None if scale is None else scale[None], 0
  block_c = min(BLOCK, c)
  dtype = q_nope.dtype
  idx = jnp.asarray(index, jnp.int32).reshape(1)
  operands = (idx, q_nope, w) + (() if scale is None else (scale.astype(jnp.float32),))
  return pl.pallas_call(
      functools.partial(_kernel, rows=m, nope=h, stride=h + v_dim, block_c=block_c,
                        dtype=dtype),
      out_shape=jax.ShapeDtypeStruct((m, n, c), dtype),
      grid=(n, c // block_c),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="mla_absorb_uk",
  )(*operands)


def absorb_uk_reference(q_nope, w, scale=None, index=None, *, v_dim: int) -> jax.Array:
  """The XLA path's numerics: the weight dequantized (or cast) to q's dtype, float32 products."""
  if w.ndim == 3:
    w = w[index]
    scale = None if scale is None else scale[index]
  m, n, h = q_nope.shape
  dtype = q_nope.dtype
  if scale is not None:
    s = jnp.repeat(jnp.repeat(scale.astype(jnp.float32), BLOCK, 0), BLOCK, 1)
    w = (w.astype(jnp.float32) * s[:w.shape[0], :w.shape[1]]).astype(dtype)
  w_uk = w.astype(dtype).reshape(n, h + v_dim, -1)[:, :h]
  return jnp.einsum("mnh,nhc->mnc", q_nope.astype(jnp.float32), w_uk.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(dtype)

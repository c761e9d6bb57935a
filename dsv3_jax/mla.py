"""Multi-head Latent Attention (DeepSeek-V2/V3), full and absorbed forms.

Full form (training, prefill): keys and values are expanded per head from the kv latent:
  k = [k_nope; k_pe], k_nope, v = kv_b_proj(c_kv).
Absorbed form (decode over the compressed cache): W_UK folds into the query and W_UV into the
output, so attention runs over the latent c_kv [S, C] and the shared k_pe [S, R] only:
  score = (q_nope · W_UK) · c_kv + q_pe · k_pe,   out = (p · c_kv) · W_UVᵀ.
Both are the same function up to rounding (arXiv 2405.04434 §2.1.2).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.cache import LayerCache
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Linear, RMSNorm, apply_rope, rope_attention_factor, rope_inv_freq
from dsv3_jax.remat import ATTENTION, with_saved_vjp
from pallas_kernels.gemv import gemv_parts
from pallas_kernels.fp8_ops import Fp8Backend
from pallas_kernels import mla_absorb
from pallas_kernels.mla_decode import mla_decode

AttnMode = Literal["full", "absorbed"]
_NEG_INF = -1e30  # finite: a row with no visible key (padding) stays NaN-free


ATTN_IMPLS = (None, "xla", "cudnn", "cudnn_mla")
DECODE_KERNEL_MAX_ROWS = 16   # query rows (B·T) up to which decoding may take the kernel


def default_training_attention() -> str | None:
  """The fastest training attention this machine has: "cudnn_mla" on NVIDIA GPUs of compute
  capability ≥ 9.0 with cuDNN ≥ 9.10 (bench_1b on the H100: 263.4 → 248.3 ms per step against
  "cudnn", docs/benchmarks.md), "cudnn" on other NVIDIA GPUs, None (the einsum form) elsewhere."""
  dev = jax.devices()[0]
  if dev.platform != "gpu" or "cuda" not in dev.client.platform_version.lower():
    return None
  try:
    from jax._src.lib import cuda_versions
    cudnn = cuda_versions.cudnn_get_version() if cuda_versions else 0
    hopper = tuple(int(v) for v in dev.compute_capability.split(".")) >= (9, 0)
  except Exception:  # noqa: BLE001 - an older/newer JAX without these internals
    return "cudnn"
  return "cudnn_mla" if hopper and cudnn >= 91000 else "cudnn"


class MLA(nnx.Module):
  """Attention block. Parameter names follow the checkpoint (`self_attn.*`).

  attn_impl: how the full form (training) attends: None = the einsum/softmax below (any
  positions); "xla" or "cudnn" = jax.nn.dot_product_attention with that implementation (cuDNN:
  fused flash attention on NVIDIA GPUs), causal over slot order, so only for rows whose
  positions are 0..T-1 (training, prefill from 0); "cudnn_mla" = cuDNN's multi-latent-attention
  form of the same kernel, with the value head dim (128) smaller than the query/key one (192)
  instead of zero-padded to it (cuDNN ≥ 9.10 on Hopper or later).

  `decode_kernel` (Transformer.use_attention_kernel; off by default): absorbed attention of at
  most 16 query rows over the cache runs through pallas_kernels.mla_decode, which reads this
  layer's rows of the stacked cache in place and only the slots each query sees (XLA: the
  layer's slice, two GEMMs, a softmax and a slice over every slot; deviceless H100 compile of a
  V2-Lite decode step, benchmarks/decode_kernels.py: the same 27 kernels per MoE layer at
  batch 1, 29 -> 27 at batch 8).

  `absorb_kernel` (Transformer.use_absorb_kernel; generate.Engine turns it on on GPUs): the W_UK
  absorption of at most 16 decoding rows runs through pallas_kernels.mla_absorb, which reads
  kv_b_proj's weight (a scanned stack's whole, at the layer index) in place, instead of XLA's
  column reduction fused with RoPE and the concatenation (9.9 µs per V2-Lite layer on an H100).

  `fuse_input` (Transformer.use_fused_input; off by default): when the block is handed its
  un-normalized input and the RMSNorm before it (`__call__(norm=)`), at most 16 decoding rows
  run that norm and both projections of x — q_proj (or q_a_proj) and kv_a_proj_with_mqa — in
  one launch of pallas_kernels.gemv.gemv_parts, reading both weights in place, instead of a
  norm (two XLA fusions) and two GEMV launches with their split-K sums.
  """

  decode_kernel: bool = False
  absorb_kernel: bool = False
  fuse_input: bool = False

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               fp8: bool = False, fp8_backend: Fp8Backend | None = None,
               attn_impl: str | None = None):
    if attn_impl not in ATTN_IMPLS:
      raise ValueError(f"{attn_impl=} must be one of {ATTN_IMPLS}")
    d, n = cfg.hidden_size, cfg.num_attention_heads
    self.attn_impl = attn_impl
    self.num_heads = n
    self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    self.kv_lora_rank = cfg.kv_lora_rank
    self.scale = cfg.softmax_scale
    self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg))
    self.rope_factor = rope_attention_factor(cfg)
    lin = dict(rngs=rngs, std=cfg.initializer_range, param_dtype=param_dtype, fp8=fp8,
               fp8_backend=fp8_backend)
    qk = cfg.qk_head_dim
    if cfg.q_lora_rank:
      self.q_a_proj = Linear(d, cfg.q_lora_rank, axes=("q_lora", "embed"), **lin)
      self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
      self.q_b_proj = Linear(cfg.q_lora_rank, n * qk, axes=("heads", "q_lora"), **lin)
      self.q_proj = None
    else:
      self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
      self.q_proj = Linear(d, n * qk, axes=("heads", "embed"), **lin)
    self.kv_a_proj_with_mqa = Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                     axes=("kv_lora", "embed"), **lin)
    self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.kv_b_proj = Linear(cfg.kv_lora_rank, n * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                            axes=("heads", "kv_lora"), **lin)
    self.o_proj = Linear(n * cfg.v_head_dim, d, axes=("embed", "heads"), **lin)

  def _rope(self, x, positions):
    return apply_rope(x, positions, self.inv_freq, self.rope_factor)

  def input_projections(self) -> tuple[Linear, Linear]:
    """The two projections of the block's input: (q_proj or q_a_proj, kv_a_proj_with_mqa)."""
    return (self.q_proj if self.q_proj is not None else self.q_a_proj), self.kv_a_proj_with_mqa

  def takes_fused_input(self, rows: int, dtype) -> bool:
    """`fuse_input` on, and both input projections would take the GEMV kernel for these rows
    (`Linear.takes_gemv`, here from one row on for 16-bit weights too, since the norm's
    launches go as well) with one weight dtype and one FP8 scale format."""
    lins = self.input_projections()
    return (self.fuse_input
            and all(lin.takes_gemv(rows, dtype, min_16bit_rows=1) for lin in lins)
            and len({lin.in_place_operands()[0].dtype for lin in lins}) == 1
            and len({lin.fp8_backend.scale_fmt for lin in lins}) == 1)

  def _fused_input(self, x: jax.Array, norm: RMSNorm) -> tuple[jax.Array, jax.Array]:
    """(q_proj or q_a_proj, kv_a_proj_with_mqa) of norm(x) in one gemv_parts launch."""
    lins = self.input_projections()
    operands = [lin.in_place_operands() for lin in lins]
    b, t, d = x.shape
    nw = norm.weight.get_value()           # in a scanned stack: the whole [L, D] (LayerOfStack)
    ys = gemv_parts(x.reshape(b * t, d), [(w, s) for w, s, _ in operands], operands[0][2],
                    norm=getattr(nw, "stack", nw), eps=norm.eps,
                    scale_fmt=lins[0].fp8_backend.scale_fmt,
                    interpret=jax.devices()[0].platform != "gpu")
    return tuple(y.reshape(b, t, -1) for y in ys)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None,
               mode: AttnMode = "full", layer: jax.Array | None = None, *,
               norm: RMSNorm | None = None) -> tuple[jax.Array, LayerCache | None]:
    """Causal self-attention.

    Args:
      x: [B, T, D] activations (un-normalized when `norm` is given).
      norm: the RMSNorm to apply to x first (DecoderLayer's input_layernorm); with
        `takes_fused_input` it runs inside the input projections' kernel.
      positions: [B, T] absolute positions (also the cache slots written).
      cache: the cache or None. When given, the T new tokens' latents are written at their
        positions (slots of other rows and positions are untouched).
      mode: "full" attends among the T tokens themselves (training; a prefill from position 0);
        "absorbed" attends over the whole cache (decode), or over the T tokens if no cache.
      layer: the index of this layer in a stacked cache (None: `cache` is this layer's own).
    Returns:
      ([B, T, D], the updated cache or None).
    """
    b, t, _ = x.shape
    n = self.num_heads
    if norm is not None and self.takes_fused_input(b * t, x.dtype):
      q, kv = self._fused_input(x, norm)            # q_proj or q_a_proj; kv [B, T, C + R]
    else:
      if norm is not None:
        x = norm(x)
      q_in, kv_a = self.input_projections()
      q, kv = q_in(x), kv_a(x)
    if self.q_proj is None:
      q = self.q_b_proj(self.q_a_layernorm(q))
    q = q.reshape(b, t, n, self.nope_dim + self.rope_dim)
    q_nope, q_pe = q[..., :self.nope_dim], self._rope(q[..., self.nope_dim:], positions)

    c_kv = self.kv_a_layernorm(kv[..., :self.kv_lora_rank])
    k_pe = self._rope(kv[..., self.kv_lora_rank:], positions)  # one head, shared by all heads

    if cache is not None:
      cache = cache.write(c_kv, k_pe, positions, layer)
    if mode == "absorbed":
      if cache is not None and self.takes_decode_kernel(b * t, x.dtype):
        attend = functools.partial(self._attend_kernel, cache=cache, positions=positions,
                                   layer=layer)
      elif cache is not None:
        view = cache.layer(layer)
        key_pos = jnp.broadcast_to(jnp.arange(view.max_len, dtype=positions.dtype),
                                   (b, view.max_len))
        attend = functools.partial(self._attend, kv=view.kv.astype(x.dtype), q_pos=positions,
                                   k_pos=key_pos)
      else:
        attend = functools.partial(self._attend, kv=jnp.concatenate([c_kv, k_pe], axis=-1),
                                   q_pos=positions, k_pos=positions)
      out = self._absorbed(q_nope, q_pe, attend)
    elif mode == "full":
      out = self._full(q_nope, q_pe, c_kv, k_pe, positions)
    else:
      raise ValueError(f"{mode=} must be 'full' or 'absorbed'")
    return self.o_proj(out.reshape(b, t, n * self.v_dim)), cache

  def _softmax(self, scores, q_pos, k_pos, dtype):
    """scores: [B, T, N, S] float32; causal mask from positions; returns probabilities in dtype."""
    visible = k_pos[:, None, None, :] <= q_pos[:, :, None, None]  # [B, T, 1, S]
    scores = jnp.where(visible, scores * self.scale, _NEG_INF)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)

  def _full(self, q_nope, q_pe, c_kv, k_pe, positions):
    b, s, _ = c_kv.shape
    kv = self.kv_b_proj(c_kv).reshape(b, s, self.num_heads, self.nope_dim + self.v_dim)
    k_nope, v = kv[..., :self.nope_dim], kv[..., self.nope_dim:]
    if self.attn_impl is not None:
      return self._fused(q_nope, q_pe, k_nope, k_pe, v)
    f32 = jnp.float32
    scores = (jnp.einsum("btnh,bsnh->btns", q_nope, k_nope, preferred_element_type=f32)
              + jnp.einsum("btnr,bsr->btns", q_pe, k_pe, preferred_element_type=f32))
    p = self._softmax(scores, positions, positions, v.dtype)
    return jnp.einsum("btns,bsnv->btnv", p, v, preferred_element_type=f32).astype(v.dtype)

  def _fused(self, q_nope, q_pe, k_nope, k_pe, v):
    """Causal attention through jax.nn.dot_product_attention (shapes as in _full). The shared
    rope key is broadcast to every head and, except for "cudnn_mla", v is zero-padded to the qk
    head dim (the public API wants equal head dims). The sequence is zero-padded at its end to a multiple of 16
    (cuDNN rejects odd lengths in training, e.g. the MTP module's T - 1): causality hides the
    padded keys from every real query. Both paddings are sliced off the output."""
    b, t, n, _ = q_nope.shape
    qk = self.nope_dim + self.rope_dim
    pad_t = -t % 16
    q = jnp.concatenate([q_nope, q_pe], -1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None, :].astype(k_nope.dtype),
                                                  (b, t, n, self.rope_dim))], -1)
    pad = lambda x, d: jnp.pad(x.astype(q.dtype), ((0, 0), (0, pad_t), (0, 0), (0, d)))
    if self.attn_impl == "cudnn_mla":
      # JAX's own cuDNN binding: the public API checks equal head dims, cuDNN does not.
      from jax._src.cudnn.fused_attention_stablehlo import MaskType
      from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attn
      attend = functools.partial(cudnn_attn, scale=self.scale, mask_type=MaskType.CAUSAL)
      v_pad = 0
    else:
      attend = functools.partial(jax.nn.dot_product_attention, scale=self.scale,
                                 is_causal=True, implementation=self.attn_impl)
      v_pad = qk - self.v_dim
    if self.attn_impl != "xla":  # a remat policy can keep its output and softmax statistics
      attend = with_saved_vjp(attend, ATTENTION)
    out = attend(pad(q, 0), pad(k, 0), pad(v, v_pad))
    return out[:, :t, :, :self.v_dim]

  def takes_decode_kernel(self, rows: int, dtype) -> bool:
    """`decode_kernel` on (Transformer.use_attention_kernel), at most 16 query rows (B·T:
    decoding), and widths the kernel's tiles take (C, R powers of two; heads are taken 16 per
    program, those past N masked). Any float dtype: it is opt-in (float32 products run at
    HIGHEST precision, slower than bf16's)."""
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0
    return (self.decode_kernel and rows <= DECODE_KERNEL_MAX_ROWS
            and pow2(self.kv_lora_rank) and pow2(self.rope_dim))

  def takes_absorb_kernel(self, rows: int) -> bool:
    """`absorb_kernel` on, at most 16 query rows (B·T: decoding), widths the kernel takes."""
    fp8 = self.kv_b_proj.weight_scale_inv is not None
    return (self.absorb_kernel and rows <= mla_absorb.MAX_ROWS
            and mla_absorb.supported(self.num_heads, self.nope_dim, self.v_dim,
                                     self.kv_lora_rank, fp8))

  def _absorb_uk_kernel(self, q_nope):
    """q_nope [B, T, N, H] → q_lat [B, T, N, C] through pallas_kernels.mla_absorb."""
    w, scale, index = self.kv_b_proj.in_place_operands()
    b, t, n, h = q_nope.shape
    q_lat = mla_absorb.absorb_uk(q_nope.reshape(b * t, n, h), w, scale, index, v_dim=self.v_dim,
                                 interpret=jax.devices()[0].platform != "gpu")
    return q_lat.reshape(b, t, n, -1)

  def _absorbed(self, q_nope, q_pe, attend):
    """q_nope [B, T, N, H], q_pe [B, T, N, R] roped; attend: [B, T, N, C + R] absorbed queries
    [q_lat; q_pe] → o_lat [B, T, N, C]. Returns [B, T, N, V]."""
    dtype = q_nope.dtype
    w = self.kv_b_proj.dense_weight(dtype).reshape(self.num_heads, self.nope_dim + self.v_dim,
                                                    self.kv_lora_rank)
    w_uk, w_uv = w[:, :self.nope_dim], w[:, self.nope_dim:]  # [N, H, C], [N, V, C]
    f32 = jnp.float32
    b, t, n, h = q_nope.shape
    if self.takes_absorb_kernel(b * t):
      q_lat = self._absorb_uk_kernel(q_nope)
    elif b * t == 1:
      # one row: multiply + reduce over the weight's own layout (a dot lets XLA pick a
      # transposed float32 copy of W_UK and W_UV first: 2 × 4 MB per V2-Lite layer)
      q_lat = (q_nope[0, 0, :, :, None].astype(f32) * w_uk.astype(f32)).sum(1)   # [N, C]
      q_lat = q_lat.astype(dtype)[None, None]
    else:
      # heads-major batched product [N, B·T, H] x [N, H, C] (the btnh,nhc einsum hits an
      # unimplemented bf16 -> f32 dot on XLA:CPU)
      q_lat = jnp.einsum("nmh,nhc->nmc", jnp.moveaxis(q_nope.reshape(b * t, n, h), 1, 0), w_uk,
                         preferred_element_type=f32)
      q_lat = jnp.moveaxis(q_lat, 0, 1).reshape(b, t, n, -1).astype(dtype)
    o_lat = attend(jnp.concatenate([q_lat, q_pe.astype(dtype)], axis=-1))
    if b * t == 1:
      out = (o_lat[0, 0, :, None, :].astype(f32) * w_uv.astype(f32)).sum(-1)      # [N, V]
      return out.astype(dtype)[None, None]
    out = jnp.einsum("nmc,nvc->nmv", jnp.moveaxis(o_lat.reshape(b * t, n, -1), 1, 0), w_uv,
                     preferred_element_type=f32)
    return jnp.moveaxis(out, 0, 1).reshape(b, t, n, -1).astype(dtype)

  def _attend(self, q, *, kv, q_pos, k_pos):
    """XLA: q [B, T, N, C + R], kv [B, S, C + R] → o_lat [B, T, N, C] in q.dtype."""
    # one product over C + R: q_lat · c_kv + q_pe · k_pe
    scores = jnp.einsum("btnc,bsc->btns", q, kv, preferred_element_type=jnp.float32)
    p = self._softmax(scores, q_pos, k_pos, q.dtype)
    # over the whole rows of kv, then sliced: a slice of the keys would be copied first
    o_lat = jnp.einsum("btns,bsc->btnc", p, kv, preferred_element_type=jnp.float32)
    return o_lat[..., :self.kv_lora_rank].astype(q.dtype)

  def _attend_kernel(self, q, *, cache, positions, layer):
    """pallas_kernels.mla_decode: the stacked cache read in place at `layer`."""
    return mla_decode(q, cache.kv, positions, layer, rank=self.kv_lora_rank, scale=self.scale,
                      interpret=jax.devices()[0].platform != "gpu")

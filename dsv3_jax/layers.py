"""Leaf layers: RMSNorm, Linear (bf16/fp32 or FP8 + 128×128 block scales), Embed, YaRN RoPE.

Linear weights keep the checkpoint's [out, in] layout (N×K, as the FP8 GEMM wants them), so a
checkpoint round-trips bit-exactly and FP8 block scales index as scale[n // 128, k // 128].
Every parameter carries logical axis names in its `out_sharding` metadata; `sharding.py` maps
them to mesh axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig, yarn_mscale
from pallas_kernels.fp8_ops import Fp8Backend, fp8_linear
from pallas_kernels.fp8_train_ops import fp8_train_linear
from pallas_kernels.gemv import MAX_ROWS as GEMV_MAX_ROWS
from pallas_kernels.gemv import gemv, rms_norm
from pallas_kernels.weight_dequant import weight_quant_reference

FP8_BLOCK = 128


def param(value, axes: tuple[str | None, ...]) -> nnx.Param:
  """An nnx.Param annotated with logical axis names (sharded later, not at creation)."""
  assert len(axes) == value.ndim, (axes, value.shape)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
  return (math.ceil(out_features / FP8_BLOCK), math.ceil(in_features / FP8_BLOCK))


def lowp_product(fn, a: jax.Array, b: jax.Array, *extra: jax.Array) -> jax.Array:
  """fn(a, b, float32) — a matrix product of low-precision operands with float32 accumulation
  and result — whose backward pass runs in the operands' dtype.

  Differentiating `dot(a, b, preferred_element_type=f32)` directly hands the transposed
  products a float32 cotangent, so XLA runs them as float32 (TF32 on NVIDIA) GEMMs after
  converting both bf16 operands: half the tensor-core rate plus conversion passes (on the H100
  the float32 GEMMs were 32 % of a 1B training step; docs/benchmarks.md). Here the cotangent is
  rounded to the operands' dtype first (exact when it came through a cast to that dtype, as in
  `Linear`) and the transposed products accumulate in float32 and round to that dtype, as the
  forward does.

  Args:
    fn: (a, b, out_dtype, *extra) → the product; linear in a and in b. It must not close over
      traced values: pass them (e.g. group sizes) through `extra` (not differentiated).
    a, b: operands of one dtype; float32 operands take the plain product.
  """
  if a.dtype == jnp.float32 or a.dtype != b.dtype:
    return fn(a, b, jnp.float32, *extra)

  @jax.custom_vjp
  def prod(a, b, *extra):
    return fn(a, b, jnp.float32, *extra)

  def fwd(a, b, *extra):
    return prod(a, b, *extra), (a, b, extra)

  def bwd(res, g):
    a, b, extra = res
    _, pull = jax.vjp(lambda a, b: fn(a, b, a.dtype, *extra), a, b)
    return (*pull(g.astype(a.dtype)), *(None for _ in extra))

  prod.defvjp(fwd, bwd)
  return prod(a, b, *extra)


def dequantize_blocks(w: jax.Array, scale_inv: jax.Array, dtype=jnp.float32) -> jax.Array:
  """W = W_fp8 · scale_inv[n // 128, k // 128] (DeepSeek's `weight_scale_inv` is a multiplier).

  Args:
    w: [..., N, K] e4m3 (or any float) weight.
    scale_inv: [..., ceil(N/128), ceil(K/128)] float32 block scales.
  Returns:
    [..., N, K] in `dtype`, computed in float32.
  """
  *lead, n, k = w.shape
  if scale_inv.shape != (*lead, *scale_shape(n, k)):
    raise ValueError(f"scale shape {scale_inv.shape} does not match weight {w.shape}: "
                     f"expected {(*lead, *scale_shape(n, k))}")
  s = jnp.repeat(jnp.repeat(scale_inv.astype(jnp.float32), FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)
  return (w.astype(jnp.float32) * s[..., :n, :k]).astype(dtype)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x²) + eps) · weight, computed in float32. x: [..., D] → [..., D]."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, axis: str = "norm"):
    self.eps = eps
    self.weight = param(jnp.ones((dim,), param_dtype), (axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps)


class Linear(nnx.Module):
  """y = x · Wᵀ with W [out, in]; bias-free.

  With `fp8=True` the weight is e4m3 with a float32 `weight_scale_inv` [ceil(out/128),
  ceil(in/128)] (DeepSeek's checkpoint layout). `fp8_backend` (resolved once, when the model is
  built; see pallas_kernels.fp8_ops) picks the product: "xla" dequantizes the weight block-wise
  and multiplies; "triton"/"mosaic" quantize the activations per 1×128 tile and run the FP8
  Pallas GEMM. A high-precision weight with a `training` backend runs the FP8 training recipe
  (pallas_kernels.fp8_train_ops: the weight and activations quantized online, forward and
  backward).

  `gemv` (Transformer.use_dense_gemv; GPU decoding): at most 16 rows run through the GEMV kernel
  (pallas_kernels.gemv; e4m3 weights with the activation quantized inside it, as fp8_linear
  does). Inside a scanned stack (`scan_layers`) the weight's value is then a `LayerOfStack` and
  the kernel reads that layer of the whole stack in place.
  """

  gemv: bool = False

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str],
               rngs: nnx.Rngs, std: float = 0.006, param_dtype=jnp.float32, fp8: bool = False,
               fp8_backend: Fp8Backend | None = None):
    self.in_features, self.out_features = in_features, out_features
    self.fp8_backend = fp8_backend or Fp8Backend()
    w = _normal(rngs, (out_features, in_features), std, jnp.float32)
    if fp8:
      q, s = quantize_blocks(w)
      self.weight = param(q, axes)
      self.weight_scale_inv = param(s, axes)
    else:
      self.weight = param(w.astype(param_dtype), axes)
      self.weight_scale_inv = None

  def dense_weight(self, dtype) -> jax.Array:
    """The [out, in] weight in `dtype` (dequantized if FP8)."""
    if self.weight_scale_inv is not None:
      return dequantize_blocks(self.weight[...], self.weight_scale_inv[...], dtype)
    return self.weight[...].astype(dtype)

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
    """x: [..., in] → [..., out] in out_dtype (default x.dtype), float32 accumulation."""
    if self.takes_gemv(math.prod(x.shape[:-1]), x.dtype):
      return self._gemv(x, out_dtype or x.dtype)
    if self.fp8_backend.training and self.weight_scale_inv is None:
      return fp8_train_linear(x, self.weight[...], backend=self.fp8_backend).astype(
          out_dtype or x.dtype)
    # the kernels quantize activations in 1×128 tiles: K must be a multiple of 128 (true of
    # every V3 projection; V2-Lite's 10944-wide dense MLP takes the XLA path)
    if (self.weight_scale_inv is not None and self.fp8_backend.kind != "xla"
        and self.in_features % FP8_BLOCK == 0):
      return fp8_linear(x, self.weight[...], self.weight_scale_inv[...],
                        backend=self.fp8_backend, out_dtype=out_dtype or x.dtype)
    w = self.dense_weight(x.dtype)
    y = lowp_product(lambda a, b, t: jnp.einsum("...k,nk->...n", a, b, preferred_element_type=t),
                     x, w)
    return y.astype(out_dtype or x.dtype)


  def takes_gemv(self, rows: int, x_dtype, *, min_16bit_rows: int = 2) -> bool:
    """`gemv` on, K whole 128-wide slabs, and either an e4m3 weight with ≤ 16 rows, or a weight
    of x's 16-bit dtype (what the XLA path computes in, so the numerics stay) with
    `min_16bit_rows`–16 rows: for one row XLA's fused dot-as-reduction read bf16 weights faster
    (H100: 5.7 against 7.5 µs for V2-Lite's q_proj; docs/benchmarks.md, decode round 4)."""
    if not (self.gemv and rows <= GEMV_MAX_ROWS and self.in_features % FP8_BLOCK == 0):
      return False
    dtype = self.in_place_operands()[0].dtype     # moe.LayerOfStack holds the whole stack
    if self.weight_scale_inv is not None:
      return dtype == jnp.float8_e4m3fn
    return (rows >= min_16bit_rows and dtype == x_dtype
            and dtype in (jnp.bfloat16, jnp.float16))

  def in_place_operands(self) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(weight, scale_inv or None, layer index or None) for a kernel that reads the weight in
    place: inside a scanned stack (moe.LayerOfStack) the whole stacks and the layer index."""
    w = self.weight.get_value()
    scale = None if self.weight_scale_inv is None else self.weight_scale_inv.get_value()
    if not hasattr(w, "stack"):
      return w, scale, None
    return w.stack, None if scale is None else scale.stack, w.index

  def _gemv(self, x: jax.Array, out_dtype) -> jax.Array:
    w, scale, index = self.in_place_operands()
    *lead, k = x.shape
    y = gemv(x.reshape(-1, k), w, scale, index, out_dtype=out_dtype,
             scale_fmt=self.fp8_backend.scale_fmt,
             interpret=jax.devices()[0].platform != "gpu")
    return y.reshape(*lead, self.out_features)


def quantize_blocks(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """128×128 block quantization to e4m3, the layout of DeepSeek's released weights.

  Args:
    w: [..., N, K] float weight.
  Returns:
    (e4m3 [..., N, K], float32 scale_inv [..., ceil(N/128), ceil(K/128)]) with
    scale_inv = amax(block) / 448, so that w ≈ e4m3 · scale_inv
    (pallas_kernels.weight_dequant.weight_quant_reference).
  """
  return weight_quant_reference(w)


class Embed(nnx.Module):
  """Token embedding table [V, D]. tokens [...] int → [..., D]."""

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, std: float = 0.006,
               param_dtype=jnp.float32):
    self.weight = param(_normal(rngs, (vocab, dim), std, param_dtype), ("vocab", "embed"))

  def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.weight[...], tokens, axis=0).astype(dtype)


# ---- RoPE / YaRN --------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [R/2] (float64), YaRN-interpolated when the config has YaRN scaling.

  freq_i = θ^(-2i/R); YaRN blends freq/factor and freq with a ramp between the correction dims
  low = floor(d(beta_fast)) and high = ceil(d(beta_slow)), d(r) = R·ln(L0/(2πr)) / (2 ln θ).
  """
  dim, theta = cfg.qk_rope_head_dim, cfg.rope_theta
  freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  rs = cfg.rope_scaling
  if rs is None:
    return freqs

  def corr_dim(rot):
    return dim * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (
        2 * math.log(theta))

  low = max(math.floor(corr_dim(rs.beta_fast)), 0)
  high = min(math.ceil(corr_dim(rs.beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  return freqs / rs.factor * ramp + freqs * (1.0 - ramp)


def rope_attention_factor(cfg: ModelConfig) -> float:
  """HF's cos/sin multiplier mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for
  every released config)."""
  rs = cfg.rope_scaling
  if rs is None:
    return 1.0
  if rs.mscale and rs.mscale_all_dim:
    return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
  return yarn_mscale(rs.factor, 1.0)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray,
               attention_factor: float = 1.0) -> jax.Array:
  """Rotates ADJACENT pairs (x[2i], x[2i+1]) — the interleaved layout of DeepSeek's checkpoints.

  Args:
    x: [B, T, ..., R] (any number of head axes after T).
    positions: [B, T] integer positions.
  Returns:
    [B, T, ..., R] in x.dtype (rotation computed in float32).
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B,T,R/2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)

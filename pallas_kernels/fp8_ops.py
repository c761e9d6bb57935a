"""FP8 projections on the fastest available path: the backend choice and the two entry points
the model calls (a dense projection and the MoE grouped projection).

Backends: "mosaic" (Hopper wgmma kernels, sm90), "triton" (any CUDA GPU with FP8 tensor cores,
sm89+), "xla" (dequantize the weight, then a bf16/f32 matmul: CPU, TPU, older GPUs). "auto"
picks the first that the default device supports. The choice is made once, when the model is
built (`resolve_backend`), and travels to the layers as an explicit, immutable `Fp8Backend`.
On a non-GPU platform an explicit "triton" or "mosaic" runs the kernels in interpret mode (slow;
for tests on the CPU).

With a kernel backend, activations are quantized online per token per 128 channels (act_quant)
before the GEMM, as DeepSeek's inference does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.act_quant import act_quant
from pallas_kernels.fp8_gemm_mosaic import fp8_gemm_mosaic
from pallas_kernels.fp8_gemm_triton import fp8_gemm_triton
from pallas_kernels.fp8_grouped_gemm_triton import fp8_grouped_gemm_triton

BACKENDS = ("auto", "xla", "triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class Fp8Backend:
  """A resolved backend. kind: "xla" | "triton" | "mosaic"; interpret: run Pallas kernels in
  interpret mode (non-GPU platforms); scale_fmt: activation scale format (None or "ue8m0")."""

  kind: str = "xla"
  interpret: bool = False
  scale_fmt: str | None = None
  training: bool = False  # FP8 training recipe: high-precision weights, every GEMM of forward
                          # and backward on online-quantized e4m3 (pallas_kernels.fp8_train_ops)
  dual_quant: bool = True  # training recipe on a kernel backend: both orientations of each
                           # operand in one Pallas pass (pallas_kernels.dual_quant); False: XLA

  def __str__(self) -> str:
    xla_quant = self.training and self.kind != "xla" and not self.dual_quant
    extra = [x for x in ("interpret" if self.interpret else "", self.scale_fmt or "",
                         "training recipe" if self.training else "",
                         "XLA quantization" if xla_quant else "") if x]
    return self.kind + (f" ({', '.join(extra)})" if extra else "")


def _compute_capability(device) -> tuple[int, int] | None:
  cc = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or not cc:
    return None
  try:
    major, minor = (int(p) for p in str(cc).split(".")[:2])
  except ValueError:
    return None
  return major, minor


def resolve_backend(name: str, *, scale_fmt: str | None = None, device=None,
                    training: bool = False) -> Fp8Backend:
  """Resolves "auto" | "xla" | "triton" | "mosaic" against `device` (default: the first).

  training: the backend of the FP8 training recipe (kept in the result's `training` field).
  """
  if name not in BACKENDS:
    raise ValueError(f"fp8_backend {name=} must be one of {BACKENDS}")
  device = device or jax.devices()[0]
  cc = _compute_capability(device)
  if name == "auto":
    if cc is None or cc < (8, 9):
      name = "xla"
    else:
      name = "mosaic" if cc[0] == 9 else "triton"
  if name == "mosaic" and cc is not None and cc[0] != 9:
    raise ValueError(f"fp8_backend 'mosaic' needs a Hopper GPU (sm90); {device} is sm{cc[0]}{cc[1]}")
  if name == "triton" and cc is not None and cc < (8, 9):
    raise ValueError(f"fp8_backend 'triton' needs FP8 tensor cores (sm89+); {device} is "
                     f"sm{cc[0]}{cc[1]}")
  return Fp8Backend(kind=name, interpret=name != "xla" and cc is None, scale_fmt=scale_fmt,
                    training=training)


def fp8_linear(x: jax.Array, w: jax.Array, scale_inv: jax.Array, *, backend: Fp8Backend,
               out_dtype=None) -> jax.Array:
  """y = x · Wᵀ for an FP8 weight, on a kernel backend.

  Args:
    x: [..., K] activations (K a multiple of 128); w: [N, K] e4m3;
    scale_inv: [ceil(N/128), K/128] float32.
  Returns:
    [..., N] in out_dtype (default x.dtype).
  """
  *lead, k = x.shape
  n = w.shape[0]
  out_dtype = out_dtype or x.dtype
  a, sa = act_quant(x.reshape(-1, k), scale_fmt=backend.scale_fmt, interpret=backend.interpret)
  if backend.kind == "mosaic" and n % 8 == 0:
    y = fp8_gemm_mosaic(a, sa, w, scale_inv, out_dtype=out_dtype, interpret=backend.interpret)
  elif backend.kind in ("mosaic", "triton"):
    y = fp8_gemm_triton(a, sa, w, scale_inv, out_dtype=out_dtype, interpret=backend.interpret)
  else:
    raise ValueError(f"fp8_linear needs a kernel backend, got {backend}")
  return y.reshape(*lead, n)


def fp8_grouped_linear(x: jax.Array, w: jax.Array, scale_inv: jax.Array,
                       group_sizes: jax.Array, *, backend: Fp8Backend,
                       out_dtype=None) -> jax.Array:
  """Row-grouped y[i] = x[i] · W[e(i)]ᵀ for FP8 expert weights (rows sorted by expert).

  Args:
    x: [M, K]; w: [E, N, K] e4m3; scale_inv: [E, ceil(N/128), K/128]; group_sizes: [E].
  Returns:
    [M, N] in out_dtype (default x.dtype).
  """
  if backend.kind not in ("mosaic", "triton"):
    raise ValueError(f"fp8_grouped_linear needs a kernel backend, got {backend}")
  a, sa = act_quant(x, scale_fmt=backend.scale_fmt, interpret=backend.interpret)
  # The Mosaic backend has no grouped kernel yet; its grouped projections run on Triton.
  return fp8_grouped_gemm_triton(a, sa, w, scale_inv, group_sizes.astype(jnp.int32),
                                 out_dtype=out_dtype or x.dtype, interpret=backend.interpret)

"""pallas_kernels.dual_quant (both quantization orientations of the FP8 training recipe in one
pass) against its references, bit for bit: interpret mode on the CPU, compiled on a GPU; and the
training GEMMs through it equal the XLA-quantized ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8_train_ops as F
from pallas_kernels.dual_quant import (dual_quant, dual_quant_blocks, dual_quant_blocks_reference,
                                       dual_quant_reference)
from pallas_kernels.fp8_ops import Fp8Backend

ON_GPU = jax.devices()[0].platform == "gpu"
FLOOR = F.AMAX_FLOOR


def _assert_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def _activation(shape, dtype, seed):
  """Gaussian values over five decades of channel scales, a hot channel and a hot token (which
  only the right orientation isolates) and an all-zero 128×128 tile."""
  x = jax.random.normal(jax.random.key(seed), shape) * jnp.logspace(-3, 2, shape[-1])
  x = x.at[..., 5].mul(1e4).at[..., 100, :].mul(1e3)
  x = x.at[..., :128, 128:256].set(0.0)
  return x.astype(dtype)


@pytest.mark.parametrize("shape,dtype", [((256, 384), jnp.bfloat16), ((3, 128, 256), jnp.float32),
                                         ((384, 256), jnp.float16)])
def test_dual_quant_matches_references(shape, dtype):
  x = _activation(shape, dtype, seed=len(shape))
  got = dual_quant(x, amax_floor=FLOOR, interpret=True)
  _assert_equal(got, dual_quant_reference(x, amax_floor=FLOOR))
  q, s, qt, st = got
  r, c = shape[-2:]
  assert qt.shape == (*shape[:-2], c, r) and st.shape == (*shape[:-2], c, r // 128)
  # orientation, from numpy: s[t, j] over channels 128j.. of token t; st[c, i] over tokens
  # 128i.. of channel c (the hot channel and the hot token make the two differ)
  a = np.abs(np.asarray(x, np.float32))
  rows = np.maximum(a.reshape(*shape[:-1], c // 128, 128).max(-1), FLOOR) / 448
  cols = np.maximum(np.swapaxes(a, -1, -2).reshape(*shape[:-2], c, r // 128, 128).max(-1),
                    FLOOR) / 448
  np.testing.assert_allclose(np.asarray(s), rows, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(st), cols, rtol=1e-6)
  zero = np.asarray(s)[..., :128, 1]
  assert np.isfinite(zero).all() and (zero > 0).all()          # an all-zero tile: finite scale
  assert not np.asarray(q[..., :128, 128:256], np.float32).any()


@pytest.mark.parametrize("shape", [(384, 256), (2, 256, 128)])
def test_dual_quant_blocks_matches_references(shape):
  w = 0.02 * jax.random.normal(jax.random.key(7), shape, jnp.float32)
  w = w.at[..., 128:256, :128].set(0.0).at[..., 3, 200 % shape[-1]].set(5.0)
  got = dual_quant_blocks(w, interpret=True)
  _assert_equal(got, dual_quant_blocks_reference(w))
  q, s, qt, st = got
  np.testing.assert_array_equal(np.asarray(qt, np.float32),
                                np.swapaxes(np.asarray(q, np.float32), -1, -2))
  assert np.isfinite(np.asarray(s)).all() and (np.asarray(s) > 0).all()


def test_dual_quant_rejects_bad_operands():
  with pytest.raises(ValueError, match="multiples of 128"):
    dual_quant(jnp.ones((100, 128)), amax_floor=FLOOR, interpret=True)
  with pytest.raises(ValueError, match="multiples of 128"):
    dual_quant_blocks(jnp.ones((128, 200)), interpret=True)
  with pytest.raises(ValueError, match="x.shape"):
    dual_quant(jnp.ones((2, 2, 128, 128)), amax_floor=FLOOR, interpret=True)
  with pytest.raises(ValueError, match="x.dtype"):
    dual_quant(jnp.ones((128, 128), jnp.int8), amax_floor=FLOOR, interpret=True)


def test_training_gemms_equal_with_either_quantization():
  """fp8_train_ops on a kernel backend (Triton, interpret mode) with the one-pass quantization
  and with XLA's: y, dx and dW bit for bit, dense, grouped (dropless) and bucketed."""
  keys = jax.random.split(jax.random.key(11), 6)
  x = jax.random.normal(keys[0], (256, 384), jnp.bfloat16)
  w = 0.05 * jax.random.normal(keys[1], (256, 384), jnp.float32)
  dy = jax.random.normal(keys[2], (256, 256), jnp.bfloat16)
  we = 0.05 * jax.random.normal(keys[3], (3, 256, 384), jnp.float32)
  sizes = jnp.array([100, 0, 156], jnp.int32)
  cases = {
      "dense": (lambda x, w, be: F.fp8_train_linear(x, w, backend=be), x, w, dy),
      "grouped": (lambda x, w, be: F.fp8_train_grouped(x, w, sizes, backend=be), x, we, dy),
      "batched": (lambda x, w, be: F.fp8_train_batched(x, w, backend=be),
                  x[:255].reshape(3, 85, 384), we, dy[:255].reshape(3, 85, 256)),
  }
  for name, (fn, xs, ws, cot) in cases.items():
    outs = []
    for fused in (True, False):
      be = Fp8Backend("triton", interpret=True, training=True, dual_quant=fused)
      def run(xs, ws, be=be):
        y, pull = jax.vjp(lambda a, b: fn(a, b, be), xs, ws)
        return (y, *pull(cot))
      outs.append(jax.jit(run)(xs, ws))
    for label, a, b in zip(("y", "dx", "dw"), *outs):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                    err_msg=f"{name} {label}")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled kernel)")
def test_dual_quant_compiled_equals_references():
  x = _activation((4096, 2048), jnp.bfloat16, seed=3)
  _assert_equal(dual_quant(x, amax_floor=FLOOR), dual_quant_reference(x, amax_floor=FLOOR))
  xe = _activation((4, 640, 1024), jnp.bfloat16, seed=4)
  _assert_equal(dual_quant(xe, amax_floor=FLOOR), dual_quant_reference(xe, amax_floor=FLOOR))
  w = 0.02 * jax.random.normal(jax.random.key(5), (16, 512, 1024), jnp.float32)
  _assert_equal(dual_quant_blocks(w), dual_quant_blocks_reference(w))

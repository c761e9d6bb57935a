"""pallas_kernels.gemv (Triton lowering, interpret mode on the CPU) against its reference and
against the two-launch FP8 path it replaces at decode time (act_quant + FP8 GEMM)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.layers import quantize_blocks
from pallas_kernels.fp8_ops import Fp8Backend, fp8_linear
from pallas_kernels.gemv import TuningConfig, default_config, gemv, gemv_parts, gemv_reference

ON_GPU = jax.devices()[0].platform == "gpu"


def _operands(m, g, n, k, fp8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (m, k), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(k2, (g, n, k), jnp.float32) * 0.05
  if fp8:
    return (x, *quantize_blocks(w))
  return x, w.astype(jnp.bfloat16), None


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m, g, n, k, block_n, splits, slabs", [
    (1, 1, 200, 256, 32, 1, 1),      # ragged last column band
    (1, 3, 60, 384, 8, 1, 2),        # one row, 8-column programs, ragged
    (1, 2, 64, 640, 64, 2, 2),       # one row, 5 slabs in 2 splits of 2 and 3, 2 per iteration
    (3, 4, 96, 384, 16, 2, 1),       # a stack read at an index; 3 slabs in 2 splits
    (16, 2, 130, 512, 64, 8, 3),     # all 16 rows; 8 splits of 4 slabs are capped at 4
    (5, 3, 256, 768, 32, 1, 4)])     # 6 slabs, 4 per iteration: the second one half empty
def test_matches_reference(m, g, n, k, block_n, splits, slabs, fp8):
  x, w, s = _operands(m, g, n, k, fp8, seed=m + n)
  index = jnp.int32(g - 1)
  got = gemv(x, w, s, index, out_dtype=jnp.float32,
             config=TuningConfig(block_n=block_n, k_splits=splits, slabs=slabs),
             interpret=not ON_GPU)
  want = gemv_reference(x, w, s, index, out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want)).max() > 0.5
  # the matrix at the index, not another one of the stack
  other = gemv_reference(x, w, s, jnp.int32(0), out_dtype=jnp.float32)
  assert g == 1 or np.abs(np.asarray(other) - np.asarray(want)).max() > 0.1


def test_single_matrix_and_ue8m0_scales():
  x, w, s = _operands(2, 1, 64, 256, fp8=True, seed=3)
  got = gemv(x, w[0], s[0], out_dtype=jnp.float32, scale_fmt="ue8m0", interpret=not ON_GPU)
  want = gemv_reference(x, w[0], s[0], out_dtype=jnp.float32, scale_fmt="ue8m0")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  plain = gemv_reference(x, w[0], s[0], out_dtype=jnp.float32)
  assert not np.array_equal(np.asarray(plain), np.asarray(want))   # the scale format matters


@pytest.mark.parametrize("m", [1, 4])
def test_fp8_equals_act_quant_then_fp8_gemm(m):
  """One launch (quantization of x inside the kernel) against the decode path it replaces:
  act_quant, then the Triton FP8 GEMM. Same tiles, same scales; only the float32 summation
  order of the per-slab products differs."""
  x, w, s = _operands(m, 1, 256, 512, fp8=True, seed=m)
  got = gemv(x, w[0], s[0], out_dtype=jnp.float32, interpret=not ON_GPU)
  want = fp8_linear(x, w[0], s[0], backend=Fp8Backend("triton", interpret=not ON_GPU),
                    out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_default_config_splits_narrow_outputs_only():
  assert default_config(1, 576, 2048, num_sms=132).k_splits > 1      # V2-Lite kv_a_proj
  assert default_config(1, 3072, 2048, num_sms=132).k_splits == 8    # q_proj: 768 programs
  assert default_config(8, 3072, 2048, num_sms=132).k_splits == 2    # 192 programs
  assert default_config(1, 102400, 2048, num_sms=132).k_splits == 1  # the output head
  assert default_config(1, 64, 128, num_sms=132).k_splits == 1       # one slab cannot split


def test_bad_operands_are_named():
  x, w, s = _operands(2, 3, 64, 128, fp8=True)
  with pytest.raises(ValueError, match="needs the index"):
    gemv(x, w, s, interpret=True)
  with pytest.raises(ValueError, match="need their weight_scale_inv"):
    gemv(x, w, None, 0, interpret=True)
  with pytest.raises(ValueError, match="1 <= M <= 16"):
    gemv(jnp.zeros((17, 128), jnp.bfloat16), w, s, 0, interpret=True)
  with pytest.raises(ValueError, match="need block_n >= 16"):
    gemv(x, w, s, 0, config=TuningConfig(block_n=8), interpret=True)
  with pytest.raises(ValueError, match="multiple of 128"):
    gemv(jnp.zeros((1, 100), jnp.bfloat16), jnp.zeros((8, 100), jnp.bfloat16), interpret=True)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m, splits, with_norm", [(1, 1, "stacked"), (1, 2, None),
                                                  (3, 2, "flat"), (16, 1, "stacked")])
def test_parts_equal_their_products(m, splits, with_norm, fp8):
  """Several weights in one launch (an attention layer's q and kv_a projections), optionally
  of RMSNorm(x) computed inside (its weight one [K] vector, or a stack [G, K] read at the
  weights' index, as in a scanned layer stack): each output equals its own product. The first
  part's 200 columns leave a partial band, so the second part starts at a padded offset."""
  k, g = 384, 3
  x, w1, s1 = _operands(m, g, 200, k, fp8, seed=m)
  _, w2, s2 = _operands(m, g, 64, k, fp8, seed=m + 1)
  x = x * 3.0 + 0.5                           # a norm that is not ~1 changes the product
  shape = {"flat": (k,), "stacked": (g, k), None: None}[with_norm]
  norm = (1.0 + jax.random.normal(jax.random.key(9), shape)).astype(jnp.bfloat16) if (
      with_norm) else None
  index = jnp.int32(1)
  got = gemv_parts(x, ((w1, s1), (w2, s2)), index, out_dtype=jnp.float32, norm=norm,
                   eps=1e-5, config=TuningConfig(block_n=32, k_splits=splits),
                   interpret=not ON_GPU)
  assert [a.shape for a in got] == [(m, 200), (m, 64)]
  for y, w, s in zip(got, (w1, w2), (s1, s2)):
    want = gemv_reference(x, w, s, index, out_dtype=jnp.float32, norm=norm, eps=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(want)).max() > 0.5
  if with_norm:                               # the norm was applied, not skipped
    plain = gemv_reference(x, w1, s1, index, out_dtype=jnp.float32)
    assert np.abs(np.asarray(plain) - np.asarray(got[0])).max() > 0.1
  if with_norm == "stacked":                  # the norm at the index, not another one
    other = gemv_reference(x, w1, s1, index, out_dtype=jnp.float32, norm=norm[0], eps=1e-5)
    assert np.abs(np.asarray(other) - np.asarray(got[0])).max() > 0.1


def test_norm_prologue_equals_the_rmsnorm_module():
  """gemv(x, norm=) is the product of the model's RMSNorm output (same eps, same rounding)."""
  from dsv3_jax.layers import RMSNorm
  x, w, s = _operands(2, 1, 96, 256, fp8=False, seed=4)
  layer = RMSNorm(256, eps=1e-6, param_dtype=jnp.bfloat16)
  layer.weight[...] = jax.random.uniform(jax.random.key(1), (256,), jnp.float32, 0.5,
                                         2.0).astype(jnp.bfloat16)
  got = gemv(x, w[0], norm=layer.weight[...], eps=1e-6, out_dtype=jnp.float32,
             interpret=not ON_GPU)
  want = gemv_reference(layer(x), w[0], out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_parts_and_norm_are_named():
  x, w, s = _operands(2, 2, 64, 128, fp8=True)
  _, wb, _ = _operands(2, 2, 64, 128, fp8=False)
  with pytest.raises(ValueError, match="share dtype, scaling and stack size"):
    gemv_parts(x, ((w, s), (wb, None)), 0, interpret=True)
  with pytest.raises(ValueError, match="share dtype, scaling and stack size"):
    gemv_parts(x, ((w, s), (w[0], s[0])), 0, interpret=True)
  with pytest.raises(ValueError, match="at least one"):
    gemv_parts(x, (), 0, interpret=True)
  with pytest.raises(ValueError, match=r"RMSNorm weight must be \[K\] = \[128\] or \[G, K\]"):
    gemv(x, w, s, 0, norm=jnp.ones((64,), jnp.bfloat16), interpret=True)
  with pytest.raises(ValueError, match=r"RMSNorm weight must be \[K\]"):
    gemv(x, w, s, 0, norm=jnp.ones((3, 128), jnp.bfloat16), interpret=True)   # G is 2

"""pallas_kernels.moe_gemv (Triton lowering, interpret mode on the CPU) against its reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.layers import quantize_blocks
from pallas_kernels.moe_gemv import TuningConfig, default_config, moe_gemv, moe_gemv_reference

ON_GPU = jax.devices()[0].platform == "gpu"


def _operands(r, e, n, d, fp8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (r, d), jnp.float32).astype(jnp.bfloat16)
  ids = jax.random.randint(k2, (r,), 0, e, jnp.int32)
  w = jax.random.normal(k3, (e, n, d), jnp.float32) * 0.05
  if fp8:
    q, s = quantize_blocks(w)
    return x, ids, q, s
  return x, ids, w.astype(jnp.bfloat16), None


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("r, e, n, d, block_n", [(1, 4, 200, 256, 64), (6, 8, 96, 128, 32),
                                                 (3, 3, 130, 384, 128)])
def test_matches_reference(r, e, n, d, block_n, fp8):
  x, ids, w, s = _operands(r, e, n, d, fp8, seed=r + n)
  got = moe_gemv(x, ids, w, s, out_dtype=jnp.float32, config=TuningConfig(block_n=block_n),
                 interpret=not ON_GPU)
  want = moe_gemv_reference(x, ids, w, s, out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
  assert np.abs(np.asarray(want)).max() > 0.1


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("k_splits", [2, 3, 8])
def test_split_reduction_matches_reference(k_splits, fp8):
  """The reduction over D split over programs (uneven: 3 slabs in 2 splits; more splits than
  slabs are capped) sums to the same rows."""
  x, ids, w, s = _operands(2, 5, 192, 384, fp8, seed=k_splits)
  got = moe_gemv(x, ids, w, s, out_dtype=jnp.float32,
                 config=TuningConfig(block_n=64, k_splits=k_splits), interpret=not ON_GPU)
  want = moe_gemv_reference(x, ids, w, s, out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
  assert np.abs(np.asarray(want)).max() > 0.1


def test_default_config_fills_the_chip_with_few_rows():
  one = default_config(6, 1408, 2048, num_sms=132)     # a V2-Lite token's 6 experts, gate
  assert one.k_splits > 1 and 6 * 22 * one.k_splits <= 4 * 132
  assert default_config(256, 1408, 2048, num_sms=132).k_splits == 1
  assert default_config(1, 64, 128, num_sms=132).k_splits == 1   # one slab cannot split


def test_bad_operands_are_named():
  x, ids, w, s = _operands(2, 3, 64, 128, fp8=True)
  with pytest.raises(ValueError, match="need their weight_scale_inv"):
    moe_gemv(x, ids, w, interpret=True)
  with pytest.raises(ValueError, match="d=100"):
    moe_gemv(x[:, :100], ids, w[..., :100].astype(jnp.bfloat16), interpret=True)
  with pytest.raises(ValueError, match="scale.shape"):
    moe_gemv(x, ids, w, s[:, :, :0], interpret=True)
  with pytest.raises(ValueError, match="int32 ids"):
    moe_gemv(x, ids.astype(jnp.float32), w, s, interpret=True)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m, k, splits", [(1, 3, (4, 2)), (2, 2, (1, 1)), (3, 1, (3, 5))])
def test_swiglu_gemv_matches_reference(m, k, splits, fp8):
  """The two-launch SwiGLU experts (partial sums of gate/up, then down with silu ⊙ formed from
  them) equal gate, up and down applied one by one, with h rounded to bf16 in between."""
  from pallas_kernels.moe_gemv import moe_swiglu_gemv
  e, d, f = 5, 256, 384
  keys = jax.random.split(jax.random.key(m + k), 5)
  x = jax.random.normal(keys[0], (m, d), jnp.float32).astype(jnp.bfloat16)
  ids = jax.random.randint(keys[1], (m * k,), 0, e, jnp.int32)
  ws = [jax.random.normal(kk, shape, jnp.float32) * 0.05
        for kk, shape in zip(keys[2:], [(e, f, d), (e, f, d), (e, d, f)])]
  scales = None
  if fp8:
    qs = [quantize_blocks(w) for w in ws]
    ws, scales = [q for q, _ in qs], tuple(s for _, s in qs)
  else:
    ws = [w.astype(jnp.bfloat16) for w in ws]
  configs = (TuningConfig(block_n=64, k_splits=splits[0]), TuningConfig(block_n=32,
                                                                          k_splits=splits[1]))
  got = moe_swiglu_gemv(x, ids, *ws, scales, k=k, configs=configs, interpret=not ON_GPU).sum(0)
  xr = jnp.repeat(x, k, axis=0)
  sc = scales or (None,) * 3
  g = moe_gemv_reference(xr, ids, ws[0], sc[0], out_dtype=jnp.float32)
  u = moe_gemv_reference(xr, ids, ws[1], sc[1], out_dtype=jnp.float32)
  h = (jax.nn.silu(g) * u).astype(jnp.bfloat16)
  want = moe_gemv_reference(h, ids, ws[2], sc[2], out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
  assert np.abs(np.asarray(want)).max() > 1e-2

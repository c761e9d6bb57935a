"""pallas_kernels.mla_absorb (Triton lowering, interpret mode on the CPU): the W_UK absorption of
decoding queries against the XLA path's numerics, read in place from a layer stack, and inside
generation (greedy output equal to XLA's absorption, bf16 and FP8 weights, plain and MTP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from dsv3_jax.layers import quantize_blocks
from pallas_kernels.mla_absorb import absorb_uk, absorb_uk_reference, supported

ON_GPU = jax.devices()[0].platform == "gpu"


def _operands(m, n, h, v, c, layers, kind, seed):
  kq, kw = jax.random.split(jax.random.key(seed))
  dtype = jnp.float32 if kind == "f32" else jnp.bfloat16
  q = jax.random.normal(kq, (m, n, h), jnp.float32).astype(dtype)
  w = 0.1 * jax.random.normal(kw, (*((layers,) if layers else ()), n * (h + v), c), jnp.float32)
  if kind == "fp8":
    w, s = quantize_blocks(w)
    return q, w, s
  return q, w.astype(dtype), None


@pytest.mark.parametrize("kind", ["bf16", "fp8", "f32"])
@pytest.mark.parametrize("m, n, h, v, c, layers", [
    (1, 4, 16, 16, 16, 0),        # one row (float32 multiply-adds), tiny_v3's widths
    (3, 4, 16, 16, 32, 3),        # a few rows (16-row tensor-core dot, rows past M masked), stack
    (16, 2, 128, 128, 512, 2),    # a full row tile, V3's head widths: 4 column tiles per head
    (1, 2, 128, 128, 512, 0)])
def test_matches_reference(m, n, h, v, c, layers, kind):
  q, w, s = _operands(m, n, h, v, c, layers, kind, seed=m + c)
  index = jnp.int32(layers - 1) if layers else None
  got = absorb_uk(q, w, s, index, v_dim=v, interpret=not ON_GPU)
  want = absorb_uk_reference(q, w, s, index, v_dim=v)
  assert got.shape == (m, n, c) and got.dtype == q.dtype
  # both sum exact products in float32, in different orders, then round once to q's dtype: bf16
  # outputs may differ by one rounding (2^-8 relative), float32 by a few ulp
  tol = 1e-5 if kind == "f32" else 2.0 ** -8
  g, r = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(g, r, rtol=tol, atol=tol * np.abs(r).max())
  assert np.abs(r).max() > 0.1
  # the stacked read takes the indexed layer, not another one
  if layers:
    other = absorb_uk_reference(q, w, s, 0, v_dim=v)
    assert np.abs(np.asarray(other, np.float32) - r).max() > 10 * tol * np.abs(r).max()


def test_supported_widths_and_bad_operands():
  assert supported(16, 128, 128, 512, fp8=True)           # V3 / V2-Lite
  assert supported(4, 16, 16, 16, fp8=True)                # four heads per 128-row scale block
  assert not supported(4, 24, 16, 32, fp8=False)           # H not a power of two
  assert not supported(4, 16, 16, 8, fp8=False)            # C under 16
  assert not supported(4, 16, 32, 32, fp8=True)            # a head's rows cross a scale block
  q, w, s = _operands(2, 4, 16, 16, 32, 2, "fp8", seed=0)
  with pytest.raises(ValueError, match="needs the layer index"):
    absorb_uk(q, w, s, v_dim=16, interpret=True)
  with pytest.raises(ValueError, match="N·"):
    absorb_uk(q, w, s, 0, v_dim=8, interpret=True)
  with pytest.raises(ValueError, match="scale"):
    absorb_uk(q, w, s[:1], 0, v_dim=16, interpret=True)
  with pytest.raises(ValueError, match="rows"):
    absorb_uk(jnp.zeros((17, 4, 16), jnp.bfloat16), w, s, 0, v_dim=16, interpret=True)


def _model(fp8: bool, seed: int = 3):
  from dsv3_jax import Transformer, load_config
  cfg = load_config(fixture_path("tiny_v3")).replace(kv_lora_rank=32)
  return Transformer(cfg, rngs=nnx.Rngs(seed), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
                     fp8=fp8, fp8_backend="triton" if fp8 else "xla")


@pytest.mark.parametrize("fp8", [False, True])
def test_generation_through_the_kernel_equals_xla(fp8):
  """Greedy decoding with the absorption through the kernel (interpret mode here) equals XLA's:
  scanned stacks hand the kernel kv_b_proj's whole stacked weight (and e4m3 scales) with the
  layer index; one row plain, and three rows with MTP (T = 2 query rows per sequence)."""
  from dsv3_jax.generate import Engine
  from dsv3_jax.model import _whole_in_place
  model = _model(fp8)
  model.use_absorb_kernel(True)
  attn = model.moe_layers.self_attn
  assert attn.takes_absorb_kernel(1) and attn.takes_absorb_kernel(16)
  assert not attn.takes_absorb_kernel(17)                            # prefill keeps XLA
  whole = _whole_in_place(model.moe_layers, 3, jnp.bfloat16)
  kv_b = ("self_attn", "kv_b_proj")
  assert {(*kv_b, "weight"), (*kv_b, "weight_scale_inv")} <= whole
  assert not _whole_in_place(model.moe_layers, 17, jnp.bfloat16)
  run = lambda m, prompts, **kw: [o.output_ids for o in Engine(m, chunk=3, **kw).generate(
      prompts, max_new_tokens=6)[0]]
  # one row plain (the kernel's multiply-add form); three rows with MTP (6 query rows: the dot)
  for prompts, mtp in (([[5, 17, 99, 3]], False),
                       ([[5, 17, 99, 3], [7, 8, 9, 10, 11, 200, 1], [42]], True)):
    want = run(_model(fp8), prompts, mtp=mtp, absorb_kernel=False)
    assert run(model, prompts, mtp=mtp) == want, (len(prompts), mtp)

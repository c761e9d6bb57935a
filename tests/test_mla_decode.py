"""pallas_kernels.mla_decode (Triton lowering, interpret mode on the CPU): absorbed MLA attention
of a few decoding queries over the compressed cache, against its float32 reference and inside
generation (greedy output equal to XLA's absorbed attention, plain and MTP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.cache import LayerCache
from pallas_kernels.mla_decode import (Partials, TuningConfig, default_config, mla_decode,
                                       mla_decode_partials, mla_decode_reference)

ON_GPU = jax.devices()[0].platform == "gpu"


def _operands(b, t, n, s, rank, rope, layers, dtype, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  q = jax.random.normal(k1, (b, t, n, rank + rope), jnp.float32).astype(dtype)
  kv = jax.random.normal(k2, (*((layers,) if layers else ()), b, s, rank + rope),
                         jnp.float32).astype(dtype)
  return q, kv


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b, t, n, s, layers, positions, config", [
    # one row, one layer's cache, every slot visible, 4 splits of 2 key blocks
    (1, 1, 16, 128, 0, [[127]], TuningConfig(block_h=16, block_s=16, split_len=32)),
    # a stacked cache read at a layer index; a ragged last split (S = 100) and a short row
    (2, 1, 16, 100, 3, [[99], [5]], TuningConfig(block_h=16, block_s=16, split_len=32)),
    # MTP-shaped queries (T = 2 consecutive positions), heads not a multiple of block_h
    (2, 2, 20, 64, 2, [[10, 11], [62, 63]], TuningConfig(block_h=16, block_s=16, split_len=16)),
    # position 0 (one visible slot: most splits see nothing), the default tiles
    (3, 1, 16, 256, 2, [[0], [200], [255]], None)])
def test_matches_reference(b, t, n, s, layers, positions, config, dtype):
  rank, rope = 32, 16
  q, kv = _operands(b, t, n, s, rank, rope, layers, dtype, seed=b + s)
  pos = jnp.asarray(positions, jnp.int32)
  layer = jnp.int32(layers - 1) if layers else None
  scale = 0.3
  got = mla_decode(q, kv, pos, layer, rank=rank, scale=scale, out_dtype=jnp.float32,
                   config=config, interpret=not ON_GPU)
  want = mla_decode_reference(q, kv, pos, layer, rank=rank, scale=scale, out_dtype=jnp.float32)
  assert got.shape == (b, t, n, rank)
  # float32: the online softmax rounds differently from the two-pass reference (a few ulp);
  # bf16: p is rounded to bf16 before its product with the values (as XLA's path rounds the
  # probabilities to the compute dtype), 2^-8 relative per term
  tol = 2e-5 if dtype == jnp.float32 else 1.5e-2
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)
  # the query at slot p sees exactly the slots 0..p: the result moves when slot p changes, not
  # when slot p + 1 does
  row = 0
  p = int(pos[row, 0])
  if p + 1 < s:
    later = (kv.at[..., row, p + 1, :].set(100.0) if not layers
             else kv.at[layers - 1, row, p + 1, :].set(100.0))
    again = mla_decode(q, later, pos, layer, rank=rank, scale=scale, out_dtype=jnp.float32,
                       config=config, interpret=not ON_GPU)
    np.testing.assert_array_equal(np.asarray(again[row, 0]), np.asarray(got[row, 0]))


def test_partials_combine_and_empty_splits():
  """Splits past a query's position hold den = 0 and m = -1e30 and weigh nothing; a split's
  partial equals the reference softmax over its slots, renormalised."""
  rank, rope, s = 16, 16, 64
  q, kv = _operands(1, 1, 16, s, rank, rope, 0, jnp.float32, seed=3)
  pos = jnp.asarray([[20]], jnp.int32)
  cfg = TuningConfig(block_h=16, block_s=16, split_len=16)
  parts = mla_decode_partials(q, kv, pos, rank=rank, scale=1.0, config=cfg,
                              interpret=not ON_GPU)
  assert isinstance(parts, Partials) and parts.acc.shape == (4, 1, 16, rank)
  den = np.asarray(parts.den)
  assert (den[:2] > 0).all() and (den[2:] == 0).all()         # slots 0..20: splits 0 and 1
  np.testing.assert_array_equal(np.asarray(parts.acc[2:]), 0.0)
  # split 1 alone (slots 16..20) is the softmax over those slots
  scores = np.einsum("nd,sd->ns", np.asarray(q[0, 0], np.float64),
                     np.asarray(kv[0, 16:21], np.float64))
  w = np.exp(scores - scores.max(-1, keepdims=True))
  want = (w / w.sum(-1, keepdims=True)) @ np.asarray(kv[0, 16:21, :rank], np.float64)
  got = np.asarray(parts.acc[1, 0]) / den[1, 0][:, None]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(parts.combine(jnp.float32))[0],
                             np.asarray(mla_decode_reference(q, kv, pos, rank=rank,
                                                             scale=1.0))[0, 0],
                             rtol=2e-5, atol=2e-6)


def test_default_config_splits_keys_for_small_batches():
  small = default_config(rows=1, heads=16, slots=4096)
  assert small.split_len == 64                      # 64 programs: every split of 64 keys
  big = default_config(rows=32, heads=16, slots=4096)
  assert big.split_len > small.split_len             # fewer, longer splits once the grid is full
  assert 32 * -(-4096 // big.split_len) <= 2 * 132


def test_bad_operands():
  q, kv = _operands(1, 1, 16, 32, 16, 16, 2, jnp.float32)
  pos = jnp.zeros((1, 1), jnp.int32)
  with pytest.raises(ValueError, match="needs the layer index"):
    mla_decode(q, kv, pos, rank=16, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="rank"):
    mla_decode(q, kv, pos, 0, rank=32, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="positions"):
    mla_decode(q, kv, jnp.zeros((1, 2), jnp.int32), 0, rank=16, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="split_len"):
    TuningConfig(block_s=32, split_len=48)
  # tiles under 16 (a bf16 value product with K = 8 came out doubled on an H100) or not powers of 2
  for bad in (dict(block_s=8, split_len=16), dict(block_s=24, split_len=48), dict(block_h=8)):
    with pytest.raises(ValueError, match="power of two >= 16"):
      TuningConfig(**bad)


def test_cache_write_places_windows():
  """LayerCache.write: each row's T tokens land at consecutive slots from its first position,
  in one layer of a stacked cache, the other slots and layers untouched (one row takes a
  dynamic_update_slice, several rows one windowed scatter)."""
  rank, rope = 4, 2
  for b in (1, 3):
    cache = LayerCache(jnp.zeros((2, b, 10, rank + rope)), rank)
    c = jnp.arange(b * 2 * rank, dtype=jnp.float32).reshape(b, 2, rank) + 1
    k = -jnp.arange(b * 2 * rope, dtype=jnp.float32).reshape(b, 2, rope) - 1
    starts = [3, 0, 8][:b]
    pos = jnp.asarray([[p, p + 1] for p in starts], jnp.int32)
    new = cache.write(c, k, pos, jnp.int32(1))
    want = np.zeros((2, b, 10, rank + rope), np.float32)
    for r, p in enumerate(starts):
      want[1, r, p:p + 2, :rank] = np.asarray(c[r])
      want[1, r, p:p + 2, rank:] = np.asarray(k[r])
    np.testing.assert_array_equal(np.asarray(new.kv), want)
    np.testing.assert_array_equal(np.asarray(new.layer(1).c_kv), want[1, ..., :rank])
    np.testing.assert_array_equal(np.asarray(new.layer(1).k_pe), want[1, ..., rank:])


def _kernel_model(dtype=jnp.bfloat16):
  """tiny_v3 with 16 heads (one head block) and power-of-two latent and rope widths."""
  from flax import nnx

  from conftest import fixture_path
  from dsv3_jax import Transformer, load_config
  cfg = load_config(fixture_path("tiny_v3")).replace(num_attention_heads=16, kv_lora_rank=32)
  return Transformer(cfg, rngs=nnx.Rngs(11), param_dtype=jnp.float32, dtype=dtype)


def assert_greedy_equal_up_to_near_ties(ref_model, prompts, got, want, ulps=4):
  """Each row of `got` equals `want` (greedy tokens of `ref_model`), except that from the first
  token where they part the two choices must be near-tied: their logits under `ref_model`'s full
  forward pass on the shared prefix differ by at most `ulps` bf16 ulps of the largest logit (two
  bf16 programs that round differently may pick either; the rows are compared no further, their
  prefixes differ from there)."""
  from dsv3_jax import core
  graphdef, params = core.split(ref_model)
  for prompt, g, w in zip(prompts, got, want):
    assert len(g) == len(w)
    i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
    if i is None:
      continue
    logits, _ = core.forward(graphdef, params, jnp.asarray([list(prompt) + w[:i]]))
    lg = np.asarray(logits[0, -1], np.float32)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(lg).max())) - 7)
    assert abs(lg[g[i]] - lg[w[i]]) <= ulps * ulp, (i, g, w, lg[g[i]], lg[w[i]], ulp)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_generation_through_the_kernel_equals_xla(dtype):
  """Greedy generation with decode attention through the kernel (interpret mode on the CPU)
  equals XLA's absorbed attention, plain and with MTP (T = 2 queries per row), mixed prompt
  lengths. float32 (XLA at HIGHEST precision, so a GPU's TF32 products do not enter): every
  token. bf16: the kernel's online softmax rounds p to bf16 per key block where XLA rounds the
  normalised p once, so near-tied logits of this random model may flip (on the CPU: MTP's third
  row at its 5th token, its two logits 0.0028 apart, 1.5 ulps of the largest; on an H100:
  MTP's second and third rows): equal up to near ties."""
  from dsv3_jax.generate import Engine
  prompts = [[5, 17, 99, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 200, 1], [42]]
  model = _kernel_model(dtype)
  attn = model.moe_layers.self_attn
  model.use_attention_kernel(True)
  assert attn.decode_kernel and attn.takes_decode_kernel(3, dtype)
  assert not attn.takes_decode_kernel(17, dtype)               # prefill keeps XLA
  run = lambda m, **kw: [o.output_ids for o in Engine(m, chunk=3, **kw).generate(
      prompts, max_new_tokens=8)[0]]
  with jax.default_matmul_precision("highest"):
    for mtp in (False, True):
      got = run(model, mtp=mtp)
      ref = _kernel_model(dtype)
      want = run(ref, mtp=mtp, attention_kernel=False)
      assert all(len(g) == 8 for g in got)
      if dtype == jnp.float32:
        assert got == want, mtp
      else:
        assert_greedy_equal_up_to_near_ties(ref, prompts, got, want)


def test_kernel_attention_equals_xla_in_one_layer():
  """One MLA layer decoding 2 rows against a filled cache, its own [B, S, *] or a stack read at
  a layer index: the kernel's output equals XLA's, the written cache is the same."""
  from flax import nnx

  from dsv3_jax.mla import MLA
  cfg = _kernel_model(jnp.float32).cfg
  attn = MLA(cfg, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(5), (2, 1, cfg.hidden_size), jnp.float32)
  pos = jnp.asarray([[9], [23]], jnp.int32)
  stack = jax.random.normal(jax.random.key(4), (3, 2, 24, cfg.cache_values_per_token))
  for kv, layer in ((stack[1], None), (stack, jnp.int32(1))):
    cache = LayerCache(kv, cfg.kv_lora_rank)
    with jax.default_matmul_precision("highest"):      # no TF32 products on a GPU
      attn.decode_kernel = False
      want, wc = attn(x, pos, cache, mode="absorbed", layer=layer)
      attn.decode_kernel = True
      assert attn.takes_decode_kernel(2, jnp.float32)
      got, gc = attn(x, pos, cache, mode="absorbed", layer=layer)
    np.testing.assert_array_equal(np.asarray(gc.kv), np.asarray(wc.kv))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    assert np.abs(np.asarray(want)).max() > 1e-2

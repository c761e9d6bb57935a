"""MLA: interleaved RoPE, absorbed == full attention, cached decoding == one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from dsv3_jax import core, from_hf_pretrained, init_cache, load_config
from dsv3_jax.layers import apply_rope, rope_inv_freq
from dsv3_jax.mla import MLA


def test_rope_rotates_adjacent_pairs():
  """Reference: DeepSeek's official code views (x[2i], x[2i+1]) as a complex number."""
  cfg = load_config(fixture_path("tiny_v3"))
  r = cfg.qk_rope_head_dim
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, r))
  pos = rng.integers(0, 200, (2, 5))
  freqs = rope_inv_freq(cfg)
  z = x[..., 0::2] + 1j * x[..., 1::2]
  rot = z * np.exp(1j * pos[:, :, None, None] * freqs)
  want = np.stack([rot.real, rot.imag], -1).reshape(x.shape)
  got = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), freqs))
  np.testing.assert_allclose(got, want, atol=2e-5)
  # Llama's rotate_half on the raw layout is a different function.
  half = np.concatenate([x[..., :r // 2], x[..., r // 2:]], -1)
  zh = half[..., :r // 2] + 1j * half[..., r // 2:]
  roth = zh * np.exp(1j * pos[:, :, None, None] * freqs)
  assert np.abs(np.concatenate([roth.real, roth.imag], -1) - want).max() > 0.1


@pytest.mark.parametrize("name", ["tiny_v3", "tiny_v3_noqlora"])
def test_absorbed_equals_full(name):
  cfg = load_config(fixture_path(name))
  attn = MLA(cfg, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(0), (2, 9, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9)) + jnp.array([[0], [5]])
  full, _ = attn(x, pos, mode="full")
  absorbed, _ = attn(x, pos, mode="absorbed")
  np.testing.assert_allclose(np.asarray(absorbed), np.asarray(full), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(full)).max() > 1e-2


@pytest.mark.parametrize("name", ["tiny_v3", "tiny_v3_noqlora"])
def test_prefill_then_decode_equals_full_forward(name):
  model = from_hf_pretrained(fixture_path(name), jnp.float32)
  graphdef, params = core.split(model)
  tokens = jax.random.randint(jax.random.key(7), (2, 14), 0, model.cfg.vocab_size)
  want, _ = core.forward(graphdef, params, tokens)
  got = incremental_logits(graphdef, params, model.cfg, tokens, prefill_len=5, dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def incremental_logits(graphdef, params, cfg, tokens, *, prefill_len, dtype):
  """Logits of every position from a prefill of the first tokens, then one decode step each."""
  b, t = tokens.shape
  cache = init_cache(cfg, batch=b, max_len=t + 4, dtype=dtype)
  logits, _, cache = core.prefill(graphdef, params, tokens[:, :prefill_len], cache)
  got = [logits]
  for i in range(prefill_len, t):
    logits, _, cache = core.decode_step(graphdef, params, tokens[:, i:i + 1],
                                        jnp.full((b,), i, jnp.int32), cache)
    got.append(logits)
  return jnp.concatenate(got, axis=1)


def test_decode_rows_at_different_positions():
  """Each row decodes at its own position: a batch equals its rows run one by one."""
  model = from_hf_pretrained(fixture_path("tiny_v3"), jnp.float32)
  graphdef, params = core.split(model)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, model.cfg.vocab_size)
  lens = [3, 6]

  def run(rows, starts):
    cache = init_cache(model.cfg, batch=len(rows), max_len=12, dtype=jnp.float32)
    # write each row's prompt by decoding it token by token at its own positions
    out = None
    for i in range(max(starts) + 1):
      step = jnp.stack([tokens[r, min(i, s)] for r, s in zip(rows, starts)])[:, None]
      pos = jnp.asarray([min(i, s) for s in starts], jnp.int32)
      out, _, cache = core.decode_step(graphdef, params, step, pos, cache)
    return out[:, -1]

  both = run([0, 1], lens)
  for row, s in enumerate(lens):
    alone = run([row], [s])
    np.testing.assert_allclose(np.asarray(both[row]), np.asarray(alone[0]), rtol=1e-4, atol=1e-5)
  full, _ = core.forward(graphdef, params, tokens)
  for row, s in enumerate(lens):
    np.testing.assert_allclose(np.asarray(both[row]), np.asarray(full[row, s]), rtol=1e-4,
                               atol=1e-4)


def test_cache_is_compressed():
  cfg = load_config(fixture_path("tiny_v3"))
  cache = init_cache(cfg, batch=2, max_len=16)
  per_token = sum(x.shape[-1] for x in jax.tree.leaves(cache.moe))
  assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim
  assert cache.moe.c_kv.shape == (cfg.num_moe_layers, 2, 16, cfg.kv_lora_rank)
  assert cache.dense.k_pe.shape == (cfg.num_dense_layers, 2, 16, cfg.qk_rope_head_dim)


def test_prompt_longer_than_cache_is_an_error():
  model = from_hf_pretrained(fixture_path("tiny_v3"), jnp.float32)
  graphdef, params = core.split(model)
  cache = init_cache(model.cfg, batch=1, max_len=4, dtype=jnp.float32)
  with pytest.raises(ValueError, match="exceeds the cache length 4"):
    core.prefill(graphdef, params, jnp.zeros((1, 6), jnp.int32), cache)


def test_bf16_prefill_then_decode_runs_close_to_full_forward():
  """bf16 everywhere (params, activations, cache); the two paths round differently."""
  model = from_hf_pretrained(fixture_path("tiny_v3"), jnp.bfloat16)
  graphdef, params = core.split(model)
  tokens = jax.random.randint(jax.random.key(9), (3, 8), 0, model.cfg.vocab_size)
  want, _ = core.forward(graphdef, params, tokens)
  got = np.asarray(incremental_logits(graphdef, params, model.cfg, tokens, prefill_len=4,
                                      dtype=jnp.bfloat16))
  rel = np.linalg.norm(got - np.asarray(want)) / np.linalg.norm(np.asarray(want))
  assert rel < 3e-2, rel

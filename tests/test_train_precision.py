"""Training options that move fewer bytes: AdamW moments stored in bf16
(`OptimizerConfig.moment_dtype`), against optax's AdamW and through a checkpoint."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import fixture_path
from dsv3_jax import load_config
from dsv3_jax.train_step import (OptimizerConfig, init_train_state, lr_schedule, make_optimizer,
                                 make_train_step)

BF16 = "bfloat16"


def _cfg(**changes):
  return load_config(fixture_path("tiny_v3")).replace(**changes)


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype, (jax.tree_util.keystr(path), g.dtype, w.dtype)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w),
                                  err_msg=jax.tree_util.keystr(path))


def _widen(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tree)


def _params_and_grads(steps):
  """A plain pytree (a matrix, a vector, a stack) and `steps` random gradients; the third is
  large enough to be clipped."""
  keys = iter(jax.random.split(jax.random.key(0), 3 + 3 * steps))
  shapes = {"w": (24, 16), "b": (16,), "e": (3, 8, 16)}
  params = {k: jax.random.normal(next(keys), s) for k, s in shapes.items()}
  grads = [{k: (100.0 if i == 2 else 0.1) * jax.random.normal(next(keys), s)
            for k, s in shapes.items()} for i in range(steps)]
  return params, grads


def test_float32_moments_are_optax_adamw():
  """The default (moment_dtype float32) is optax's AdamW after global-norm clipping, unchanged:
  the same updates and state, bit for bit, over five steps."""
  oc = OptimizerConfig(lr=1e-2, warmup_steps=2, total_steps=10)
  ref = optax.chain(optax.clip_by_global_norm(oc.clip_norm),
                    optax.adamw(lr_schedule(oc), b1=oc.b1, b2=oc.b2, eps=oc.eps,
                                weight_decay=oc.weight_decay,
                                mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  opt = make_optimizer(oc)
  params, grads = _params_and_grads(5)
  state, ref_state = opt.init(params), ref.init(params)
  _assert_trees_equal(state, ref_state)
  for g in grads:
    updates, state = jax.jit(opt.update)(g, state, params)
    want, ref_state = jax.jit(ref.update)(g, ref_state, params)
    _assert_trees_equal(updates, want)
    _assert_trees_equal(state, ref_state)
    params = optax.apply_updates(params, updates)


def test_bf16_moments_round_once_per_step():
  """moment_dtype="bfloat16": mu and nu are stored in bf16 (counts stay int32), and a step is
  the float32 optimizer's step on the widened moments, rounded once: the same updates bit for
  bit, and its new moments rounded to bf16. (optax.adamw(mu_dtype=bfloat16) fails this: it
  rounds b1·mu to bf16 before adding the float32 gradient term, and keeps nu in float32.)"""
  oc = OptimizerConfig(lr=1e-2, warmup_steps=2, total_steps=10)
  ref, opt = make_optimizer(oc), make_optimizer(dataclasses.replace(oc, moment_dtype=BF16))
  params, grads = _params_and_grads(5)
  state = opt.init(params)
  adam = state[1][0]
  assert adam.count.dtype == jnp.int32
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
  for g in grads:
    want, want_state = jax.jit(ref.update)(g, _widen(state), params)
    updates, state = jax.jit(opt.update)(g, state, params)
    _assert_trees_equal(updates, want)
    _assert_trees_equal(state, jax.tree.map(
        lambda x, s: x.astype(s.dtype), want_state, state))
    assert jax.tree.leaves(state[1][0].nu)[0].max() > 0
    params = optax.apply_updates(params, updates)
  with pytest.raises(ValueError, match="moment_dtype='float16'"):
    make_optimizer(dataclasses.replace(oc, moment_dtype="float16"))


def _pattern_batch(step, batch, seq, vocab):
  """Learnable sequences: t_{i+1} = (3·t_i + 7) mod V from a random start."""
  t = np.empty((batch, seq + 1), np.int32)
  t[:, 0] = np.random.default_rng(step).integers(0, vocab, batch)
  for i in range(seq):
    t[:, i + 1] = (3 * t[:, i] + 7) % vocab
  return jnp.asarray(t)


def test_bf16_moments_train_like_float32():
  """20 steps of the tiny model (float32 compute, so that only the moments differ) from one
  initialization: with bf16 moments the state holds bf16 mu/nu and float32 parameters, the loss
  falls as far, and every step's loss stays within 2 % of the float32-moment run's.

  Tolerance: a bf16 moment is off by ≤ 2^-9 relative, so each Adam step mu/(√nu + ε) moves
  by ≤ ~0.3 % of itself; over 20 steps at lr 1e-2 the parameters drift apart by a fraction of
  a percent of their movement, and top-k routing may flip a few near-tied tokens. Measured:
  ≤ 0.3 % (step 20); 2 % leaves room for other platforms' rounding."""
  cfg = _cfg()
  oc = OptimizerConfig(lr=1e-2, warmup_steps=5, total_steps=20)
  runs = {}
  for dtype in ("float32", BF16):
    graphdef, state = init_train_state(cfg, dataclasses.replace(oc, moment_dtype=dtype), seed=0,
                                       dtype=jnp.float32)
    step = make_train_step(graphdef, dataclasses.replace(oc, moment_dtype=dtype))
    losses = []
    for i in range(20):
      state, m = step(state, _pattern_batch(i, 8, 16, cfg.vocab_size))
      losses.append(float(m["loss"]))
    runs[dtype] = (state, np.array(losses))
  state, bf16 = runs[BF16]
  _, f32 = runs["float32"]
  adam = state.opt_state[1][0]
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert bf16[-1] < 0.6 * bf16[0], bf16
  assert bf16[0] == f32[0]  # the first loss precedes any update
  np.testing.assert_allclose(bf16, f32, rtol=2e-2)
  assert np.any(bf16 != f32)  # the moments really were rounded


def test_bf16_moments_checkpoint_round_trip(tmp_path):
  """A state with bf16 moments saved by TrainCheckpointer restores with its dtypes and values
  bit for bit, into a fresh state of another seed, and the next step from it equals the next
  step from the saved one (train.py --resume in tests/test_train.py runs the whole loop)."""
  from dsv3_jax.train_ckpt import TrainCheckpointer

  cfg = _cfg()
  oc = OptimizerConfig(lr=1e-2, warmup_steps=1, total_steps=10, moment_dtype=BF16)
  graphdef, state = init_train_state(cfg, oc, seed=0, dtype=jnp.float32)
  step = make_train_step(graphdef, oc, donate=False)
  for i in range(2):
    state, _ = step(state, _pattern_batch(i, 4, 8, cfg.vocab_size))
  ckpt = TrainCheckpointer(str(tmp_path / "ckpt"), every=1, async_save=False)
  assert ckpt.save(2, state, {"data_position": 8})
  ckpt.wait()
  _, like = init_train_state(cfg, oc, seed=1, dtype=jnp.float32)
  restored, meta = ckpt.restore(like)
  ckpt.close()
  assert meta == {"data_position": 8}
  assert jax.tree.leaves(restored.opt_state[1][0].mu)[0].dtype == jnp.bfloat16
  _assert_trees_equal(restored, state)
  tokens = _pattern_batch(2, 4, 8, cfg.vocab_size)
  (want, want_m), (got, got_m) = step(state, tokens), step(restored, tokens)
  _assert_trees_equal(got, want)
  assert float(got_m["loss"]) == float(want_m["loss"])

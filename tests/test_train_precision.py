"""Training options that move fewer bytes: AdamW moments stored in bf16
(`OptimizerConfig.moment_dtype`), and float32 weights cast to bf16 once per step
(`Transformer(cast_weights_once=True)`). The first against optax's AdamW and through a checkpoint;
the second bit for bit against the per-use casts (scanned, unstacked, expert-parallel, FP8)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import fixture_path
from dsv3_jax import Transformer, load_config
from dsv3_jax.model import cast_product_weights
from dsv3_jax.train_step import (Objective, OptimizerConfig, init_train_state, loss_fn,
                                 lr_schedule, make_optimizer, make_train_step)

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


# ---- weights cast once per step -----------------------------------------------------------
# XLA may leave out a bf16 rounding that its result's next op undoes (xla_allow_excess_precision,
# on by default on CPU and GPU): with per-use casts a weight gradient's product rounds to bf16
# and is converted straight to float32, so XLA:CPU kept the float32 sum for the tiny model's
# shared experts (scanned layers); cast once, the rounded gradient is stacked over the layers
# first and stays rounded (≤ 1 bf16 ulp apart). The comparisons compile without that licence.
EXACT = {"xla_allow_excess_precision": False}


def _value_and_grad(graphdef, state, tokens):
  f = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(2, 4))
  compiled = f.lower(state.params, state.biases, graphdef, tokens, Objective()).compile(EXACT)
  (loss, (metrics, _)), grads = compiled(state.params, state.biases, tokens)
  return loss, metrics, grads


def _both(cfg, tokens, **kw):
  """(loss, metrics, grads) with per-use casts, then with weights cast once."""
  out = []
  for once in (False, True):
    graphdef, state = init_train_state(cfg, OptimizerConfig(), seed=1, dtype=jnp.bfloat16,
                                       cast_weights_once=once, **kw)
    out.append(_value_and_grad(graphdef, state, tokens))
  return out


@pytest.mark.parametrize("unstack", [False, True], ids=["scanned", "unstacked"])
def test_cast_weights_once_is_bit_identical(unstack):
  """bf16 compute with remat ("dots"): the same loss, metrics and float32 gradients, bit for
  bit, when the layers' and MTP block's weights are cast once instead of at every use."""
  cfg = _cfg()
  tokens = jax.random.randint(jax.random.key(7), (4, 17), 0, cfg.vocab_size)
  (loss, metrics, grads), (loss1, metrics1, grads1) = _both(
      cfg, tokens, unstack_layers=unstack, remat="dots_with_no_batch_dims_saveable")
  assert np.isfinite(float(loss)) and float(loss) > 1.0
  _assert_trees_equal(metrics1, metrics)
  _assert_trees_equal(grads1, grads)
  assert {x.dtype for x in jax.tree.leaves(grads1)} == {jnp.dtype(jnp.float32)}


def _cast_paths(module) -> set[str]:
  """'/'-joined paths of the parameters that cast_product_weights turns into bf16."""
  _, state = nnx.split(cast_product_weights(module, jnp.bfloat16))
  return {"/".join(map(str, p)) for p, v in nnx.to_flat_state(state)
          if v.get_value().dtype == jnp.bfloat16}


def test_cast_weights_once_selection():
  """What is cast: every Linear and routed-expert weight of the decoder layers and the MTP
  block; never norms, the router, the correction biases (float32 compute); nothing under the
  FP8 training recipe but the MTP block's bf16 eh_proj; not the experts of a multi-device
  ExpertParallel (its transpose would sum their gradients in bf16 where it sums float32)."""
  from dsv3_jax.expert_parallel import ExpertParallel
  from dsv3_jax.sharding import make_mesh

  cfg = _cfg(n_routed_experts=8, n_group=4, topk_group=2)
  model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  moe = _cast_paths(model.moe_layers)
  attn = {f"self_attn/{n}/weight" for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                              "kv_b_proj", "o_proj")}
  shared = {f"mlp/shared_experts/{n}/weight" for n in ("gate_proj", "up_proj", "down_proj")}
  experts = {f"mlp/experts/{n}" for n in ("gate_proj", "up_proj", "down_proj")}
  assert moe == attn | shared | experts
  assert _cast_paths(model.dense_layers) == attn | {
      f"mlp/{n}/weight" for n in ("gate_proj", "up_proj", "down_proj")}
  assert _cast_paths(model.mtp[0]) == {"eh_proj/weight"} | {
      f"block/{p}" for p in attn | shared | experts}
  assert cast_product_weights(model.moe_layers, jnp.float32) is model.moe_layers

  fp8 = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, fp8_training=True,
                    fp8_backend="xla")
  assert _cast_paths(fp8.moe_layers) == set()
  assert _cast_paths(fp8.mtp[0]) == {"eh_proj/weight"}

  ep = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                   expert_dispatch=ExpertParallel(make_mesh(data=2, expert=4)))
  assert _cast_paths(ep.moe_layers) == attn | shared
  one = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                    expert_dispatch=ExpertParallel(make_mesh(devices=jax.devices()[:1])))
  assert _cast_paths(one.moe_layers) == moe


@pytest.mark.parametrize("backend", ["xla", "mosaic"])
def test_cast_weights_once_expert_parallel_is_bit_identical(backend):
  """On a data=2 × expert=4 mesh, with the XLA products under shard_map's check_vma and
  (`mosaic`, interpreted on the CPU: the XLA products again, but check_vma off as for the
  kernels) without it: the same loss and gradients bit for bit. Casting the experts too would
  fail the second: its transpose would sum their data-parallel gradients in bf16."""
  from dsv3_jax.expert_parallel import ExpertParallel
  from dsv3_jax.sharding import batch_sharding, make_mesh

  cfg = _cfg(n_routed_experts=8, n_group=4, topk_group=2)
  mesh = make_mesh(data=2, expert=4)
  tokens = jax.device_put(jax.random.randint(jax.random.key(7), (8, 13), 0, cfg.vocab_size),
                          batch_sharding(mesh))
  (loss, _, grads), (loss1, _, grads1) = _both(
      cfg, tokens, mesh=mesh, expert_dispatch=ExpertParallel(mesh), fp8_backend=backend)
  assert float(loss1) == float(loss)
  _assert_trees_equal(grads1, grads)


def test_cast_weights_once_leaves_fp8_training_alone():
  """Under the FP8 training recipe (float32 emulation) the projections quantize their float32
  masters as before: loss and gradients bit for bit (only the MTP block's bf16 eh_proj is
  cast)."""
  cfg = _cfg()
  tokens = jax.random.randint(jax.random.key(7), (2, 13), 0, cfg.vocab_size)
  (loss, _, grads), (loss1, _, grads1) = _both(cfg, tokens, fp8_training=True,
                                               fp8_backend="xla")
  assert float(loss1) == float(loss)
  _assert_trees_equal(grads1, grads)

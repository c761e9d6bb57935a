"""Router (group-limited top-k, bias-only selection, scaling) and the sorted MoE dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from dsv3_jax import load_config
from dsv3_jax.moe import (MLP, MoE, Router, dense_moe_reference, grouped_matmul, inverse_permutation,
                          permute_rows, unpermute_rows)


def _router(**changes):
  """A router over E = D = 8 with an identity gate, so its logits are the inputs themselves."""
  cfg = load_config(fixture_path("tiny_v3")).replace(hidden_size=8, n_routed_experts=8, **changes)
  r = Router(cfg, rngs=nnx.Rngs(0))
  r.weight[...] = jnp.eye(8)
  return r, cfg


def _logit(p):
  p = np.asarray(p, np.float64)
  return jnp.asarray(np.log(p / (1 - p)), jnp.float32)


def test_bias_selects_but_does_not_weight():
  r, cfg = _router(n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=True,
                   routed_scaling_factor=2.5)
  s = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.4, 0.5]
  r.e_score_correction_bias[...] = jnp.array([0, 0, 0, 0.95, 0, 0, 0, 0], jnp.float32)
  out = r(_logit(s)[None])
  assert sorted(np.asarray(out.experts[0]).tolist()) == [0, 3]  # expert 3 only through the bias
  w = dict(zip(np.asarray(out.experts[0]).tolist(), np.asarray(out.weights[0]).tolist()))
  np.testing.assert_allclose([w[0], w[3]], [2.5 * 0.9 / 1.0, 2.5 * 0.1 / 1.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.scores[0]), s, rtol=1e-6)


def test_group_limited_routing_top2_sum():
  # 4 groups of 2. Expert 6 is the single best, but its group {6, 7} has the lowest top-2 sum.
  r, cfg = _router(n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=False,
                   routed_scaling_factor=1.0)
  s = [0.60, 0.55, 0.50, 0.45, 0.52, 0.50, 0.95, 0.01]
  # group sums: 1.15, 0.95, 1.02, 0.96 → groups 0 and 2 kept → experts {0, 1, 4}
  out = r(_logit(s)[None])
  assert sorted(np.asarray(out.experts[0]).tolist()) == [0, 1, 4]
  np.testing.assert_allclose(np.sort(np.asarray(out.weights[0])), [0.52, 0.55, 0.60], rtol=1e-6)
  # groups are scored on biased scores: lifting expert 7 makes group 3 the best (1.66), so
  # groups 3 and 0 are kept; 7 (biased 0.71) beats 1; its weight stays its unbiased score
  r.e_score_correction_bias[...] = jnp.array([0, 0, 0, 0, 0, 0, 0, 0.7], jnp.float32)
  out = r(_logit(s)[None])
  assert sorted(np.asarray(out.experts[0]).tolist()) == [0, 6, 7]
  np.testing.assert_allclose(np.sort(np.asarray(out.weights[0])), [0.01, 0.60, 0.95], rtol=1e-5)


def test_group_limited_routing_softmax_max_v2():
  r, cfg = _router(model_type="deepseek_v2", topk_method="group_limited_greedy",
                   scoring_func="softmax", n_group=4, topk_group=1, num_experts_per_tok=2,
                   norm_topk_prob=False, routed_scaling_factor=16.0)
  assert r.e_score_correction_bias is None
  logits = jnp.array([[1.0, 0.9, 2.0, -3.0, 0.1, 0.2, 0.3, 0.4]])
  out = r(logits)
  p = np.asarray(jax.nn.softmax(logits[0]))
  assert sorted(np.asarray(out.experts[0]).tolist()) == [2, 3]  # group {2,3} has the max
  np.testing.assert_allclose(np.sort(np.asarray(out.weights[0])), np.sort(16.0 * p[[2, 3]]),
                             rtol=1e-6)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("shape", [(3, 11), (1, 3)])  # sorted path; gathered path (M·K ≤ E)
def test_dispatch_equals_dense_reference(fp8, shape):
  cfg = load_config(fixture_path("tiny_v3")).replace(n_routed_experts=16, n_group=4,
                                                     num_experts_per_tok=4, initializer_range=0.2)
  moe = MoE(cfg, rngs=nnx.Rngs(5), fp8=fp8)
  moe.gate.e_score_correction_bias[...] = jax.random.normal(jax.random.key(2), (16,)) * 0.3
  x = jax.random.normal(jax.random.key(1), shape + (cfg.hidden_size,))
  got = moe(x)
  want = dense_moe_reference(moe, x.reshape(-1, cfg.hidden_size)).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want)).max() > 0.1
  # some experts receive no token at all: the grouped matmul must handle empty groups
  counts = np.bincount(np.asarray(moe.gate(x.reshape(-1, cfg.hidden_size)).experts).ravel(),
                       minlength=16)
  assert counts.sum() == shape[0] * shape[1] * 4 and (counts == 0).any()


def test_grouped_matmul_with_empty_groups():
  rng = np.random.default_rng(0)
  sizes = np.array([3, 0, 5, 0, 2], np.int32)
  x = rng.standard_normal((10, 6)).astype(np.float32)
  w = rng.standard_normal((5, 4, 6)).astype(np.float32)
  got = np.asarray(grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes)))
  owner = np.repeat(np.arange(5), sizes)
  want = np.einsum("mk,mnk->mn", x, w[owner])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_permutations_are_gathers_equal_to_scatter_autodiff():
  """permute_rows / unpermute_rows and their backward passes equal the plain-indexing versions
  that autodiff transposes into scatters (bit for bit: data movement and the same k-term sums),
  and only the int inverse permutation is still a scatter (of M·K ints, not M·K × D rows)."""
  m, k, d = 37, 4, 16
  ks = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(ks[0], (m, d))
  order = jax.random.permutation(ks[1], m * k).astype(jnp.int32)
  gy = jax.random.normal(ks[2], (m * k, d))
  w = jax.random.normal(ks[3], (m * k, d))

  def ours(x, w):  # as Experts does: one inverse for both
    inverse = inverse_permutation(order)
    xs = permute_rows(x, order, k, inverse)
    return xs, unpermute_rows(xs * w, order, inverse)

  def plain(x, w):
    xs = jnp.repeat(x, k, axis=0)[order]
    return xs, jnp.zeros_like(xs).at[order].set(xs * w)

  (xs, y), pull = jax.vjp(ours, x, w)
  (xs0, y0), pull0 = jax.vjp(plain, x, w)
  np.testing.assert_array_equal(np.asarray(xs), np.asarray(xs0))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
  np.testing.assert_array_equal(np.asarray(xs)[np.argsort(order)].reshape(m, k, d),
                                np.repeat(np.asarray(x)[:, None], k, 1))
  for got, want in zip(pull((gy, 2 * gy)), pull0((gy, 2 * gy))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  scatters = lambda f: [e for e in jax.make_jaxpr(lambda x, w: jax.vjp(f, x, w)[1]((gy, gy)))(
      x, w).jaxpr.eqns if e.primitive.name.startswith("scatter")]
  assert [e.outvars[0].aval.shape for e in scatters(ours)] == [(m * k,)]
  assert len(scatters(plain)) >= 2


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merged_shared_experts_equal_the_separate_path(fp8, dtype):
  """One token's shared experts read as S more experts of the fused gather (MoE.merge_shared)
  give the separate path's output: to float32 rounding, and in bf16 no further from the float32
  result of the same weights than the separate path is; more tokens, or the GEMV kernels, keep
  the separate path."""
  cfg = load_config(fixture_path("tiny_v3")).replace(
      hidden_size=128, moe_intermediate_size=128, n_routed_experts=16, n_shared_experts=2,
      num_experts_per_tok=4, initializer_range=0.2)
  moe = MoE(cfg, rngs=nnx.Rngs(3), fp8=fp8, param_dtype=dtype)
  x = jax.random.normal(jax.random.key(4), (1, 1, cfg.hidden_size)).astype(dtype)
  with jax.default_matmul_precision("highest"):     # no TF32 in the separate path's dots on GPUs
    want = moe(x)
    moe.merge_shared = True
    assert moe.takes_merged_shared(1) and not moe.takes_merged_shared(2)
    got = moe(x)
  scale = np.abs(np.asarray(want, np.float32)).max()
  assert scale > 0.1
  if dtype == jnp.float32:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * scale)
    # the shared experts are in it: without them the output differs
    routed = moe.experts(x.reshape(1, -1), moe.gate(x.reshape(1, -1))).reshape(x.shape)
    assert np.abs(np.asarray(got - routed)).max() > 0.01 * scale
  else:   # both against the same bf16 weights and input computed in float32
    graphdef, state = nnx.split(moe)
    state = jax.tree.map(lambda v: v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v,
                         state)
    with jax.default_matmul_precision("highest"):
      exact = np.asarray(nnx.merge(graphdef, state)(x.astype(jnp.float32)))
    err = lambda y: np.abs(np.asarray(y, np.float32) - exact).max()
    assert err(got) <= 1.25 * err(want) + 1e-3 * scale, (err(got), err(want))
    assert err(got) <= 0.02 * scale
  moe.experts.gemv = True            # one token through the GEMV kernels: no merged gather
  moe.experts.gemv_min_rows = 1
  assert not moe.takes_merged_shared(1)
  # a shared width that is no whole number of expert widths keeps the separate path
  odd = MoE(cfg.replace(moe_intermediate_size=96), rngs=nnx.Rngs(3))
  odd.merge_shared = True
  assert odd.shared_experts.gate_proj.out_features == 192 and odd.takes_merged_shared(1)
  odd.shared_experts = MLP(cfg.hidden_size, 160, rngs=nnx.Rngs(1), std=0.2)
  assert not odd.takes_merged_shared(1)


def test_generation_with_merged_shared_experts(monkeypatch):
  """Greedy decoding with one token's shared experts merged into the fused gather (traced
  inside the scanned stack) gives plain decoding's tokens (float32 model)."""
  from dsv3_jax.generate import Engine
  from dsv3_jax.model import Transformer
  cfg = load_config(fixture_path("tiny_v3")).replace(n_shared_experts=2)
  make = lambda: Transformer(cfg, rngs=nnx.Rngs(7), param_dtype=jnp.float32, dtype=jnp.float32)
  merged = []
  original = MoE._merged_shared
  monkeypatch.setattr(MoE, "_merged_shared",
                      lambda self, x, r: merged.append(x.shape) or original(self, x, r))
  run = lambda **kw: [o.output_ids for o in Engine(make(), chunk=3, **kw).generate(
      [[5, 17, 99, 3]], max_new_tokens=6)[0]]
  want = run(merged_shared=False)
  assert not merged
  assert run(merged_shared=True) == want
  assert merged and all(s[0] == 1 for s in merged)

"""Expert parallelism (all-to-all in shard_map) against the local dispatch and a dense reference
with the capacity drops applied by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from dsv3_jax import load_config
from dsv3_jax.expert_parallel import ExpertParallel
from dsv3_jax.moe import MoE
from dsv3_jax.sharding import make_mesh, shard_params


def _moe(dispatch=None):
  cfg = load_config(fixture_path("tiny_v3")).replace(n_routed_experts=16, n_group=4,
                                                     num_experts_per_tok=4, initializer_range=0.2)
  moe = MoE(cfg, rngs=nnx.Rngs(5), dispatch=dispatch)
  moe.gate.e_score_correction_bias[...] = jax.random.normal(jax.random.key(2), (16,)) * 0.3
  return cfg, moe


def _run(moe, mesh, x):
  graphdef, state = nnx.split(moe)
  state = shard_params(state, mesh)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def test_dropless_expert_parallel_equals_local_dispatch():
  mesh = make_mesh(data=2, expert=4)
  cfg, local = _moe()
  _, ep = _moe(ExpertParallel(mesh))
  x = jax.random.normal(jax.random.key(1), (4, 6, cfg.hidden_size))
  np.testing.assert_allclose(np.asarray(_run(ep, mesh, x)), np.asarray(local(x)),
                             rtol=1e-5, atol=1e-5)


def test_capacity_drops_overflow_per_device_and_expert():
  mesh = make_mesh(expert=8)
  cfg, ep = _moe(ExpertParallel(mesh, capacity_factor=0.5))
  x = jax.random.normal(jax.random.key(3), (8, 8, cfg.hidden_size))
  got = np.asarray(_run(ep, mesh, x)).reshape(-1, cfg.hidden_size)

  xt = x.reshape(-1, cfg.hidden_size)
  routing = ep.gate(xt)
  idx, w = np.asarray(routing.experts), np.asarray(routing.weights)
  per_device, k, e = xt.shape[0] // 8, 4, 16
  cap = int(np.ceil(0.5 * per_device * k / e))            # = 1 row per (device, expert)
  keep = np.zeros_like(w, bool)
  for dev in range(8):
    seen = np.zeros(e, int)
    for m in range(dev * per_device, (dev + 1) * per_device):  # (token, slot) order
      for j in range(k):
        keep[m, j] = seen[idx[m, j]] < cap
        seen[idx[m, j]] += 1
  assert 0 < keep.sum() < keep.size                        # some pairs really are dropped
  ex = ep.experts
  xf = np.asarray(xt, np.float64)

  def expert(i, v):
    g = v @ np.asarray(ex.gate_proj[...][i], np.float64).T
    u = v @ np.asarray(ex.up_proj[...][i], np.float64).T
    return (g / (1 + np.exp(-g)) * u) @ np.asarray(ex.down_proj[...][i], np.float64).T

  want = np.asarray(ep.shared_experts(xt), np.float64)
  for m in range(xt.shape[0]):
    for j in range(k):
      if keep[m, j]:
        want[m] += w[m, j] * expert(idx[m, j], xf[m])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_expert_parallel_input_errors():
  mesh = make_mesh(expert=8)
  with pytest.raises(ValueError, match="capacity_factor"):
    ExpertParallel(mesh, capacity_factor=0.0)
  cfg = load_config(fixture_path("tiny_v3")).replace(n_routed_experts=12, n_group=4,
                                                     num_experts_per_tok=4)
  moe = MoE(cfg, rngs=nnx.Rngs(0), dispatch=ExpertParallel(mesh))
  with pytest.raises(ValueError, match="not divisible by the expert axis"):
    moe(jnp.ones((8, 2, cfg.hidden_size)))
  cfg, moe = _moe(ExpertParallel(mesh))
  with pytest.raises(ValueError, match="cannot be split over the batch axes"):
    moe(jnp.ones((1, 3, cfg.hidden_size)))


def test_mesh_flag_and_batch_rule():
  from dsv3_jax.sharding import batch_sharding, logical_to_spec, parse_mesh

  assert parse_mesh("data=2, expert=4") == {"data": 2, "expert": 4}
  assert parse_mesh("") == {}
  for bad in ("data=0", "pipeline=2", "data", "data=2,data=2", "expert=x"):
    with pytest.raises(ValueError, match="mesh"):
      parse_mesh(bad)
  mesh = make_mesh(data=2, fsdp=2, expert=2)
  assert batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None)
  # a batch of 4 cannot be split 8 ways: replicated rather than an error
  assert logical_to_spec(("batch", None), (4, 3), mesh) == jax.sharding.PartitionSpec(None, None)
  assert logical_to_spec(("batch", "embed"), (8, 4), mesh) == jax.sharding.PartitionSpec(
      ("data", "fsdp", "expert"), None)  # fsdp already used by the batch

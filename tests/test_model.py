"""The whole model: scanned stacks, MTP, the functional core, depth-independent compilation,
sharding over an 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from dsv3_jax import Transformer, core, from_hf_pretrained, load_config
from dsv3_jax.model import DecoderLayer, scan_layers
from dsv3_jax.sharding import make_mesh, shard_params


@pytest.fixture(scope="module")
def tiny():
  return from_hf_pretrained(fixture_path("tiny_v3"), jnp.float32)


def test_scanned_stack_equals_unstacked_layers(tiny):
  cfg = tiny.cfg
  x = jax.random.normal(jax.random.key(0), (2, 7, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  got, _ = scan_layers(tiny.moe_layers, x, pos, None, "full")
  _, stacked = nnx.split(tiny.moe_layers)
  h = x
  for i in range(cfg.num_moe_layers):
    layer = DecoderLayer(cfg, moe=True, rngs=nnx.Rngs(99))  # fresh weights, then overwritten
    nnx.update(layer, jax.tree.map(lambda a: a[i], stacked))
    assert not np.allclose(np.asarray(nnx.state(layer)["input_layernorm"]["weight"][...]), 1.0)
    h, _ = layer(h, pos)
  np.testing.assert_allclose(np.asarray(got), np.asarray(h), rtol=1e-6, atol=1e-6)


def _eqn_count(num_layers):
  cfg = load_config(fixture_path("tiny_v3")).replace(num_hidden_layers=num_layers)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p, t: core.forward.__wrapped__(graphdef, p, t))(params, tokens)
  return len(jaxpr.jaxpr.eqns)


def test_traced_program_does_not_grow_with_depth():
  assert _eqn_count(3) == _eqn_count(12)


def test_functional_forward_and_mtp(tiny):
  graphdef, params = core.split(tiny)
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, tiny.cfg.vocab_size)
  logits, (mtp,) = core.forward(graphdef, params, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(tiny(tokens)), rtol=1e-6, atol=1e-6)
  assert mtp.shape == (2, 8, tiny.cfg.vocab_size)
  # MTP by hand: embedding FIRST, the main model's normed hidden second, one block, head norm.
  h, _ = tiny.hidden(tokens)
  layer = tiny.mtp[0]
  x = jnp.concatenate([layer.enorm(tiny.embed(tokens[:, 1:])), layer.hnorm(h[:, :-1])], -1)
  x = x @ layer.eh_proj.weight[...].T
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  x, _ = layer.block(x, pos)
  want = layer.shared_head_norm(x) @ tiny.lm_head.weight[...].T
  np.testing.assert_allclose(np.asarray(mtp), np.asarray(want), rtol=1e-5, atol=1e-5)
  # swapping the two halves of the concatenation changes the result (the order is tested)
  swapped = jnp.concatenate([layer.hnorm(h[:, :-1]), layer.enorm(tiny.embed(tokens[:, 1:]))], -1)
  assert not np.allclose(np.asarray(x), np.asarray(layer.block(
      swapped @ layer.eh_proj.weight[...].T, pos)[0]), atol=1e-3)


def test_sharded_forward_equals_single_device(tiny):
  assert len(jax.devices()) == 8
  graphdef, params = core.split(tiny)
  tokens = jax.random.randint(jax.random.key(4), (4, 10), 0, tiny.cfg.vocab_size)
  want, _ = core.forward(graphdef, params, tokens)
  mesh = make_mesh(data=2, expert=4)
  sharded = shard_params(params, mesh)
  spec = sharded["moe_layers"]["mlp"]["experts"]["gate_proj"][...].sharding.spec
  assert spec[1] == "expert"
  tokens = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  got, _ = core.forward(graphdef, sharded, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_every_parameter_has_logical_axes(tiny):
  _, state = nnx.split(tiny)
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, path


def test_lowp_product_backward_runs_in_the_operands_dtype():
  """Linear's product: the forward is bf16 × bf16 → f32, unchanged; the backward's transposed
  products take bf16 operands (no float32 GEMM) and match float32 autodiff to bf16 rounding."""
  from dsv3_jax.layers import lowp_product
  ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(ks[0], (64, 256), jnp.bfloat16)
  w = jax.random.normal(ks[1], (128, 256), jnp.bfloat16)
  g = jax.random.normal(ks[2], (64, 128), jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)
  fn = lambda a, b, t: jnp.einsum("mk,nk->mn", a, b, preferred_element_type=t)
  y, pull = jax.vjp(lambda a, b: lowp_product(fn, a, b), x, w)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x, w, jnp.float32)))
  dx, dw = pull(g)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(g @ wf), rtol=1e-2, atol=1e-1)
  np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(g.T @ xf), rtol=1e-2,
                             atol=1e-1)
  jaxpr = jax.make_jaxpr(lambda a, b: jax.vjp(lambda a, b: lowp_product(fn, a, b), a, b)[1](g))(
      x, w)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), dots


def test_remat_holds_for_unstacked_layers():
  """Unstacked layers run unrolled, where XLA's CSE would merge a layer's recomputation with its
  forward pass (keeping every activation: remat undone) unless jax.checkpoint prevents it. The
  backward pass's scratch memory must shrink with remat, as it does for the scanned stack
  (4 layers, 4 × 128 tokens: 35 → 16 MiB on the CPU; 33 MiB when CSE undid the remat)."""
  cfg = load_config(fixture_path("tiny_v3")).replace(num_hidden_layers=4)
  tokens = jax.random.randint(jax.random.key(0), (4, 128), 0, cfg.vocab_size)

  def scratch_bytes(remat):
    model = Transformer(cfg, rngs=nnx.Rngs(0), remat=remat).unstack_layers()
    assert isinstance(model.moe_layers, nnx.List)
    graphdef, params = nnx.split(model)
    loss = lambda p: (nnx.merge(graphdef, p).hidden(tokens)[0] ** 2).mean()
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  saved, remat = scratch_bytes(None), scratch_bytes("nothing_saveable")
  assert remat < 0.6 * saved, (remat, saved)

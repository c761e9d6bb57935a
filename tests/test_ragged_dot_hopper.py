"""The Hopper bf16 grouped matmul (pallas_kernels.ragged_dot_hopper): its custom VJP's wiring on
the CPU with reference kernels injected in place of the Mosaic ones, and the compiled kernels
against jax.lax.ragged_dot on a Hopper GPU (skipped elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.moe import grouped_matmul
from pallas_kernels import ragged_dot_hopper as rdh
from pallas_kernels.fp8_ops import Fp8Backend

ON_HOPPER = (jax.devices()[0].platform == "gpu"
             and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9."))
hopper_only = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (sm90, wgmma)")


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert np.isfinite(x).all()
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _operands(sizes, m, n, k, seed):
  kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (len(sizes), n, k), jnp.float32) * 0.05).astype(jnp.bfloat16)
  dy = jax.random.normal(kd, (m, n), jnp.float32).astype(jnp.bfloat16)
  return x, w, jnp.asarray(sizes, jnp.int32), dy


def _reference(x, w, group_sizes, dy):
  """y and (dx, dw) by autodiff of ragged_dot in float32 on the same (bf16-valued) operands."""
  f = lambda x, w: jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), group_sizes)
  y, vjp = jax.vjp(f, x.astype(jnp.float32), w.astype(jnp.float32))
  return y, vjp(dy.astype(jnp.float32))


def _check(fn, x, w, group_sizes, dy, tol):
  y, vjp = jax.vjp(fn, x, w)
  dx, dw = vjp(dy)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  y_ref, (dx_ref, dw_ref) = _reference(x, w, group_sizes, dy)
  ungrouped = int(np.sum(group_sizes))
  assert not np.asarray(y[ungrouped:], np.float32).any()   # rows past every group: exactly 0
  assert not np.asarray(dx[ungrouped:], np.float32).any()
  for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
    assert _rel(got, ref) < tol


class _Spy:
  """Reference kernels that leave NaN where the Mosaic kernels leave rows unwritten, and record
  how they were called."""

  def __init__(self):
    self.calls = []

  def ragged(self, lhs, rhs, group_sizes, *, transpose_rhs, config):
    self.calls.append(("ragged", lhs.shape, rhs.shape, transpose_rhs, config))
    y = rdh.ragged_reference(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs)
    inside = jnp.arange(lhs.shape[0])[:, None] < jnp.sum(group_sizes)
    return jnp.where(inside, y, jnp.nan)

  def transposed(self, lhs, rhs, group_sizes, *, config):
    self.calls.append(("transposed", lhs.shape, rhs.shape, config))
    return rdh.transposed_reference(lhs, rhs, group_sizes)

  def kernels(self):
    return rdh.Kernels(ragged=self.ragged, transposed=self.transposed)


def test_custom_vjp_matches_autodiff_of_ragged_dot():
  # 300 rows → padded to 384; the groups cover 288 of them (an empty group, a 1-row group)
  sizes = [100, 0, 37, 1, 150]
  x, w, g, dy = _operands(sizes, 300, 128, 256, seed=0)
  spy = _Spy()
  fn = jax.jit(lambda x, w: rdh.ragged_dot_hopper(x, w, g, kernels=spy.kernels()))
  _check(fn, x, w, g, dy, tol=1e-2)
  cfg = rdh.Configs()
  # forward on the padded rows with w as stored; dx with w untransposed; dw through the
  # transposed kernel on (dy, x) (each traced once or more)
  assert set(spy.calls) == {("ragged", (384, 256), (5, 128, 256), True, cfg.fwd),
                       ("ragged", (384, 128), (5, 128, 256), False, cfg.dx),
                       ("transposed", (384, 128), (384, 256), cfg.dw)}


def test_custom_vjp_under_remat_and_scan():
  # the way the model uses it: inside a rematerialised scan body, weights sliced per layer
  sizes = [64, 128, 64]
  x, w, g, dy = _operands(sizes, 256, 128, 128, seed=1)
  ws = jnp.stack([w, w * 0.5])
  kernels = _Spy().kernels()

  def body(h, wl):
    return rdh.ragged_dot_hopper(h, wl, g, kernels=kernels).astype(jnp.bfloat16), None

  def f(x, ws):
    body_ = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(body_, x, ws)[0]

  def f_ref(x, ws):
    step = lambda h, wl: (jax.lax.ragged_dot(h, jnp.swapaxes(wl, 1, 2), g), None)
    return jax.lax.scan(step, x.astype(jnp.float32), ws.astype(jnp.float32))[0]

  loss = lambda f: (lambda x, ws: jnp.sum(f(x, ws).astype(jnp.float32) * dy.astype(jnp.float32)))
  got = jax.jit(jax.grad(loss(f), argnums=(0, 1)))(x, ws)
  ref = jax.grad(loss(f_ref), argnums=(0, 1))(x, ws)
  for a, b in zip(got, ref):
    assert _rel(a, b) < 2e-2


@pytest.mark.parametrize("dtype,n,k", [(jnp.float32, 128, 128), (jnp.bfloat16, 96, 128),
                                       (jnp.bfloat16, 128, 192)])
def test_unsupported_operands_fall_back_to_xla(dtype, n, k):
  spy = _Spy()
  x, w, g, dy = _operands([10, 20], 30, n, k, seed=2)
  x, w = x.astype(dtype), w.astype(dtype)
  assert not rdh.supported(x, w)
  y = rdh.ragged_dot_hopper(x, w, g, kernels=spy.kernels())
  assert spy.calls == [] and y.dtype == dtype
  assert _rel(y, _reference(x, w, g, dy)[0]) < 1e-2


def test_config_validation():
  with pytest.raises(ValueError, match="block_k=48 must be a multiple of 64"):
    rdh.TuningConfig(block_k=48)
  assert rdh.Configs(fwd=rdh.TuningConfig(block_m=64), dw=rdh.TuningConfig(block_k=128)
                     ).row_tile == 128
  x = jnp.zeros((8, 256), jnp.bfloat16)
  assert rdh.supported(x, jnp.zeros((2, 256, 256), jnp.bfloat16),
                       rdh.Configs(fwd=rdh.TuningConfig(block_n=256)))
  assert not rdh.supported(x, jnp.zeros((2, 384, 256), jnp.bfloat16),
                           rdh.Configs(fwd=rdh.TuningConfig(block_n=256)))


def test_grouped_matmul_uses_it_on_compiled_mosaic_only(monkeypatch):
  spy = _Spy()
  monkeypatch.setattr(rdh, "MOSAIC", spy.kernels())
  sizes = [40, 0, 88]
  x, w, g, _ = _operands(sizes, 128, 128, 128, seed=3)
  ref = jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), g, preferred_element_type=jnp.float32)
  for backend, used in [(Fp8Backend("mosaic"), True), (Fp8Backend("mosaic", interpret=True), False),
                        (Fp8Backend("triton"), False), (Fp8Backend("xla"), False), (None, False)]:
    spy.calls.clear()
    y = grouped_matmul(x, w, g, fp8_backend=backend)
    assert bool(spy.calls) == used, backend
    assert y.dtype == jnp.bfloat16 and _rel(y, ref) < 1e-2
  spy.calls.clear()
  grouped_matmul(x.astype(jnp.float32), w, g, fp8_backend=Fp8Backend("mosaic"))  # f32: XLA
  assert spy.calls == []


# ---- compiled on a Hopper GPU -------------------------------------------------------------------
@hopper_only
@pytest.mark.parametrize("sizes,n,k", [
    ([100, 0, 37, 1, 150], 128, 256),        # empty and 1-row groups, ungrouped tail, padded M
    ([512, 1024, 0, 768, 1, 767], 512, 2048),
    ([300] * 8 + [0] * 8, 1408, 2048),       # V2-Lite expert widths, trailing empty groups
])
def test_compiled_matches_ragged_dot(sizes, n, k):
  m = sum(sizes) + 13
  x, w, g, dy = _operands(sizes, m, n, k, seed=m)
  _check(jax.jit(lambda x, w: rdh.ragged_dot_hopper(x, w, g)), x, w, g, dy, tol=1e-2)


@hopper_only
def test_compiled_grouped_matmul_in_model_dispatch():
  from dsv3_jax.moe import Experts, Routing
  from flax import nnx

  ex = Experts(8, 256, 128, rngs=nnx.Rngs(0), std=0.05, param_dtype=jnp.bfloat16,
               fp8_backend=Fp8Backend("mosaic"))
  x = jax.random.normal(jax.random.key(0), (96, 256), jnp.bfloat16)
  experts = jax.random.randint(jax.random.key(1), (96, 2), 0, 8).astype(jnp.int32)
  routing = Routing(jnp.full((96, 2), 0.5), experts, jnp.zeros((96, 8)))
  got = ex(x, routing)
  ex.fp8_backend = Fp8Backend("xla")
  assert _rel(got, ex(x, routing)) < 1e-2

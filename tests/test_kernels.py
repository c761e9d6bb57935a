"""FP8 Pallas kernels against their pure-jnp references: interpret mode on the CPU (Triton and
Mosaic GPU interpreters), compiled on a GPU (skipped elsewhere). Quantization properties, input
validation, and the model's backend dispatch."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from dsv3_jax import Transformer, load_config
from dsv3_jax.layers import Linear
from dsv3_jax.moe import grouped_matmul
from pallas_kernels import fp8_gemm_mosaic as mosaic
from pallas_kernels.act_quant import act_quant, act_quant_reference
from pallas_kernels.fp8_gemm_triton import TuningConfig, fp8_gemm_reference, fp8_gemm_triton
from pallas_kernels.fp8_grouped_gemm_triton import (fp8_grouped_gemm_reference,
                                                    fp8_grouped_gemm_triton, tile_schedule)
from pallas_kernels.fp8_ops import Fp8Backend, resolve_backend
from pallas_kernels.weight_dequant import (weight_dequant, weight_dequant_reference,
                                           weight_quant_reference)

ON_GPU = jax.devices()[0].platform == "gpu"
ON_HOPPER = ON_GPU and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled kernels)")
hopper_only = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (sm90, wgmma)")


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert np.isfinite(x).all()
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _operands(m, n, k, seed=0, groups=None):
  """Fresh random activations and weights, quantized the way DeepSeek's are."""
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32) * 2.0
  a, sa = act_quant_reference(x)
  if groups is None:
    b, sb = weight_quant_reference(jax.random.normal(kw, (n, k), jnp.float32) * 0.05)
  else:
    w = jax.random.normal(kw, (groups, n, k), jnp.float32) * 0.05
    qs = [weight_quant_reference(w[e]) for e in range(groups)]
    b, sb = jnp.stack([q for q, _ in qs]), jnp.stack([s for _, s in qs])
  return a, sa, b, sb


# ---- act_quant / weight_dequant -----------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype,fmt", [((1, 128), jnp.bfloat16, None),
                                             ((5, 256), jnp.float32, "ue8m0"),
                                             ((2, 65, 384), jnp.bfloat16, "ue8m0")])
def test_act_quant_matches_reference(shape, dtype, fmt):
  x = (jax.random.normal(jax.random.key(1), shape) * 3).astype(dtype)
  q, s = act_quant(x, scale_fmt=fmt, interpret=True)
  qr, sr = act_quant_reference(x, fmt)
  assert q.dtype == jnp.float8_e4m3fn and q.shape == shape
  assert s.shape == (*shape[:-1], shape[-1] // 128)
  np.testing.assert_array_equal(np.asarray(s), np.asarray(sr))
  np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(qr, np.float32))


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_act_quant_round_trip_and_scales(fmt):
  x = jax.random.normal(jax.random.key(2), (33, 512)) * jnp.logspace(-3, 2, 512)
  x = x.at[3, 128:256].set(0.0)                                   # an all-zero tile
  q, s = act_quant_reference(x, fmt)
  s_np = np.asarray(s)
  assert np.isfinite(s_np).all() and (s_np > 0).all()
  assert s_np[3, 1] == pytest.approx(1e-4 / 448) if fmt is None else s_np[3, 1] == 2.0 ** -22
  assert not np.asarray(q[3, 128:256], np.float32).any()
  amax = np.abs(np.asarray(x)).reshape(33, 4, 128).max(-1)
  raw = np.maximum(amax, 1e-4) / 448
  if fmt == "ue8m0":
    assert (np.log2(s_np) == np.round(np.log2(s_np))).all()      # powers of two
    assert (s_np >= raw).all() and (s_np < 2 * raw).all()        # the next one up
  else:
    np.testing.assert_allclose(s_np, raw, rtol=1e-6)
  # e4m3 rounds to nearest: |x/s − q| ≤ 2^-4 |x/s| (normals) or 2^-10 (subnormals)
  xs = np.asarray(x).reshape(33, 4, 128) / s_np[..., None]
  err = np.abs(xs - np.asarray(q, np.float32).reshape(33, 4, 128))
  assert (err <= np.maximum(np.abs(xs) * 2.0 ** -4, 2.0 ** -10) * (1 + 1e-6)).all()
  assert np.abs(xs).max() <= 448


def test_weight_quant_round_trip_and_dequant_kernel():
  w = jax.random.normal(jax.random.key(3), (200, 300)) * 0.02
  w = w.at[128:, :128].set(0.0)                                   # an all-zero block
  q, s = weight_quant_reference(w)
  assert s.shape == (2, 3) and np.isfinite(np.asarray(s)).all() and (np.asarray(s) > 0).all()
  deq = weight_dequant(q, s, out_dtype=jnp.float32, interpret=True)
  np.testing.assert_array_equal(np.asarray(deq),
                                np.asarray(weight_dequant_reference(q, s, jnp.float32)))
  assert not np.asarray(deq[128:, :128]).any()
  assert _rel(deq, w) < 0.04                                      # e4m3: ~2^-4 per element


# ---- fp8_gemm (Triton lowering, interpret mode) ----------------------------------------------
@pytest.mark.parametrize("m", [1, 5, 64, 130])
@pytest.mark.parametrize("n", [576, 200, 256])
def test_fp8_gemm_triton_matches_reference(m, n):
  a, sa, b, sb = _operands(m, n, 256, seed=m * 1000 + n)
  got = fp8_gemm_triton(a, sa, b, sb, out_dtype=jnp.float32, interpret=True)
  ref = fp8_gemm_reference(a, sa, b, sb, out_dtype=jnp.float32)
  assert got.shape == (m, n)
  assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("config", [TuningConfig(block_m=32, block_n=256),
                                    TuningConfig(block_m=16, block_n=32, group_m=2)])
def test_fp8_gemm_triton_tilings_and_bf16_output(config):
  a, sa, b, sb = _operands(70, 320, 384, seed=7)
  got = fp8_gemm_triton(a, sa, b, sb, config=config, interpret=True)
  assert got.dtype == jnp.bfloat16
  assert _rel(got, fp8_gemm_reference(a, sa, b, sb, out_dtype=jnp.float32)) < 4e-3


def test_scales_are_applied_per_slab():
  """A GEMM that ignored either scale, or applied one slab's scale to another, fails here."""
  a, sa, b, sb = _operands(16, 128, 256, seed=11)
  sa = sa * jnp.array([1.0, 1000.0])                # very different scales per K slab
  sb = sb * jnp.array([[1000.0, 1.0]])
  got = fp8_gemm_triton(a, sa, b, sb, out_dtype=jnp.float32, interpret=True)
  assert _rel(got, fp8_gemm_reference(a, sa, b, sb, out_dtype=jnp.float32)) < 1e-5


# ---- fp8_gemm (Mosaic GPU lowering, its interpreter on the CPU) -----------------------------
@pytest.mark.parametrize("m,n,k,config", [
    (130, 200, 256, mosaic.TuningConfig()),
    (5, 576, 256, mosaic.TuningConfig(tile_n=64, wg_dimension="n", k_splits=2)),
    (1, 256, 384, None),
])
def test_fp8_gemm_mosaic_interpret_matches_reference(m, n, k, config):
  a, sa, b, sb = _operands(m, n, k, seed=m + n)
  got = mosaic.fp8_gemm_mosaic(a, sa, b, sb, out_dtype=jnp.float32, config=config,
                               interpret=True)
  assert got.shape == (m, n)
  assert _rel(got, fp8_gemm_reference(a, sa, b, sb, out_dtype=jnp.float32)) < 1e-5


def _rowwise_operands(m, n, k, seed, groups=None, hot_col=None):
  """Wgrad-style operands: both quantized per row along K (per channel per 128 tokens). With
  hot_col, row hot_col of B (a column of C) is 1e6 times larger: its scales differ from its
  128-row block's other rows by ~1e6, so one scale per 128 rows of B would flush them."""
  lead = () if groups is None else (groups,)
  ka, kb = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(ka, (*lead, m, k), jnp.float32)
  y = jax.random.normal(kb, (*lead, n, k), jnp.float32)
  if hot_col is not None:
    y = y.at[..., hot_col, :].multiply(1e6)
  return (*act_quant_reference(x), *act_quant_reference(y))


@pytest.mark.parametrize("m,n,k,groups,config,hot", [
    (128, 192, 384, None, None, 5),                                   # a hot column of C
    (136, 72, 512, None, mosaic.TuningConfig(k_splits=2), None),     # ragged M and N, split K
    (64, 256, 256, 3, mosaic.TuningConfig(tile_n=64, wg_dimension="n"), None),   # groups
])
def test_fp8_rowwise_gemm_mosaic_interpret_matches_reference(m, n, k, groups, config, hot):
  a, sa, b, sb = _rowwise_operands(m, n, k, seed=m + n + k, groups=groups, hot_col=hot)
  got = mosaic.fp8_rowwise_gemm_mosaic(a, sa, b, sb, config=config, interpret=True)
  want = mosaic.fp8_rowwise_gemm_reference(a, sa, b, sb)
  assert got.shape == want.shape == ((groups,) if groups else ()) + (m, n)
  assert got.dtype == jnp.float32
  if hot is None:
    assert _rel(got, want) < 1e-5
    return
  cold = np.arange(n) != hot
  assert _rel(np.asarray(got)[:, cold], np.asarray(want)[:, cold]) < 1e-5
  assert _rel(got[:, hot], want[:, hot]) < 1e-5
  # the data can tell: one scale per 128 rows of B (the largest) loses the cold columns
  padded = jnp.pad(sb, ((0, -n % 128), (0, 0)))
  block_sb = jnp.repeat(padded.reshape(-1, 128, sb.shape[-1]).max(1), 128, axis=0)[:n]
  wrong = mosaic.fp8_rowwise_gemm_reference(a, sa, b, block_sb)
  assert _rel(np.asarray(wrong)[:, cold], np.asarray(want)[:, cold]) > 1.0


@pytest.mark.parametrize("e,m,n,k", [(3, 128, 192, 256), (2, 72, 136, 384)])
def test_fp8_gemm_mosaic_batched_interpret_matches_reference(e, m, n, k):
  kx, kw = jax.random.split(jax.random.key(e + m))
  a, sa = act_quant_reference(2.0 * jax.random.normal(kx, (e, m, k)))
  b, sb = weight_quant_reference(0.05 * jax.random.normal(kw, (e, n, k)))
  got = mosaic.fp8_gemm_mosaic_batched(a, sa, b, sb, out_dtype=jnp.float32, interpret=True)
  want = mosaic.fp8_gemm_mosaic_batched_reference(a, sa, b, sb, out_dtype=jnp.float32)
  assert got.shape == (e, m, n)
  assert _rel(got, want) < 1e-5
  # each group multiplies its own weight: group 1 against group 0's weight is far off
  assert _rel(got[1], fp8_gemm_reference(a[1], sa[1], b[0], sb[0], out_dtype=jnp.float32)) > 0.5


def test_mosaic_batched_and_rowwise_reject_bad_operands():
  a, sa, b, sb = _rowwise_operands(64, 64, 256, seed=0, groups=2)
  with pytest.raises(ValueError, match="sb.shape"):
    mosaic.fp8_rowwise_gemm_mosaic(a, sa, b, sb[..., :1], interpret=True)
  with pytest.raises(ValueError, match="the K axes"):
    mosaic.fp8_rowwise_gemm_mosaic(a[0], sa[0], b[0, :, :128], sb[0, :, :1], interpret=True)
  with pytest.raises(ValueError, match="groups"):
    mosaic.fp8_rowwise_gemm_mosaic(a, sa, b[:1], sb[:1], interpret=True)
  wq, ws = weight_quant_reference(jnp.ones((2, 64, 256)))
  with pytest.raises(ValueError, match="sb.shape"):
    mosaic.fp8_gemm_mosaic_batched(a, sa, wq, ws[:, :, :1], interpret=True)


# ---- grouped ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes,n", [([3, 0, 20, 7], 200), ([40, 0, 0, 90], 576), ([0, 1, 0, 0], 64)])
def test_fp8_grouped_gemm_triton_matches_reference(sizes, n):
  a, sa, b, sb = _operands(sum(sizes), n, 256, seed=sum(sizes), groups=len(sizes))
  g = jnp.array(sizes, jnp.int32)
  got = fp8_grouped_gemm_triton(a, sa, b, sb, g, out_dtype=jnp.float32, interpret=True)
  assert _rel(got, fp8_grouped_gemm_reference(a, sa, b, sb, g, out_dtype=jnp.float32)) < 1e-5


def test_tile_schedule_covers_every_row_once():
  sizes = jnp.array([5, 0, 33, 1, 0, 16], jnp.int32)
  g, row0, end, valid = map(np.asarray, tile_schedule(sizes, 55, 16))
  covered = np.zeros(55, int)
  for t in np.flatnonzero(valid):
    rows = np.arange(row0[t], min(row0[t] + 16, end[t]))
    covered[rows] += 1
    starts = np.cumsum(sizes) - sizes
    assert starts[g[t]] <= row0[t] < end[t] == np.cumsum(sizes)[g[t]]
  assert (covered == 1).all()


# ---- validation -------------------------------------------------------------------------------
def test_bad_operands_raise_value_errors_naming_them():
  a, sa, b, sb = _operands(4, 256, 256)
  with pytest.raises(ValueError, match="k=200"):
    fp8_gemm_triton(a[:, :200], sa, b[:, :200], sb, interpret=True)
  with pytest.raises(ValueError, match="a.dtype"):
    fp8_gemm_triton(a.astype(jnp.bfloat16), sa, b, sb, interpret=True)
  with pytest.raises(ValueError, match="b.dtype"):
    fp8_gemm_triton(a, sa, b.astype(jnp.bfloat16), sb, interpret=True)
  with pytest.raises(ValueError, match="sa.shape"):
    fp8_gemm_triton(a, sa[:, :1], b, sb, interpret=True)
  with pytest.raises(ValueError, match="sb.shape"):
    fp8_gemm_triton(a, sa, b, sb[:1], interpret=True)
  with pytest.raises(ValueError, match="sb.dtype"):
    fp8_gemm_triton(a, sa, b, sb.astype(jnp.bfloat16), interpret=True)
  with pytest.raises(ValueError, match="n=252"):
    mosaic.fp8_gemm_mosaic(a, sa, b[:252], sb, interpret=True)
  with pytest.raises(ValueError, match="group_sizes.shape"):
    fp8_grouped_gemm_triton(a, sa, b[None], sb[None], jnp.array([2, 2]), interpret=True)
  with pytest.raises(ValueError, match=r"x.shape"):
    act_quant(jnp.ones((2, 100)), interpret=True)
  with pytest.raises(ValueError, match="scale_fmt"):
    act_quant(jnp.ones((2, 128)), scale_fmt="e8m0", interpret=True)
  with pytest.raises(ValueError, match="scale_inv.shape"):
    weight_dequant(b, sb[:, :1], interpret=True)
  with pytest.raises(ValueError, match="fp8_backend"):
    resolve_backend("cublas")


# ---- dispatch: Linear, grouped_matmul, Transformer ------------------------------------------
def test_backend_resolution_on_this_platform():
  auto = resolve_backend("auto")
  if not ON_GPU:
    assert auto == Fp8Backend("xla")
    assert resolve_backend("triton") == Fp8Backend("triton", interpret=True)
    assert resolve_backend("mosaic", scale_fmt="ue8m0").scale_fmt == "ue8m0"
  else:
    assert auto.kind == ("mosaic" if ON_HOPPER else "triton") and not auto.interpret


@pytest.mark.parametrize("kind", ["triton", "mosaic"])
def test_linear_runs_the_kernel_on_quantized_activations(kind):
  backend = resolve_backend(kind)
  lin = Linear(256, 200, axes=("a", "b"), rngs=nnx.Rngs(0), std=0.05, fp8=True,
               fp8_backend=backend)
  x = jax.random.normal(jax.random.key(5), (2, 3, 256))
  y = lin(x)
  a, sa = act_quant_reference(x.reshape(6, 256))
  ref = fp8_gemm_reference(a, sa, lin.weight[...], lin.weight_scale_inv[...],
                           out_dtype=jnp.float32).reshape(2, 3, 200)
  assert y.shape == (2, 3, 200) and y.dtype == x.dtype
  assert _rel(y, ref) < (5e-4 if ON_GPU else 1e-5)   # see _check_compiled
  # the XLA path multiplies unquantized activations: close, but not the same function
  assert 1e-4 < _rel(y, _with_backend(lin, Fp8Backend())(x)) < 0.05


def _with_backend(lin, backend):
  graphdef, state = nnx.split(lin)
  clone = nnx.merge(graphdef, state)
  clone.fp8_backend = backend
  return clone


def test_grouped_matmul_dispatch():
  a_f = jax.random.normal(jax.random.key(6), (30, 128))
  _, _, b, sb = _operands(30, 136, 128, groups=3)
  sizes = jnp.array([10, 0, 20], jnp.int32)
  got = grouped_matmul(a_f, b, sizes, sb, resolve_backend("triton"))
  a, sa = act_quant_reference(a_f)
  ref = fp8_grouped_gemm_reference(a, sa, b, sb, sizes, out_dtype=jnp.float32)
  assert _rel(got, ref) < (5e-4 if ON_GPU else 1e-5)
  xla = grouped_matmul(a_f, b, sizes, sb)
  assert 1e-4 < _rel(got, xla) < 0.05


def test_transformer_fp8_backend_is_explicit_and_logged(caplog):
  cfg = load_config(fixture_path("tiny_v3")).replace(
      hidden_size=128, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128,
      kv_lora_rank=128, qk_nope_head_dim=32, v_head_dim=32, num_hidden_layers=2)
  tokens = jax.random.randint(jax.random.key(8), (1, 4), 0, cfg.vocab_size)
  outs = {}
  for kind in ("xla", "triton"):
    with caplog.at_level(logging.INFO, logger="dsv3_jax.model"):
      model = Transformer(cfg, rngs=nnx.Rngs(0), fp8=True, fp8_backend=kind)
    assert f"resolved to {resolve_backend(kind)}" in caplog.text
    assert model.moe_layers.mlp.experts.fp8_backend == resolve_backend(kind)
    outs[kind] = np.asarray(model(tokens))
  # Same weights; only the online activation quantization differs (a few % per projection,
  # compounding, and it can flip a routing choice), so this only shows the kernels ran.
  assert 1e-4 < _rel(outs["triton"], outs["xla"]) < 0.3


# ---- compiled, on a GPU ---------------------------------------------------------------------
def _check_compiled(fn, m, n, k, seed, **kw):
  # Within a 128-K slab the tensor cores accumulate FP8 products with ~14 mantissa bits
  # (DeepSeek-V3 report, 3.3.2), hence 5e-4 rather than float32's 1e-5 in interpret mode.
  a, sa, b, sb = _operands(m, n, k, seed=seed)
  out = fn(a, sa, b, sb, out_dtype=jnp.float32, **kw)
  assert _rel(out, fp8_gemm_reference(a, sa, b, sb, out_dtype=jnp.float32)) < 5e-4
  out16 = fn(a, sa, b, sb, **kw)
  assert out16.dtype == jnp.bfloat16
  assert _rel(out16, fp8_gemm_reference(a, sa, b, sb, out_dtype=jnp.float32)) < 4e-3


@gpu_only
@pytest.mark.parametrize("m,n,k", [(1, 576, 7168), (5, 200, 256), (64, 2112, 1536),
                                   (130, 256, 512), (4096, 1024, 2048)])
def test_fp8_gemm_triton_compiled(m, n, k):
  _check_compiled(fp8_gemm_triton, m, n, k, seed=m + n + k)
  q, s = act_quant(jax.random.normal(jax.random.key(m), (m, k)), scale_fmt="ue8m0")
  qr, sr = act_quant_reference(jax.random.normal(jax.random.key(m), (m, k)), "ue8m0")
  np.testing.assert_array_equal(np.asarray(s), np.asarray(sr))
  np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(qr, np.float32))


@hopper_only
@pytest.mark.parametrize("m,n,k", [(1, 576, 7168), (5, 200, 256), (64, 2112, 1536),
                                   (130, 256, 512), (4096, 1024, 2048), (64, 24576, 1536)])
def test_fp8_gemm_mosaic_compiled(m, n, k):
  _check_compiled(mosaic.fp8_gemm_mosaic, m, n, k, seed=m + n + k)


@hopper_only
def test_fp8_gemm_mosaic_compiled_split_k_and_wg_n():
  for cfg in [mosaic.TuningConfig(tile_n=32, wg_dimension="n", k_splits=4),
              mosaic.TuningConfig(tile_n=128, wg_dimension="n", max_concurrent_steps=3)]:
    _check_compiled(mosaic.fp8_gemm_mosaic, 17, 640, 1024, seed=3, config=cfg)


@hopper_only
@pytest.mark.parametrize("m,n,k,groups", [(512, 1024, 16384, None), (2816, 1024, 4096, None),
                                          (136, 200, 640, None), (512, 1024, 5120, 4)])
def test_fp8_rowwise_gemm_mosaic_compiled(m, n, k, groups):
  # the tensor cores' FP8 accumulation within a slab (see _check_compiled)
  a, sa, b, sb = _rowwise_operands(m, n, k, seed=m + k, groups=groups)
  got = mosaic.fp8_rowwise_gemm_mosaic(a, sa, b, sb)
  assert _rel(got, mosaic.fp8_rowwise_gemm_reference(a, sa, b, sb)) < 5e-4


@hopper_only
def test_fp8_gemm_mosaic_batched_compiled():
  kx, kw = jax.random.split(jax.random.key(4))
  a, sa = act_quant_reference(2.0 * jax.random.normal(kx, (16, 640, 1024)))
  b, sb = weight_quant_reference(0.05 * jax.random.normal(kw, (16, 512, 1024)))
  got = mosaic.fp8_gemm_mosaic_batched(a, sa, b, sb, out_dtype=jnp.float32)
  want = mosaic.fp8_gemm_mosaic_batched_reference(a, sa, b, sb, out_dtype=jnp.float32)
  assert _rel(got, want) < 5e-4


@gpu_only
def test_fp8_grouped_gemm_triton_compiled():
  sizes = [300, 0, 17, 1, 700]
  a, sa, b, sb = _operands(sum(sizes), 576, 1024, groups=len(sizes))
  g = jnp.array(sizes, jnp.int32)
  got = fp8_grouped_gemm_triton(a, sa, b, sb, g, out_dtype=jnp.float32)
  assert _rel(got, fp8_grouped_gemm_reference(a, sa, b, sb, g, out_dtype=jnp.float32)) < 5e-4

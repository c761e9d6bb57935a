"""DeepSeekMoE: dense MLP, router (sigmoid/softmax, group-limited, aux-loss-free bias) and the
dropless routed experts, dispatched by sorting tokens by expert into one grouped matmul.

The grouped matmul (`grouped_matmul`) is the only place that touches the expert weights: the
FP8 grouped kernel and the expert-parallel (all-to-all) version replace it there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.balance import routing_stats
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import (Linear, _normal, dequantize_blocks, lowp_product, param,
                             quantize_blocks)
from dsv3_jax.remat import EXPERT_MATMUL, EXPERT_ROWS
from pallas_kernels.fp8_ops import Fp8Backend, fp8_grouped_linear
from pallas_kernels.fp8_train_ops import (fp8_train_grouped, fp8_train_grouped_aligned,
                                          to_aligned_rows)
from pallas_kernels.moe_gemv import moe_swiglu_gemv
from pallas_kernels.ragged_dot_hopper import ragged_dot_hopper, supported as ragged_dot_supported

_RAGGED_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())),  # x [M, K] · w [E, N, K] over K
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)


class MLP(nnx.Module):
  """SwiGLU MLP: down(silu(gate(x)) · up(x)). x: [..., D] → [..., D]."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, std: float,
               param_dtype=jnp.float32, fp8: bool = False, fp8_backend: Fp8Backend | None = None):
    lin = dict(rngs=rngs, std=std, param_dtype=param_dtype, fp8=fp8, fp8_backend=fp8_backend)
    self.gate_proj = Linear(dim, hidden, axes=("mlp", "embed"), **lin)
    self.up_proj = Linear(dim, hidden, axes=("mlp", "embed"), **lin)
    self.down_proj = Linear(hidden, dim, axes=("embed", "mlp"), **lin)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclasses.dataclass(frozen=True)
class Routing:
  """Router output for M tokens. weights [M, K] f32, experts [M, K] int32, scores [M, E] f32
  (unbiased affinities, for the balance loss)."""

  weights: jax.Array
  experts: jax.Array
  scores: jax.Array


class Router(nnx.Module):
  """The MoE gate (`mlp.gate`): weight [E, D] (never FP8) and, for V3, the aux-loss-free
  `e_score_correction_bias` [E] that only selects experts, never weights them."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.cfg = cfg
    e = cfg.n_routed_experts
    self.weight = param(_normal(rngs, (e, cfg.hidden_size), cfg.initializer_range, param_dtype),
                        ("expert", "embed"))
    self.e_score_correction_bias = (param(jnp.zeros((e,), jnp.float32), ("expert",))
                                    if cfg.has_correction_bias else None)

  def __call__(self, x: jax.Array) -> Routing:
    """x: [M, D] → Routing. All routing math in float32."""
    cfg = self.cfg
    logits = jnp.einsum("md,ed->me", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, -1)
    choice = scores
    if self.e_score_correction_bias is not None:
      choice = scores + self.e_score_correction_bias[...].astype(jnp.float32)
    if cfg.n_group > 1:
      m = x.shape[0]
      grouped = choice.reshape(m, cfg.n_group, -1)
      if cfg.group_scoring == "top2_sum":
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
      else:
        group_score = grouped.max(-1)
      keep = jax.lax.top_k(group_score, cfg.topk_group)[1]  # [M, topk_group]
      group_mask = jnp.zeros((m, cfg.n_group), bool).at[jnp.arange(m)[:, None], keep].set(True)
      choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(m, -1)
    experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)[1]
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
      weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores)


def inverse_permutation(order: jax.Array) -> jax.Array:
  """inv with inv[order[i]] = i. order: [N] int, a permutation of 0..N-1 → [N]."""
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype),
                                             unique_indices=True)


@jax.custom_vjp
def _take_rows(x: jax.Array, idx: jax.Array, inv: jax.Array) -> jax.Array:
  """x[idx] for a permutation idx of x's rows (inv: its inverse). Its transpose is the gather
  g[inv], where autodiff would scatter g into zeros: a zero fill plus a scatter that no consumer
  can fuse, against a gather that fuses into the next reduction. Exact (data movement only)."""
  return x.at[idx].get(unique_indices=True)


def _take_rows_fwd(x, idx, inv):
  return _take_rows(x, idx, inv), (idx, inv)


def _take_rows_bwd(res, g):
  idx, inv = res
  return g.at[inv].get(unique_indices=True), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def permute_rows(x: jax.Array, order: jax.Array, k: int, inverse: jax.Array) -> jax.Array:
  """Rows of x, each repeated k times, in `order` (a permutation of M·K): x [M, D] → [M·K, D],
  row i = x[order[i] // k]. A gather of unique rows of the repeated x, whose backward pass
  gathers by the inverse permutation (`inverse`, from inverse_permutation) and sums the k copies:
  neither an atomic scatter-add of k duplicates per token (XLA:GPU's slowest pattern here) nor
  a scatter into zeros."""
  return _take_rows(jnp.repeat(x, k, axis=0), order, inverse)


def unpermute_rows(ys: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
  """The inverse of permute_rows' ordering: y[order[i]] = ys[i], written as the gather
  y = ys[inverse] (forward and backward both gathers)."""
  return _take_rows(ys, inverse, order)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   scale_inv: jax.Array | None = None,
                   fp8_backend: Fp8Backend | None = None) -> jax.Array:
  """Rows of x sorted by group times their group's weight: y[i] = x[i] · w[g(i)]ᵀ.

  Args:
    x: [M, K] rows sorted by group; group g owns group_sizes[g] consecutive rows.
    w: [E, N, K] per-group weights (e4m3 when scale_inv is given).
    group_sizes: [E] int32, summing to M.
    scale_inv: optional [E, ceil(N/128), ceil(K/128)] FP8 block scales.
    fp8_backend: with FP8 weights, "triton"/"mosaic" run the grouped FP8 Pallas kernel on
      activations quantized per 1×128 tile; "xla" (default) dequantizes the weights. With
      high-precision weights and a `training` backend: the FP8 training recipe
      (pallas_kernels.fp8_train_ops.fp8_train_grouped). bf16 x on a compiled "mosaic" backend
      (Hopper) runs the Mosaic bf16 grouped matmul (pallas_kernels.ragged_dot_hopper); elsewhere
      jax.lax.ragged_dot.
  Returns:
    [M, N] in x.dtype (float32 accumulation), tagged `remat.EXPERT_MATMUL` (a remat policy can
    keep it: the kernels are not dots).
  """
  return checkpoint_name(_grouped_matmul(x, w, group_sizes, scale_inv, fp8_backend),
                         EXPERT_MATMUL)


def _grouped_matmul(x, w, group_sizes, scale_inv, fp8_backend):
  if scale_inv is None and fp8_backend is not None and fp8_backend.training:
    return fp8_train_grouped(x, w, group_sizes, backend=fp8_backend)
  if (scale_inv is not None and fp8_backend is not None and fp8_backend.kind != "xla"
      and x.shape[-1] % 128 == 0):
    return fp8_grouped_linear(x, w, scale_inv, group_sizes, backend=fp8_backend)
  if scale_inv is not None:
    w = dequantize_blocks(w, scale_inv, x.dtype)
  if (fp8_backend is not None and fp8_backend.kind == "mosaic" and not fp8_backend.interpret
      and x.dtype == jnp.bfloat16 and ragged_dot_supported(x, w)):
    return ragged_dot_hopper(x, w, group_sizes)  # XLA:GPU's ragged_dot is 10-30x slower
  y = lowp_product(lambda a, b, t, gs: jax.lax.ragged_dot_general(a, b, gs, _RAGGED_DIMS,
                                                                  preferred_element_type=t),
                   x, w.astype(x.dtype), group_sizes)
  return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LayerOfStack:
  """A parameter value standing for layer `index` of a stacked [L, ...] parameter, inside
  scan_layers' loop: indexing reads that layer (a dynamic slice, as scanning would), while a
  kernel can take the whole stack and the index and read the layer in place (XLA copies a
  slice before it reaches a custom call)."""

  stack: jax.Array
  index: jax.Array

  @property
  def shape(self):
    return self.stack.shape[1:]

  def __getitem__(self, idx):
    return jax.lax.dynamic_index_in_dim(self.stack, self.index, keepdims=False)[idx]


GEMV_WEIGHTS = ("gate_proj", "up_proj", "down_proj", "gate_proj_scale_inv", "up_proj_scale_inv",
                "down_proj_scale_inv")


class Experts(nnx.Module):
  """E routed SwiGLU experts with stacked weights (checkpoint `mlp.experts.{e}.*` stacked on E):
  gate_proj, up_proj [E, F, D]; down_proj [E, D, F]; FP8 adds `*_scale_inv` block scales.

  `gemv` (Transformer.use_expert_gemv; GPU decoding): few rows run through the expert-indexed
  GEMV kernel (pallas_kernels.moe_gemv) rather than XLA's gather. Inside a scanned stack
  (`scan_layers`) the kernel gets the whole stacked weight and the layer index (LayerOfStack),
  so that it reads the chosen experts in place.
  """

  gemv: bool = False
  gemv_min_rows: int = 2    # fewer tokens keep XLA's fused gather (see takes_gemv)

  def __init__(self, num: int, dim: int, hidden: int, *, rngs: nnx.Rngs, std: float,
               param_dtype=jnp.float32, fp8: bool = False, fp8_backend: Fp8Backend | None = None):
    self.num_experts = num
    self.fp8_backend = fp8_backend or Fp8Backend()
    shapes = {"gate_proj": ((num, hidden, dim), ("expert", "mlp", "embed")),
              "up_proj": ((num, hidden, dim), ("expert", "mlp", "embed")),
              "down_proj": ((num, dim, hidden), ("expert", "embed", "mlp"))}
    for name, (shape, axes) in shapes.items():
      w = _normal(rngs, shape, std, jnp.float32)
      if fp8:
        q, s = quantize_blocks(w)
        setattr(self, name, param(q, axes))
        setattr(self, name + "_scale_inv", param(s, axes))
      else:
        setattr(self, name, param(w.astype(param_dtype), axes))
        setattr(self, name + "_scale_inv", None)

  def _mm(self, x, name, group_sizes):
    scale = getattr(self, name + "_scale_inv")
    return grouped_matmul(x, getattr(self, name)[...], group_sizes,
                          None if scale is None else scale[...], self.fp8_backend)

  def __call__(self, x: jax.Array, routing: Routing) -> jax.Array:
    """Dropless dispatch: every token reaches all of its K experts.

    Few rows (M·K ≤ E, decoding): each row's expert weights are gathered and contracted in one
    fused pass that reads only the chosen experts, or with `gemv` (2+ tokens) read in place by
    the GEMV kernels. More rows: tokens are sorted by expert into one grouped matmul.

    Args:
      x: [M, D] tokens; routing: their top-K experts and weights.
    Returns:
      [M, D] = Σ_k weights[m, k] · E_{experts[m, k]}(x[m]).
    """
    m, k = routing.experts.shape
    fp8_training = self.quantizes_online
    if m * k <= self.num_experts and not fp8_training:
      return self._gemv(x, routing) if self.takes_gemv(m, k) else self._gathered(x, routing)
    flat = routing.experts.reshape(-1)                     # [M·K] expert of each (token, slot)
    order = jnp.argsort(flat, stable=True)                 # sort (token, slot) pairs by expert
    group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
    inverse = inverse_permutation(order)
    xs = checkpoint_name(permute_rows(x, order, k, inverse),  # [M·K, D] in expert order
                         EXPERT_ROWS)
    if fp8_training:
      ys = self._fp8_training(xs, group_sizes)
    else:
      h = jax.nn.silu(self._mm(xs, "gate_proj", group_sizes)) * self._mm(xs, "up_proj",
                                                                          group_sizes)
      ys = self._mm(h, "down_proj", group_sizes)           # [M·K, D]
    y = unpermute_rows(ys, order, inverse).reshape(m, k, -1)  # back to (token, slot) order
    return jnp.einsum("mkd,mk->md", y.astype(jnp.float32), routing.weights).astype(x.dtype)


  def _fp8_training(self, xs, group_sizes):
    """The three projections under the FP8 training recipe, on rows laid out once in the
    128-aligned contiguous layout (each expert's rows padded to a multiple of 128, so that the
    weight gradient's 128-token tiles never straddle two experts). xs: [R, D] sorted rows."""
    xp, sizes, dest = to_aligned_rows(xs, group_sizes)
    mm = lambda a, name: fp8_train_grouped_aligned(a, getattr(self, name)[...], sizes,
                                                   backend=self.fp8_backend)
    h = jax.nn.silu(mm(xp, "gate_proj")) * mm(xp, "up_proj")   # padding rows stay zero
    return mm(h, "down_proj")[dest]

  @property
  def quantizes_online(self) -> bool:
    """FP8 training: float master weights quantized in every step (the sorted path only)."""
    return self.fp8_backend.training and self.gate_proj_scale_inv is None

  def takes_gathered(self, m: int, k: int) -> bool:
    """Whether M tokens of K experts each take XLA's fused gather (`_gathered`): few rows
    (M·K ≤ E), not the GEMV kernels, not FP8 training."""
    return m * k <= self.num_experts and not self.quantizes_online and not self.takes_gemv(m, k)

  def takes_gemv(self, m: int, k: int) -> bool:
    """Whether M tokens of K experts each go through the GEMV kernels: `gemv` is on, few rows
    (M·K ≤ E) but at least `gemv_min_rows` tokens (default 2: for one token XLA's fused gather
    was as fast, 293 vs 287 tok/s for V2-Lite on an H100, docs/benchmarks.md), and D, F whole
    128-wide slabs."""
    widths = (self.gate_proj.shape[-1], self.down_proj.shape[-1])
    return (self.gemv and self.gemv_min_rows <= m and m * k <= self.num_experts
            and all(w % 128 == 0 for w in widths))

  def _gemv(self, x, routing):
    """Few rows: the chosen experts' weights are read in place by two kernel launches
    (pallas_kernels.moe_gemv.moe_swiglu_gemv)."""
    m, k = routing.experts.shape
    ids = routing.experts.reshape(-1).astype(jnp.int32)
    names = ("gate_proj", "up_proj", "down_proj")
    values = [getattr(self, n).get_value() for n in names]
    scales = None
    if self.gate_proj_scale_inv is not None:
      scales = [getattr(self, n + "_scale_inv").get_value() for n in names]
    if isinstance(values[0], LayerOfStack):   # the whole stack as [L·E, ...], ids + l·E
      ids = ids + values[0].index * self.num_experts
      flat = lambda v: v.stack.reshape(-1, *v.stack.shape[2:])
      values = [flat(v) for v in values]
      scales = None if scales is None else [flat(v) for v in scales]
    y = moe_swiglu_gemv(x, ids, *values, None if scales is None else tuple(scales), k=k,
                        h_dtype=x.dtype, interpret=jax.devices()[0].platform != "gpu")
    y = y.sum(0).reshape(m, k, -1)                                 # [M, K, D] float32
    return jnp.einsum("mkd,mk->md", y, routing.weights).astype(x.dtype)

  def gathered_weight(self, name: str, experts: jax.Array) -> jax.Array:
    """The weights `name` of the experts `experts` [M, K] as float32 [M, K, ...] (dequantized
    if FP8): a gather that XLA fuses into the reduction that reads it."""
    # expert ids come from top_k, so in range: "clip" is XLA's native gather (the default
    # "fill" adds an in-bounds mask, one more kernel per layer)
    w = jnp.take(getattr(self, name)[...], experts, axis=0, mode="clip")  # [M, K, ...]
    scale = getattr(self, name + "_scale_inv")
    if scale is not None:
      w = dequantize_blocks(w, jnp.take(scale[...], experts, axis=0, mode="clip"), jnp.float32)
    return w.astype(jnp.float32)

  def _gathered(self, x, routing):
    w = lambda name: self.gathered_weight(name, routing.experts)
    return swiglu_by_reduction(x, w("gate_proj"), w("up_proj"), w("down_proj"), routing.weights)


def swiglu_by_reduction(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                        weights: jax.Array) -> jax.Array:
  """Σ_k weights[m, k] · down_k(silu(gate_k x_m) · up_k x_m) for few rows, each product a
  multiply + reduce (not a dot): XLA fuses the weights' gathers into the reductions on every
  backend, so only the chosen experts are read.

  Args:
    x: [M, D]; gate, up: [M, K, F, D] and down: [M, K, D, F] float32; weights: [M, K].
  Returns:
    [M, D] in x's dtype; each expert's output is rounded to it before the weighted sum, like
    the sorted path's.
  """
  xf = x.astype(jnp.float32)[:, None, None, :]
  h = jax.nn.silu((xf * gate).sum(-1)) * (xf * up).sum(-1)
  h = h.astype(x.dtype).astype(jnp.float32)  # round like the sorted path's bf16 activations
  y = (h[:, :, None, :] * down).sum(-1).astype(x.dtype)  # [M, K, D]
  return jnp.einsum("mkd,mk->md", y.astype(jnp.float32), weights).astype(x.dtype)


class MoE(nnx.Module):
  """Routed experts (weighted, scaled) + shared experts (unweighted). x: [B, T, D] → [B, T, D].

  `dispatch(experts, x [M, D], routing) → [M, D]` applies the routed experts; None: the local
  sorted dispatch (`Experts.__call__`). Expert parallelism passes an
  `expert_parallel.ExpertParallel` here.

  `merge_shared` (Transformer.use_merged_shared; decoding): one token whose routed experts take
  XLA's fused gather reads the shared experts in the same two reductions, as S more experts of
  width F (the shared MLP's hidden layer split in S = hidden / F parts) with weight 1, instead
  of three more projections and an add.
  """

  merge_shared: bool = False

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               fp8: bool = False, fp8_backend: Fp8Backend | None = None, dispatch=None):
    std = cfg.initializer_range
    self.dispatch = dispatch
    kw = dict(rngs=rngs, std=std, param_dtype=param_dtype, fp8=fp8, fp8_backend=fp8_backend)
    self.gate = Router(cfg, rngs=rngs, param_dtype=param_dtype)
    self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                           **kw)
    self.shared_experts = (MLP(cfg.hidden_size, cfg.shared_intermediate_size, **kw)
                           if cfg.n_shared_experts else None)

  def __call__(self, x: jax.Array, *, with_aux: bool = False):
    """x: [B, T, D] → y [B, T, D], or (y, balance.RoutingStats) with `with_aux`."""
    shape = x.shape
    xt = x.reshape(-1, shape[-1])
    routing = self.gate(xt)
    if self.takes_merged_shared(xt.shape[0]):
      y = self._merged_shared(xt, routing)
    else:
      y = (self.experts(xt, routing) if self.dispatch is None
           else self.dispatch(self.experts, xt, routing))
      if self.shared_experts is not None:
        y = y + self.shared_experts(xt)
    if not with_aux:
      return y.reshape(shape)
    stats = routing_stats(routing.scores.reshape(*shape[:-1], -1),
                          routing.experts.reshape(*shape[:-1], -1), self.experts.num_experts)
    return y.reshape(shape), stats

  def takes_merged_shared(self, m: int) -> bool:
    """Whether M tokens take `merge_shared`'s path: it is on, one token, the local dispatch's
    fused gather (not the GEMV kernels, not FP8 training), and a shared hidden width that is
    a whole number of expert widths."""
    ex, sh = self.experts, self.shared_experts
    return (self.merge_shared and m == 1 and sh is not None and self.dispatch is None
            and ex.takes_gathered(m, self.gate.cfg.num_experts_per_tok)
            and sh.gate_proj.out_features % ex.gate_proj.shape[-2] == 0)

  def _merged_shared(self, x, routing):
    """One token's routed and shared experts in one gathered pass (merge_shared)."""
    ex, sh = self.experts, self.shared_experts
    f, d = ex.gate_proj.shape[-2], x.shape[-1]
    s = sh.gate_proj.out_features // f

    def both(name, shared):
      return jnp.concatenate([ex.gathered_weight(name, routing.experts), shared[None]], axis=1)

    dense = lambda lin: lin.dense_weight(jnp.float32)
    gate = both("gate_proj", dense(sh.gate_proj).reshape(s, f, d))
    up = both("up_proj", dense(sh.up_proj).reshape(s, f, d))
    down = both("down_proj", dense(sh.down_proj).reshape(d, s, f).transpose(1, 0, 2))
    weights = jnp.concatenate([routing.weights, jnp.ones((1, s), routing.weights.dtype)], axis=1)
    return swiglu_by_reduction(x, gate, up, down, weights)


def dense_moe_reference(moe: MoE, x: jax.Array) -> jax.Array:
  """Every expert on every token, combined with the router's top-K weights (zero elsewhere).
  A slow, obviously-correct reference for the sorted dispatch. x: [M, D] → [M, D]."""
  ex = moe.experts
  routing = moe.gate(x)
  dense_w = jnp.zeros((x.shape[0], ex.num_experts), jnp.float32).at[
      jnp.arange(x.shape[0])[:, None], routing.experts].add(routing.weights)

  def weight(name):
    s = getattr(ex, name + "_scale_inv")
    w = getattr(ex, name)[...]
    return (dequantize_blocks(w, s[...], jnp.float32) if s is not None else w).astype(jnp.float32)

  xf = x.astype(jnp.float32)
  h = jax.nn.silu(jnp.einsum("md,efd->mef", xf, weight("gate_proj"))) * jnp.einsum(
      "md,efd->mef", xf, weight("up_proj"))
  y = jnp.einsum("mef,edf->med", h, weight("down_proj"))
  out = jnp.einsum("med,me->md", y, dense_w)
  if moe.shared_experts is not None:
    out = out + moe.shared_experts(xf)
  return out

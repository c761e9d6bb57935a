"""The training step: objectives, AdamW with warmup + cosine, aux-loss-free balancing.

    graphdef, state = init_train_state(cfg, optim, seed=0, mesh=mesh, expert_dispatch=ep)
    step = make_train_step(graphdef, optim, Objective(), state_shardings(state))
    state, metrics = step(state, tokens)            # tokens: [B, T + 1] int32

Loss = CE(next token) + λ/D·Σ_k CE_k (MTP, depth D) + α·Σ_layers Σ_i f_i·P_i (sequence-wise
balance). After the update every MoE layer's correction bias moves by γ·sign(mean load −
load_i), outside the gradient. Parameters are float32 masters; the model computes in bf16
(weights are cast where they are used, or once per step with `cast_weights_once`; routing,
norms and softmax stay float32). AdamW's moments are float32 or bf16
(`OptimizerConfig.moment_dtype`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from dsv3_jax.balance import balance_loss, load_imbalance, update_biases
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer
from dsv3_jax.sharding import TRAIN_RULES, param_shardings


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
  """Loss weights (DeepSeek-V3 report: λ = 0.3 early, 0.1 later; α = 1e-4; γ = 1e-3)."""

  mtp_lambda: float = 0.3
  balance_alpha: float = 1e-4
  bias_gamma: float = 1e-3


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  """AdamW, linear warmup to `lr` then cosine decay to lr·min_lr_ratio at total_steps.

  moment_dtype: storage of AdamW's first and second moments, "float32" or "bfloat16" (half the
  optimizer state; the update is computed in float32 either way, see `stored_in`).
  """

  lr: float = 3e-4
  warmup_steps: int = 100
  total_steps: int = 1000
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  moment_dtype: str = "float32"  # "bfloat16" as in the DeepSeek-V3 report, §3.3.3


def lr_schedule(oc: OptimizerConfig) -> optax.Schedule:
  warmup = min(oc.warmup_steps, max(oc.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=oc.lr, warmup_steps=warmup,
      decay_steps=max(oc.total_steps, warmup + 1), end_value=oc.lr * oc.min_lr_ratio)


def _is_matrix(var) -> bool:
  """Whether a parameter is a matrix (or a stack of them), not counting a leading "layers" axis:
  the RMSNorm weights of a scanned stack, [L, D], are vectors like those of an unstacked layer."""
  if not isinstance(var, nnx.Variable):
    return var.ndim >= 2
  axes = var.get_metadata().get("out_sharding") or ()
  return var.get_value().ndim - (axes[:1] == ("layers",)) >= 2


def stored_in(dtype, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` with the floating-point arrays of its state stored in `dtype`: every update reads
  them as float32, runs `inner` on those and rounds its new state to `dtype` once. For AdamW
  that is the moments mu and nu (its counts are integers); the arithmetic stays float32.

  (optax.adamw(mu_dtype=bfloat16) covers mu only, and computes b1·mu in bfloat16 before adding
  the float32 gradient term: one more rounding per step.)
  """
  cast = lambda tree, to: jax.tree.map(
      lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(lambda params: cast(inner.init(params), dtype), update)


def make_optimizer(oc: OptimizerConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; weight decay on matrices only (not norms); moments
  stored in `oc.moment_dtype` (float32: optax's AdamW as it is)."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  decay_mask = lambda params: jax.tree.map(
      lambda v: v.replace(_is_matrix(v)) if is_var(v) else _is_matrix(v), params, is_leaf=is_var)
  adamw = optax.adamw(lr_schedule(oc), b1=oc.b1, b2=oc.b2, eps=oc.eps,
                      weight_decay=oc.weight_decay, mask=decay_mask)
  dtype = jnp.dtype(oc.moment_dtype)
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"OptimizerConfig.moment_dtype={oc.moment_dtype!r} must be 'float32' or "
                     "'bfloat16'")
  if dtype != jnp.float32:
    adamw = stored_in(dtype, adamw)
  return optax.chain(optax.clip_by_global_norm(oc.clip_norm), adamw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a step reads and writes (and a checkpoint holds).

  step: [] int32. params: float32 trainable parameters (nnx.State). biases: the MoE correction
  biases (nnx.State; moved by the balancing rule, never by the optimizer). opt_state: optax
  state (AdamW's moments in OptimizerConfig.moment_dtype). rng: [2] uint32 key, split every
  step (kept for stochastic objectives; the current objective draws nothing from it).
  """

  step: jax.Array
  params: nnx.State
  biases: nnx.State
  opt_state: Any
  rng: jax.Array


def _is_bias(path, _value) -> bool:
  return path[-1] == "e_score_correction_bias"


def split_model(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, correction biases, trainable params)."""
  graphdef, biases, params, rest = nnx.split(model, _is_bias, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"the model holds non-parameter state the trainer does not know: {rest}")
  return graphdef, biases, params


def init_train_state(cfg: ModelConfig, oc: OptimizerConfig, *, seed: int = 0,
                     mesh: Mesh | None = None, rules=TRAIN_RULES, unstack_layers: bool = False,
                     **model_kw):
  """A fresh TrainState, created directly in its sharded layout when a mesh is given.

  Args:
    unstack_layers: give every decoder layer arrays of its own (`Transformer.unstack_layers`):
      the step then runs the layers unrolled instead of under lax.scan (no per-layer slicing
      of the stacks, no stacking of residuals and weight gradients; compile time grows with
      depth). Parameter paths gain the layer index: ("moe_layers", i, ...) for
      ("moe_layers", ...)[i]; values and the step's results are the same.
    model_kw: Transformer arguments (dtype, expert_dispatch, remat, cast_weights_once);
      parameters are float32.
  Returns:
    (graphdef, TrainState).
  """
  def make():
    model = Transformer(cfg, rngs=nnx.Rngs(seed), param_dtype=jnp.float32, **model_kw)
    return model.unstack_layers(free=False) if unstack_layers else model

  graphdef, b_abs, p_abs = split_model(nnx.eval_shape(make))
  optimizer = make_optimizer(oc)

  def init():
    _, biases, params = split_model(make())
    return params, biases

  out = None
  if mesh is not None:
    out = (param_shardings(p_abs, mesh, rules), param_shardings(b_abs, mesh, rules))
  params, biases = jax.jit(init, out_shardings=out)()
  opt_state = jax.jit(optimizer.init)(params)  # moments inherit the parameters' shardings
  state = TrainState(jnp.zeros((), jnp.int32), params, biases, opt_state,
                     jax.random.PRNGKey(seed))
  if mesh is not None:  # scalars (step, counts, key) replicated over the mesh
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
                         else jax.device_put(x, rep), state)
  return graphdef, state


def state_shardings(state: TrainState):
  """The shardings of a (concrete) TrainState, to pin a step's outputs to its inputs' layout."""
  return jax.tree.map(lambda x: x.sharding, state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _label_logits(logits: jax.Array, labels: jax.Array, vocab: int) -> jax.Array:
  """logits[..., labels]: [..., V], [...] → [...]. Its backward is g·[v = label], which fuses
  into the softmax gradient; autodiff of the gather would scatter g into a zero [B, T, V] float32
  buffer (a fill and a re-read of the largest tensor of the step, per head). Same values."""
  del vocab
  return jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]


def _label_logits_fwd(logits, labels, vocab):
  return _label_logits(logits, labels, vocab), labels


def _label_logits_bwd(vocab, labels, g):
  hit = jax.lax.broadcasted_iota(labels.dtype, (*labels.shape, vocab), labels.ndim) == (
      labels[..., None])
  return jnp.where(hit, g[..., None], jnp.zeros((), g.dtype)), None


_label_logits.defvjp(_label_logits_fwd, _label_logits_bwd)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token CE (optax.softmax_cross_entropy_with_integer_labels' arithmetic).
  logits: [B, T, V] float32; targets: [B, T] int."""
  ce = jax.nn.logsumexp(logits, axis=-1) - _label_logits(logits, targets, logits.shape[-1])
  return ce.mean()


def loss_fn(params, biases, graphdef, tokens, obj: Objective):
  """tokens: [B, T + 1] → (loss, (metrics, aux)). aux: the model's routing statistics."""
  model = nnx.merge(graphdef, biases, params)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  h, _, moe_stats = model.hidden(inputs, with_aux=True)
  ce = cross_entropy(model.head(h), targets)
  mtp_logits, mtp_stats = model.mtp_logits(h, inputs, with_aux=True)
  # depth k at position i predicts token i + k + 1, i.e. targets[:, i + k]
  mtp_ces = [cross_entropy(lg, targets[:, k:]) for k, lg in enumerate(mtp_logits, start=1)]
  aux = {"moe_layers": moe_stats, "mtp": mtp_stats}
  mtp_ce = sum(mtp_ces) / len(mtp_ces) if mtp_ces else jnp.zeros((), jnp.float32)
  mtp_loss = obj.mtp_lambda * mtp_ce
  bal = obj.balance_alpha * balance_loss(aux)
  loss = ce + mtp_loss + bal
  metrics = {"loss": loss, "ce": ce, "mtp_ce": mtp_ce, "mtp_loss": mtp_loss,
             "balance_loss": bal, "load_imbalance": load_imbalance(aux)}
  return loss, (metrics, aux)


def make_train_step(graphdef: nnx.GraphDef, oc: OptimizerConfig, obj: Objective = Objective(),
                    shardings=None, donate: bool = True):
  """A jitted `step(state, tokens [B, T + 1]) → (state, metrics)`.

  Args:
    shardings: the TrainState's shardings (outputs are pinned to them); None: XLA's choice.
  """
  optimizer = make_optimizer(oc)
  schedule = lr_schedule(oc)

  def step(state: TrainState, tokens: jax.Array):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (metrics, aux)), grads = grad_fn(state.params, state.biases, graphdef, tokens, obj)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    biases = update_biases(state.biases, aux, obj.bias_gamma)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    new = TrainState(state.step + 1, params, biases, opt_state, jax.random.split(state.rng)[0])
    return new, metrics

  return jax.jit(step, donate_argnums=(0,) if donate else (),
                 out_shardings=None if shardings is None else (shardings, None))


def make_eval_step(graphdef: nnx.GraphDef, obj: Objective = Objective()):
  """A jitted `eval(state, tokens [B, T + 1]) → metrics` (no update)."""

  def evaluate(state: TrainState, tokens):
    _, (metrics, _) = loss_fn(state.params, state.biases, graphdef, tokens, obj)
    return metrics

  return jax.jit(evaluate)

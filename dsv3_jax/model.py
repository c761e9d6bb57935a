"""The DeepSeek-V3 model: embedding, scanned dense and MoE decoder stacks, final norm, head, MTP.

Each group of identical layers (the first_k_dense_replace dense layers, then the MoE layers) is
one module whose parameters carry a leading [L] axis (built with nnx.vmap), applied with
jax.lax.scan, so compile time does not grow with depth. For decoding on GPUs,
`Transformer.unstack_layers` turns the stacks into lists of layers with arrays of their own,
applied one after another: Pallas kernels then read their weights in place, where a slice of
the scanned stack would be copied first. Training can use them too
(`train_step.init_train_state(unstack_layers=True)`): no stacking of residuals and weight
gradients into [L] buffers in the backward pass.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.cache import Cache, LayerCache
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Embed, Linear, RMSNorm
from dsv3_jax.mla import MLA, AttnMode
from dsv3_jax.moe import GEMV_WEIGHTS, MLP, Experts, LayerOfStack, MoE
from dsv3_jax.remat import policy as remat_policy
from pallas_kernels.fp8_ops import Fp8Backend, resolve_backend

log = logging.getLogger(__name__)

STACKS = ("dense_layers", "moe_layers")  # the Transformer's scanned layer groups


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)). x: [B, T, D] → [B, T, D]."""

  def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs, param_dtype=jnp.float32,
               fp8: bool = False, fp8_backend: Fp8Backend | None = None, expert_dispatch=None,
               attn_impl: str | None = None):
    kw = dict(rngs=rngs, param_dtype=param_dtype, fp8=fp8, fp8_backend=fp8_backend)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = MLA(cfg, attn_impl=attn_impl, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                            param_dtype=param_dtype)
    self.mlp = (MoE(cfg, dispatch=expert_dispatch, **kw) if moe else
                MLP(cfg.hidden_size, cfg.intermediate_size, std=cfg.initializer_range, **kw))

  def __call__(self, x, positions, cache: LayerCache | None = None, mode: AttnMode = "full",
               layer=None, *, with_aux: bool = False):
    """Returns (x, cache), or (x, cache, RoutingStats | None for a dense layer) with `with_aux`."""
    h, cache = self.self_attn(x, positions, cache, mode, layer, norm=self.input_layernorm)
    x = x + h
    if not with_aux:
      return x + self.mlp(self.post_attention_layernorm(x)), cache
    if isinstance(self.mlp, MoE):
      y, stats = self.mlp(self.post_attention_layernorm(x), with_aux=True)
    else:
      y, stats = self.mlp(self.post_attention_layernorm(x)), None
    return x + y, cache, stats


def _stack(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module | None:
  """n copies of a module with parameters stacked on a leading 'layers' axis (None if n == 0)."""
  if n == 0:
    return None

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(r):
    return make(r)

  return build(rngs)


def scan_layers(layers: nnx.Module | nnx.List, x, positions, cache: LayerCache | None,
                mode: AttnMode, *, with_aux: bool = False, remat: str | None = None,
                cast_to=None):
  """Applies a group of DecoderLayers: a stacked module with lax.scan over its leading axis, or
  an nnx.List of layers with their own arrays (`Transformer.unstack_layers`) one after another.

  The stacked cache rides in the scan carry and each layer scatters only its new tokens into
  it, so a decode step never copies the cache.

  Args:
    layers: a module built by _stack, or an nnx.List of DecoderLayers;
      cache: LayerCache with a leading [L] axis, or None.
    with_aux: also return the layers' routing statistics, stacked on [L] (None for dense).
    remat: rematerialise each layer in the backward pass with this policy (`remat.policy`:
      a `jax.checkpoint_policies` name such as "nothing_saveable", or "dots_and_kernels");
      None saves every activation.
    cast_to: cast the weights of the layers' 16-bit products to this dtype once, before the
      loop and outside remat (`cast_product_weights`); None: each product casts its own.
  Returns:
    (x [B, T, D], the updated stacked cache or None), plus the stats with `with_aux`.
  """
  if cast_to is not None:
    layers = cast_product_weights(layers, cast_to)

  def make_body(graphdef):
    def body(carry, inputs):
      h, c = carry
      layer_state, i = inputs
      out = nnx.merge(graphdef, layer_state)(h, positions, c, mode, None if c is None else i,
                                             with_aux=with_aux)
      return out[:2], (out[2] if with_aux else None)

    if remat is not None:
      # Inside lax.scan nothing can merge the recomputation with the forward pass; unrolled
      # (a list of layers), XLA's CSE would, and keep every activation alive (remat undone).
      body = jax.checkpoint(body, policy=remat_policy(remat),
                            prevent_cse=isinstance(layers, nnx.List))
    return body

  whole = (set() if remat is not None or isinstance(layers, nnx.List)
           else _whole_in_place(layers, x.shape[0] * x.shape[1], x.dtype))
  if whole:
    (x, cache), stats = _scan_with_whole(layers, x, cache, make_body, whole)
  elif isinstance(layers, nnx.List):
    carry, stats = (x, cache), []
    for i, layer in enumerate(layers):
      graphdef, state = nnx.split(layer)
      carry, s = make_body(graphdef)(carry, (state, i))
      stats.append(s)
    (x, cache) = carry
    stats = jax.tree.map(lambda *a: jnp.stack(a), *stats) if with_aux else None
  else:
    graphdef, state = nnx.split(layers)
    n = jax.tree.leaves(state)[0].shape[0]
    (x, cache), stats = jax.lax.scan(make_body(graphdef), (x, cache), (state, jnp.arange(n)))
  return ((x, cache, stats) if with_aux else (x, cache))


def cast_product_weights(module: nnx.Module, dtype) -> nnx.Module:
  """A copy of `module` whose `Linear` and routed-expert weights are already in `dtype` (the
  compute dtype their products cast them to), i.e. one cast per array instead of one per use.

  For training with float32 masters (`Transformer(cast_weights_once=True)`): applied to the
  decoder stacks and MTP blocks before their loop, the forward pass, the remat recomputation
  and the backward pass read 16-bit weights, and each weight's gradient leaves through this
  one cast. Bit-identical when every weight so cast is used once per step (true of these
  modules): its cotangent is then one `dtype` value either way; a weight used twice would
  have its 16-bit cotangents summed in `dtype` instead of float32, so the shared embedding and
  head are never passed here. FP8 weights are left alone: e4m3 storage, and the FP8 training
  recipe, which quantizes from the float32 master (`fp8_backend.training`). Norms and the
  router compute in float32 and keep their weights. So do the routed experts of a dispatch over
  several devices (expert_parallel.ExpertParallel): shard_map's transpose sums the gradients of
  weights replicated over its batch axes in the dtype they enter with, float32 today where
  check_vma is off (kernel backends).
  """
  if jnp.dtype(dtype) == jnp.float32:
    return module
  paths, kept = set(), set()
  for path, node in nnx.iter_graph(module):
    if isinstance(node, Linear) and node.weight_scale_inv is None and not (
        node.fp8_backend.training):
      paths.add((*path, "weight"))
    if isinstance(node, Experts) and node.gate_proj_scale_inv is None and not (
        node.fp8_backend.training):
      paths |= {(*path, name) for name in ("gate_proj", "up_proj", "down_proj")}
    if isinstance(node, MoE) and getattr(getattr(node.dispatch, "mesh", None), "size", 1) > 1:
      kept.add((*path, "experts"))
  graphdef, state = nnx.split(module)
  cast = lambda p: tuple(p) in paths and tuple(p[:-1]) not in kept
  flat = [(p, v.replace(value=v.get_value().astype(dtype)) if cast(p) else v)
          for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _whole_in_place(layers: nnx.Module, rows: int, dtype) -> set[tuple]:
  """Paths (in the stacked state) of the parameters that this call's kernels read in place
  from the whole stack: the routed experts' weights when `Experts.takes_gemv`, the weights of
  every `Linear` that `takes_gemv` for these rows of activations in `dtype`, the input norm and
  the q/kv_a projections when the attention `takes_fused_input`, and kv_b_proj's when its MLA
  `takes_absorb_kernel`."""
  whole = set()
  experts = getattr(getattr(layers, "mlp", None), "experts", None)
  if experts is not None and experts.takes_gemv(rows, layers.mlp.gate.cfg.num_experts_per_tok):
    whole |= {("mlp", "experts", name) for name in GEMV_WEIGHTS}
  for path, node in nnx.iter_graph(layers):
    if isinstance(node, Linear) and node.takes_gemv(rows, dtype):
      whole |= {(*path, "weight"), (*path, "weight_scale_inv")}
    if isinstance(node, DecoderLayer) and node.self_attn.takes_fused_input(rows, dtype):
      whole.add((*path, "input_layernorm", "weight"))
      for lin in ("q_proj", "q_a_proj", "kv_a_proj_with_mqa"):
        if getattr(node.self_attn, lin) is not None:
          whole |= {(*path, "self_attn", lin, "weight"),
                    (*path, "self_attn", lin, "weight_scale_inv")}
    if isinstance(node, MLA) and node.takes_absorb_kernel(rows):
      whole |= {(*path, "kv_b_proj", "weight"), (*path, "kv_b_proj", "weight_scale_inv")}
  return whole


def _scan_with_whole(layers, x, cache, make_body, whole: set[tuple]):
  """lax.scan over the stack, except that the parameters at the paths `whole` stay whole
  (constants of the loop) and each layer sees them as LayerOfStack(stack, i): the GEMV kernels
  then read layer i in place (XLA would copy a slice of the stack before a kernel reads it)."""
  graphdef, state = nnx.split(layers)
  flat = list(nnx.to_flat_state(state))
  is_whole = lambda path: tuple(path) in whole
  kept = [(p, v) for p, v in flat if is_whole(p)]
  sliced = nnx.from_flat_state([(p, v) for p, v in flat if not is_whole(p)])
  n = jax.tree.leaves(state)[0].shape[0]
  inner = make_body(graphdef)

  def body(carry, inputs):
    part, i = inputs
    items = list(nnx.to_flat_state(part)) + [
        (p, v.replace(value=LayerOfStack(v.get_value(), i))) for p, v in kept]
    return inner(carry, (nnx.from_flat_state(items), i))

  return jax.lax.scan(body, (x, cache), (sliced, jnp.arange(n)))


def _unstack(stacked: nnx.Module, free: bool) -> nnx.List:
  """The layers of a _stack module as separate modules, each holding its own arrays (slices of
  the stacked ones, which are deleted one parameter at a time when `free`)."""
  graphdef, state = nnx.split(stacked)
  n = jax.tree.leaves(state)[0].shape[0]
  is_var = lambda v: isinstance(v, nnx.Variable)
  per_layer = [[] for _ in range(n)]
  variables = jax.tree.leaves(state, is_leaf=is_var)
  for var in variables:
    value = var.get_value()
    meta = var.get_metadata()
    names = meta.get("out_sharding")
    kw = {"out_sharding": tuple(names[1:])} if names else {}
    for i in range(n):
      per_layer[i].append(var.replace(value=value[i], **kw))
    if free and isinstance(value, jax.Array):
      value.delete()
  treedef = jax.tree.structure(state, is_leaf=is_var)
  return nnx.List([nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
                   for leaves in per_layer])


def restacked_arrays(state: nnx.State) -> dict[tuple, jax.Array]:
  """{path: array} of a model state in the scanned layout, whichever layout it has: the layers
  of `Transformer.unstack_layers` are stacked back under the scanned paths, ("moe_layers", i,
  *rest) → index i of ("moe_layers", *rest); other paths are unchanged. For exporting and
  comparing states (the arrays are stacked with jnp.stack, on the device they live on).

  Raises:
    ValueError: if a stack's unstacked layers are not numbered 0..n-1.
  """
  out, layers = {}, {}
  for path, var in nnx.to_flat_state(state):
    if path[0] in STACKS and len(path) > 1 and isinstance(path[1], int):
      layers.setdefault((path[0], *path[2:]), {})[path[1]] = var.get_value()
    else:
      out[path] = var.get_value()
  for path, by_index in layers.items():
    if sorted(by_index) != list(range(len(by_index))):
      raise ValueError(f"{'/'.join(map(str, path))}: unstacked layers {sorted(by_index)} are "
                       f"not numbered 0..{len(by_index) - 1}")
    out[path] = jnp.stack([by_index[i] for i in range(len(by_index))])
  return out


class MTPLayer(nnx.Module):
  """One multi-token-prediction module (checkpoint layer index num_hidden_layers + k).

  h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]) → a full MoE decoder block → shared_head.norm
  → the main model's head. Embedding and head are shared with the main model.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               fp8: bool = False, fp8_backend: Fp8Backend | None = None, expert_dispatch=None,
               attn_impl: str | None = None):
    d = cfg.hidden_size
    self.enorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.hnorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.eh_proj = Linear(2 * d, d, axes=("embed", "embed2"), rngs=rngs,
                          std=cfg.initializer_range, param_dtype=param_dtype)
    self.block = DecoderLayer(cfg, moe=cfg.n_routed_experts > 0, rngs=rngs,
                              param_dtype=param_dtype, fp8=fp8, fp8_backend=fp8_backend,
                              expert_dispatch=expert_dispatch, attn_impl=attn_impl)
    self.shared_head_norm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

  def __call__(self, h_prev, emb_next, positions, cache: LayerCache | None = None,
               mode: AttnMode = "full", *, with_aux: bool = False):
    """h_prev: [B, T, D] previous depth's hidden (the main model's AFTER its final norm);
    emb_next: [B, T, D] embeddings of the tokens one step ahead. Returns (block output
    [B, T, D] before shared_head.norm, cache), plus the block's RoutingStats with `with_aux`."""
    x = self.eh_proj(jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1))
    return self.block(x, positions, cache, mode, with_aux=with_aux)


class Transformer(nnx.Module):
  """DeepSeek-V3 causal LM. `model(tokens [B, T])` → logits [B, T, V] float32.

  Args:
    cfg: the architecture.
    rngs: parameter initialisation.
    param_dtype: storage dtype of non-FP8 parameters.
    dtype: activation (compute) dtype.
    fp8: store attention/MLP/expert projections as e4m3 + 128×128 block scales
      (default: cfg.fp8, i.e. the checkpoint has a quantization_config).
    fp8_backend: how FP8 projections run: "auto" (Mosaic kernels on Hopper, Triton kernels on
      other FP8-capable CUDA GPUs, else "xla"), "xla" (dequantize, then matmul), "triton" or
      "mosaic" (see pallas_kernels.fp8_ops). Resolved once here and logged.
    fp8_training: DeepSeek-V3's FP8 training recipe (pallas_kernels.fp8_train_ops): the
      attention, dense-MLP and expert projections keep high-precision weights and run every
      GEMM of forward and backward on e4m3 operands quantized online, through `fp8_backend`
      (kernels on FP8-capable GPUs, the float32 emulation "xla" elsewhere; on TPU it falls back
      to bf16 GEMMs, with a logged note). Embedding, head, router, eh_proj, norms and the
      attention core stay high precision. Excludes `fp8`.
    expert_dispatch: how MoE layers apply their routed experts (see moe.MoE; e.g.
      expert_parallel.ExpertParallel); None: the local sorted dispatch.
    remat: a remat policy name applied per decoder layer (training; `remat.policy`: a
      `jax.checkpoint_policies` name or "dots_and_kernels"); None: off.
    attn_impl: the full-form attention of every layer (see mla.MLA; "cudnn" for training on
      NVIDIA GPUs); None: the einsum form.
    cast_weights_once: (training with float32 masters and a 16-bit `dtype`) cast the weights of
      the decoder layers' and MTP blocks' products to `dtype` once per call, before their loop
      and outside remat, instead of at every use (`cast_product_weights`; bit-identical). The
      embedding and head, shared with the MTP blocks, keep their per-use casts.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=jnp.float32, fp8: bool | None = None, fp8_backend: str = "auto",
               fp8_training: bool = False,
               expert_dispatch=None, remat: str | None = None, attn_impl: str | None = None,
               cast_weights_once: bool = False):
    fp8 = cfg.fp8 if fp8 is None else fp8
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.cast_weights_once = cast_weights_once
    if fp8 and fp8_training:
      raise ValueError("fp8=True (e4m3 weights, inference) and fp8_training=True (the training "
                       "recipe over high-precision weights) exclude each other")
    if fp8_training and jax.devices()[0].platform == "tpu":
      log.warning("fp8_training: TPU has no FP8 block-scaled GEMMs here; training in bf16")
      fp8_training = False
    backend = resolve_backend(fp8_backend, scale_fmt=cfg.quantization.scale_fmt
                              if cfg.quantization is not None else None, training=fp8_training)
    if fp8:
      log.info("FP8 projections: fp8_backend=%r resolved to %s", fp8_backend, backend)
    elif fp8_training:
      log.info("FP8 training recipe: fp8_backend=%r resolved to %s", fp8_backend, backend)
    else:
      log.info("bf16/f32 projections (fp8=False): fp8_backend=%r unused", fp8_backend)
    kw = dict(param_dtype=param_dtype, fp8=fp8, fp8_backend=backend,
              expert_dispatch=expert_dispatch, attn_impl=attn_impl)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                              std=cfg.initializer_range, param_dtype=param_dtype)
    self.dense_layers = _stack(cfg.num_dense_layers,
                               lambda r: DecoderLayer(cfg, moe=False, rngs=r, **kw), rngs)
    self.moe_layers = _stack(cfg.num_moe_layers,
                             lambda r: DecoderLayer(cfg, moe=True, rngs=r, **kw), rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("vocab", "embed"), rngs=rngs,
                          std=cfg.initializer_range, param_dtype=param_dtype)
    self.mtp = nnx.List([MTPLayer(cfg, rngs=rngs, **kw)
                         for _ in range(cfg.num_nextn_predict_layers)])

  def use_expert_gemv(self, on: bool | None = None, *, min_rows: int | None = None
                      ) -> "Transformer":
    """Routed experts of few rows (decoding) run through the expert-indexed GEMV kernel
    (pallas_kernels.moe_gemv; interpret mode off GPUs) instead of XLA's gather, reading the
    chosen experts in place (scanned stacks hand it the whole stacked weight and the layer
    index). Default: on GPUs. `min_rows`: fewer tokens keep the gather (`Experts.gemv_min_rows`;
    None leaves it). For inference (not under jax.checkpoint). Returns self."""
    if on is None:
      on = jax.devices()[0].platform == "gpu"
    layers = list(self.moe_layers) if isinstance(self.moe_layers, nnx.List) else [self.moe_layers]
    for layer in layers + [m.block for m in self.mtp]:
      if layer is not None and isinstance(layer.mlp, MoE):
        layer.mlp.experts.gemv = on
        if min_rows is not None:
          layer.mlp.experts.gemv_min_rows = min_rows
    return self

  def use_merged_shared(self, on: bool | None = None) -> "Transformer":
    """One decoding token reads its shared experts in the routed experts' fused gather (as S
    more experts, `MoE.merge_shared`) instead of in three projections of their own. `on`
    None: on GPUs. Rounding differs from the separate path (one weighted sum). For inference.
    Returns self."""
    return self._switch(MoE, "merge_shared", on)

  def use_fused_input(self, on: bool | None = None) -> "Transformer":
    """Each attention block's input RMSNorm and its q (or q_a) and kv_a projections run in one
    GEMV launch for at most 16 decoding rows (`MLA.fuse_input`; needs `use_dense_gemv`'s
    kernels on). `on` None: on GPUs. Rounding of the norm's mean differs from XLA's (summation
    order). For inference. Returns self."""
    return self._switch(MLA, "fuse_input", on)

  def use_dense_gemv(self, on: bool | None = None) -> "Transformer":
    """Projections (`Linear`) of at most 16 rows (decoding) run through the GEMV kernel
    (pallas_kernels.gemv; interpret mode off GPUs) instead of XLA's dot or the FP8 GEMM; in a
    scanned stack it reads each layer's weight in place. Covers attention, shared and dense
    MLPs, MTP's eh_proj and the output head. Default: on GPUs. For inference. Returns self."""
    return self._switch(Linear, "gemv", on)

  def use_attention_kernel(self, on: bool | None = None) -> "Transformer":
    """Absorbed attention of at most 16 query rows (decoding) runs through the MLA decode
    kernel (pallas_kernels.mla_decode; interpret mode off GPUs), which reads each layer's rows
    of the stacked cache in place and only the slots up to each query's position. `on` None:
    on GPUs. generate.Engine leaves it off unless asked (attention_kernel=True): on an H100 it
    helped at batch 8 and slowed bf16 batch 1 (docs/benchmarks.md, decode round 5). Returns
    self."""
    return self._switch(MLA, "decode_kernel", on)

  def use_absorb_kernel(self, on: bool | None = None) -> "Transformer":
    """The W_UK absorption of at most 16 decoding query rows runs through
    pallas_kernels.mla_absorb (interpret mode off GPUs), reading kv_b_proj's weight in place
    (in a scanned stack: the whole stack at the layer index). `on` None: on GPUs. For
    inference. Returns self."""
    return self._switch(MLA, "absorb_kernel", on)

  def _switch(self, kind: type, flag: str, on: bool | None) -> "Transformer":
    """Sets `flag` to `on` (None: on GPUs) on every `kind` module of the model."""
    if on is None:
      on = jax.devices()[0].platform == "gpu"
    for _, node in nnx.iter_graph(self):
      if isinstance(node, kind):
        setattr(node, flag, on)
    return self

  def unstack_layers(self, *, free: bool = True) -> "Transformer":
    """Turns the scanned layer stacks into lists of layers with arrays of their own.

    Inside lax.scan every weight is a slice of its stack, and XLA copies such a slice before a
    Pallas kernel reads it; layers with their own arrays are read in place. The price: layers
    are traced one by one, so compile time grows with depth (V2-Lite bf16 on an H100: 180 s
    before the first token, against about 30 s scanned). Values are unchanged.

    Args:
      free: delete each stacked array once it is split (peak memory: one parameter more);
        other holders of the stacked arrays (an earlier nnx.split) become unusable.
    Returns:
      self, changed in place.
    """
    for name in STACKS:
      layers = getattr(self, name)
      if layers is not None and not isinstance(layers, nnx.List):
        setattr(self, name, _unstack(layers, free))
    return self

  # ---- pieces ---------------------------------------------------------------------------------
  def embed(self, tokens: jax.Array) -> jax.Array:
    return self.embed_tokens(tokens, self.dtype)

  def head(self, h: jax.Array) -> jax.Array:
    """h: [B, T, D] (already normed) → logits [B, T, V] float32."""
    return self.lm_head(h, out_dtype=jnp.float32)

  def hidden(self, tokens, positions=None, cache: Cache | None = None,
             mode: AttnMode = "full", *, with_aux: bool = False):
    """The main model's last hidden state AFTER the final RMSNorm.

    Args:
      tokens: [B, T] int token ids; positions: [B, T] (default 0..T-1).
      cache: a Cache to write (and, in "absorbed" mode, to attend over), or None.
      with_aux: also return the MoE layers' routing statistics (training).
    Returns:
      (h [B, T, D], the updated cache or None), plus with `with_aux` the RoutingStats of the
      MoE stack (stacked on [L], None without MoE layers).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = self.embed(tokens)
    new_dense = new_moe = stats = None
    run = dict(with_aux=with_aux, remat=self.remat,
               cast_to=self.dtype if self.cast_weights_once else None)
    if self.dense_layers is not None:
      x, new_dense, *_ = scan_layers(self.dense_layers, x, positions,
                                     None if cache is None else cache.dense, mode, **run)
    if self.moe_layers is not None:
      x, new_moe, *rest = scan_layers(self.moe_layers, x, positions,
                                      None if cache is None else cache.moe, mode, **run)
      stats = rest[0] if with_aux else None
    if cache is not None:
      cache = Cache(dense=new_dense, moe=new_moe, mtp=cache.mtp)
    return (self.norm(x), cache, stats) if with_aux else (self.norm(x), cache)

  def mtp_logits(self, h: jax.Array, tokens: jax.Array, positions=None, *,
                 with_aux: bool = False):
    """Training-time MTP predictions (full attention, no cache).

    Args:
      h: [B, T, D] main hidden after the final norm; tokens: [B, T].
      with_aux: also return each MTP block's RoutingStats (training).
    Returns:
      one array per depth k = 1..num_nextn_predict_layers: [B, T-k, V] float32, whose position
      i predicts token i+k+1; with `with_aux`, (that list, a tuple of RoutingStats per depth).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    out, stats = [], []
    b, t = tokens.shape
    for k, layer in enumerate(self.mtp, start=1):
      if t <= k:  # nothing to predict that far ahead
        if with_aux:
          raise ValueError(f"MTP depth {k} needs sequences longer than {k} tokens, got {t}")
        out.append(jnp.zeros((b, 0, self.cfg.vocab_size), jnp.float32))
        continue
      if self.cast_weights_once:
        layer = cast_product_weights(layer, self.dtype)
      h, _, *aux = layer(h[:, :-1], self.embed(tokens[:, k:]), positions[:, :-k],
                         with_aux=with_aux)
      stats += aux
      out.append(self.head(layer.shared_head_norm(h)))
    return (out, tuple(stats)) if with_aux else out

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """tokens: [B, T] → logits [B, T, V] float32."""
    h, _ = self.hidden(tokens, positions)
    return self.head(h)

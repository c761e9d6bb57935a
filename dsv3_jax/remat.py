"""Rematerialisation policies for training, and the names that let a policy keep the outputs
of work that is not an XLA dot.

`jax.checkpoint_policies.dots_with_no_batch_dims_saveable` keeps the results of dot_generals
only. Everything else in a layer is recomputed in the backward pass, including the expensive
work that is not a dot: the routed experts' grouped matmuls (Pallas kernels or ragged_dot), the
fused attention (a cuDNN custom call) and the expert-ordered token rows (a gather, and on
expert-parallel meshes an all-to-all). The model tags those values with `checkpoint_name`
(names in SAVED_NAMES), and the policy "dots_and_kernels" keeps them too:

  dots_and_kernels = dots_with_no_batch_dims_saveable + save_only_these_names(*SAVED_NAMES)

On a 1B DeepSeek-style config (docs/benchmarks.md) that removes the forward grouped matmuls and
the forward attention from every layer's backward pass, for the memory of their outputs.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

# Grouped expert matmul outputs, token rows in expert order, fused-attention outputs and the
# residuals of its VJP.
EXPERT_MATMUL = "expert_matmul"
EXPERT_ROWS = "expert_rows"
ATTENTION = "attention"
SAVED_NAMES = (EXPERT_MATMUL, EXPERT_ROWS, ATTENTION)

CUSTOM_POLICIES = {
    "dots_and_kernels": lambda: jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)),
}


def policy(name: str) -> Callable:
  """The remat policy called `name`: one of CUSTOM_POLICIES or a `jax.checkpoint_policies`
  attribute (e.g. "nothing_saveable", "dots_with_no_batch_dims_saveable")."""
  if name in CUSTOM_POLICIES:
    return CUSTOM_POLICIES[name]()
  found = getattr(jax.checkpoint_policies, name, None)
  if found is None or name.startswith("_"):
    known = sorted(CUSTOM_POLICIES) + sorted(
        n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
    raise ValueError(f"unknown remat policy {name!r}; known: {', '.join(known)}")
  return found


def with_saved_vjp(fn: Callable, name: str) -> Callable:
  """fn with its output and the residuals of its VJP tagged `checkpoint_name(·, name)`.

  For a function with a custom VJP of its own (e.g. jax.nn.dot_product_attention's cuDNN
  implementation), naming only its output is not enough for a remat policy: the backward rule
  also reads residuals (the kernel's softmax statistics), which the policy cannot name, so the
  forward kernel would run again in the backward pass. Here the forward rule runs `jax.vjp(fn)`
  and names every residual; same values and gradients as fn.
  """

  @jax.custom_vjp
  def wrapped(*args):
    return checkpoint_name(fn(*args), name)

  def fwd(*args):
    out, vjp = jax.vjp(fn, *args)
    return checkpoint_name(out, name), jax.tree.map(lambda r: checkpoint_name(r, name), vjp)

  def bwd(vjp, g):
    return vjp(g)

  wrapped.defvjp(fwd, bwd)
  return wrapped

"""Meshes and the logical-axis → mesh-axis rules (one table per strategy).

Parameters carry logical axis names (layers.param); a rules table maps each name to a mesh axis
(or None: replicated). A dimension that the mesh axis does not divide stays replicated, so one
table serves every model size and device count.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Training: weights sharded over fsdp (the model width) and tensor (heads / FFN / vocab);
# experts over the expert axis; the batch over data × fsdp × expert (expert parallelism
# exchanges tokens within the expert axis, see expert_parallel.py).
TRAIN_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed2", None),
    ("heads", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("norm", None),
)
# Inference: no fsdp gather per step; tensor and expert parallelism only.
INFER_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = tuple(
    (name, None if axis == "fsdp" else axis) for name, axis in TRAIN_RULES)


def make_mesh(*, data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 4-axis mesh (data, fsdp, tensor, expert); the product must equal the device count."""
  devices = list(devices if devices is not None else jax.devices())
  shape = (data, fsdp, tensor, expert)
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules=TRAIN_RULES) -> P:
  """PartitionSpec for a value with logical `axes`; undivisible or reused mesh axes replicate.

  A rule may name several mesh axes (the batch: data × fsdp × expert); the dimension is then
  split over all of them, or replicated if their product does not divide it.
  """
  if not axes:
    return P()
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(axes, shape):
    axis = table.get(name) if name else None
    group = (axis,) if isinstance(axis, str) else tuple(axis or ())
    size = math.prod(mesh.shape[a] for a in group)
    if not group or used & set(group) or dim % size:
      spec.append(None)
    else:
      spec.append(axis)
      used.update(group)
  return P(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules=TRAIN_RULES):
  """A pytree of NamedShardings matching `state` (from the params' logical axis metadata)."""
  def one(var):
    value = var.get_value()
    spec = logical_to_spec(var.get_metadata().get("out_sharding"), value.shape, mesh, rules)
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_params(state: nnx.State, mesh: Mesh, rules=TRAIN_RULES) -> nnx.State:
  """Places every parameter on the mesh according to the rules."""
  return jax.device_put(state, param_shardings(state, mesh, rules))


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,expert=4' → {'data': 2, 'expert': 4} (axes not named have size 1; '' → {})."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"bad mesh entry {part!r} in {text!r}: expected AXIS=SIZE with AXIS one of "
                       f"{MESH_AXES} and SIZE >= 1, e.g. 'data=2,expert=4'")
    if name in sizes:
      raise ValueError(f"mesh axis {name!r} given twice in {text!r}")
    sizes[name] = int(value)
  return sizes


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=TRAIN_RULES) -> NamedSharding:
  """Sharding of a [B, ...] batch: B over the rule for 'batch' (data × fsdp × expert)."""
  return NamedSharding(mesh, P(dict(rules)["batch"], *([None] * (ndim - 1))))

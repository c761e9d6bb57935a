"""Expert parallelism: routed experts sharded over the mesh's `expert` axis, tokens exchanged
with all-to-all inside a `shard_map`.

Each device holds E/n experts (n = size of the expert axis) and a slice of the batch's tokens
(the batch is split over data × fsdp × expert). Per MoE layer, on every device:

  1. its M local (token, slot) pairs are sorted by expert and packed into one buffer per
     destination device (the owner of the expert);
  2. all_to_all over the expert axis delivers each device the rows for its own experts;
  3. the rows are sorted by local expert and run through `moe.grouped_matmul`
     (jax.lax.ragged_dot; XLA lowers it natively on TPU), or, with a capacity factor, through
     one batched matmul over equal-sized per-expert buckets;
  4. a second all_to_all sends the results back, where they are un-permuted and combined with
     the router weights.

Dropless (the default, as DeepSeek-V3 trains): a device may send all M·K of its pairs to one
device, so each per-destination buffer holds M·K rows. Exact, but the buffers grow with the
expert-axis size. With `capacity_factor=c`, each (device, expert) bucket holds
ceil(c·M·K/E) rows and pairs beyond it are dropped (their output is zero). Expert weights may
also be split over the `tensor` axis along F (their partial outputs are summed with psum).

Selected explicitly: `Transformer(cfg, ..., expert_dispatch=ExpertParallel(mesh))`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec as P

from dsv3_jax.layers import dequantize_blocks, lowp_product
from dsv3_jax.moe import (Experts, Routing, grouped_matmul, inverse_permutation, permute_rows,
                          unpermute_rows)
from dsv3_jax.remat import EXPERT_MATMUL, EXPERT_ROWS
from pallas_kernels.fp8_ops import Fp8Backend
from pallas_kernels.fp8_train_ops import fp8_train_batched

_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """The routed-expert dispatch over a mesh (a `MoE` dispatch callable; hashable, so it can sit
  in a module's static structure).

  Args:
    mesh: the device mesh (see sharding.make_mesh).
    capacity_factor: None for dropless; else rows per (device, expert) bucket = ceil(c·M·K/E).
    expert_axis: the mesh axis the experts are split over.
    batch_axes: mesh axes the tokens (the batch) are split over.
    tensor_axis: mesh axis splitting each expert's FFN width F (None: never split).
  """

  mesh: Mesh
  capacity_factor: float | None = None
  expert_axis: str = "expert"
  batch_axes: tuple[str, ...] = ("data", "fsdp", "expert")
  tensor_axis: str | None = "tensor"

  def __post_init__(self):
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      raise ValueError(f"capacity_factor={self.capacity_factor} must be positive (or None: "
                       "dropless)")
    missing = {self.expert_axis, *self.batch_axes} - set(self.mesh.axis_names)
    if missing:
      raise ValueError(f"mesh axes {sorted(missing)} are not in the mesh {self.mesh.axis_names}")

  def __call__(self, experts: Experts, x: jax.Array, routing: Routing) -> jax.Array:
    """x: [M, D] tokens (M = B·T, batch-major), routing: their top-K choice → [M, D]."""
    n_ep = self.mesh.shape[self.expert_axis]
    num_e = experts.num_experts
    if num_e % n_ep:
      raise ValueError(f"n_routed_experts={num_e} is not divisible by the expert axis "
                       f"({self.expert_axis}={n_ep})")
    shards = math.prod(self.mesh.shape[a] for a in self.batch_axes)
    if x.shape[0] % shards:
      raise ValueError(f"{x.shape[0]} tokens cannot be split over the batch axes "
                       f"{self.batch_axes} ({shards} shards): make batch × sequence divisible")
    weights = {n: getattr(experts, n)[...] for n in _PROJ}
    fp8 = experts.gate_proj_scale_inv is not None
    if fp8:
      weights.update({n + "_scale_inv": getattr(experts, n + "_scale_inv")[...] for n in _PROJ})
    f = weights["gate_proj"].shape[1]
    tp = self.tensor_axis
    if tp is None or fp8 or tp not in self.mesh.axis_names or self.mesh.shape[tp] == 1 or (
        f % self.mesh.shape[tp]):
      tp = None
    specs = {"gate_proj": P(self.expert_axis, tp, None), "up_proj": P(self.expert_axis, tp, None),
             "down_proj": P(self.expert_axis, None, tp)}
    specs.update({n: P(self.expert_axis) for n in weights if n.endswith("scale_inv")})
    rows = P(self.batch_axes)
    body = _Body(n_ep=n_ep, num_experts=num_e, axis=self.expert_axis, tensor_axis=tp,
                 capacity_factor=self.capacity_factor, fp8_backend=experts.fp8_backend)
    # Pallas kernels inside shard_map (FP8 kernels; the bf16 Mosaic grouped matmul): with
    # check_vma, Pallas wants every output's varying mesh axes spelled out, and JAX 0.11's Pallas
    # interpreter (the CPU tests) cannot type-check them at all, so the kernel backends run with
    # check_vma=False (then shard_map's transpose sums the replicated weights' gradients itself;
    # tested against the XLA backend's check_vma=True program in tests/test_fp8_training.py).
    kernels = experts.fp8_backend.kind != "xla"
    return jax.shard_map(body, mesh=self.mesh, in_specs=(rows, rows, rows, specs),
                         out_specs=rows, check_vma=not kernels)(
                             x, routing.experts, routing.weights, weights)


@dataclasses.dataclass(frozen=True)
class _Body:
  """The per-device program of ExpertParallel (inside shard_map: every array is local)."""

  n_ep: int
  num_experts: int
  axis: str
  tensor_axis: str | None
  capacity_factor: float | None
  fp8_backend: Fp8Backend | None = None

  def __call__(self, x, idx, route_w, weights):
    """x: [m, D] local tokens; idx, route_w: [m, K]; weights: this device's E/n experts."""
    m, k = idx.shape
    flat = idx.reshape(-1)                                  # [m·K] expert of each pair
    order = jnp.argsort(flat, stable=True)                  # pairs sorted by expert
    sorted_e = flat[order]
    inverse = inverse_permutation(order)
    xs = permute_rows(x, order, k, inverse)                 # [m·K, D] rows in expert order
    if self.capacity_factor is None:
      ys = self._dropless(xs, sorted_e, weights)
    else:
      ys = self._bucketed(xs, sorted_e, weights)
    y = unpermute_rows(ys, order, inverse).reshape(m, k, -1)  # back to (token, slot) order
    return jnp.einsum("mkd,mk->md", y.astype(jnp.float32), route_w).astype(x.dtype)

  def _a2a(self, buf):
    """Block j of axis 0 goes to device j; block j of the result came from device j."""
    if self.n_ep == 1:
      return buf
    return jax.lax.all_to_all(buf, self.axis, 0, 0, tiled=True)

  def _reduce_tensor(self, y):
    return y if self.tensor_axis is None else jax.lax.psum(y, self.tensor_axis)

  def _dropless(self, xs, sorted_e, weights):
    """Per-destination buffers of m·K rows each (nothing can overflow)."""
    rows, d = xs.shape
    e_local = self.num_experts // self.n_ep
    dest = sorted_e // e_local
    counts = jnp.bincount(dest, length=self.n_ep)
    slot = jnp.arange(rows) - (jnp.cumsum(counts) - counts)[dest]   # rank within destination
    send_x = jnp.zeros((self.n_ep, rows, d), xs.dtype).at[dest, slot].set(xs)
    send_e = jnp.full((self.n_ep, rows), e_local, jnp.int32).at[dest, slot].set(
        sorted_e % e_local)
    recv_x = self._a2a(send_x).reshape(self.n_ep * rows, d)
    recv_e = self._a2a(send_e).reshape(self.n_ep * rows)            # e_local marks padding
    local = jnp.argsort(recv_e, stable=True)
    sizes = jnp.bincount(recv_e, length=e_local + 1)[:e_local].astype(jnp.int32)
    h_in = checkpoint_name(jnp.take(recv_x, local, axis=0), EXPERT_ROWS)

    def mm(a, name):
      return grouped_matmul(a, weights[name], sizes, weights.get(name + "_scale_inv"),
                            self.fp8_backend)

    h = jax.nn.silu(mm(h_in, "gate_proj")) * mm(h_in, "up_proj")
    out = self._reduce_tensor(mm(h, "down_proj"))                   # padding rows: unused
    out = jnp.zeros_like(out).at[local].set(out).reshape(self.n_ep, rows, d)
    return self._a2a(out)[dest, slot]                               # [m·K, D]

  def _fp8_buckets(self, h_in, weights):
    """The bucketed experts under the FP8 training recipe: buckets [e, c, D], each its own
    group (fp8_train_batched: one batched Mosaic launch per GEMM on Hopper)."""
    mm = lambda a, name: fp8_train_batched(a, weights[name], backend=self.fp8_backend)
    h = jax.nn.silu(mm(h_in, "gate_proj")) * mm(h_in, "up_proj")
    return mm(h, "down_proj")

  def _bucketed(self, xs, sorted_e, weights):
    """Per-(device, expert) buckets of `cap` rows; pairs beyond a bucket are dropped."""
    rows, d = xs.shape
    e, e_local = self.num_experts, self.num_experts // self.n_ep
    cap = max(1, math.ceil(self.capacity_factor * rows / e))
    counts = jnp.bincount(sorted_e, length=e)
    slot = jnp.arange(rows) - (jnp.cumsum(counts) - counts)[sorted_e]
    keep = slot < cap
    send = jnp.zeros((e, cap, d), xs.dtype).at[sorted_e, jnp.where(keep, slot, cap)].set(
        xs, mode="drop")
    recv = self._a2a(send.reshape(self.n_ep, e_local, cap, d))      # [src, e_local, cap, D]
    h_in = checkpoint_name(recv.transpose(1, 0, 2, 3).reshape(e_local, self.n_ep * cap, d),
                           EXPERT_ROWS)

    def w(name):
      s = weights.get(name + "_scale_inv")
      v = weights[name]
      return (dequantize_blocks(v, s, xs.dtype) if s is not None else v).astype(xs.dtype)

    if (self.fp8_backend is not None and self.fp8_backend.training
        and "gate_proj_scale_inv" not in weights):
      out = self._reduce_tensor(self._fp8_buckets(h_in, weights))
    else:
      mm = lambda spec, a, b: lowp_product(
          lambda a, b, t: jnp.einsum(spec, a, b, preferred_element_type=t), a, b)
      g = checkpoint_name(mm("ecd,efd->ecf", h_in, w("gate_proj")), EXPERT_MATMUL)
      u = checkpoint_name(mm("ecd,efd->ecf", h_in, w("up_proj")), EXPERT_MATMUL)
      h = (jax.nn.silu(g) * u).astype(xs.dtype)
      out = checkpoint_name(mm("ecf,edf->ecd", h, w("down_proj")), EXPERT_MATMUL)
      out = self._reduce_tensor(out.astype(xs.dtype))
    out = out.reshape(e_local, self.n_ep, cap, d).transpose(1, 0, 2, 3)
    back = self._a2a(out).reshape(e, cap, d)
    got = back[sorted_e, jnp.minimum(slot, cap - 1)]
    return jnp.where(keep[:, None], got, 0).astype(xs.dtype)

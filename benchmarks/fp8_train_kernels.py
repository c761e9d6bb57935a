"""Kernels of one FP8 training projection (forward + backward) on an H100, from a deviceless
compile (benchmarks/gpu_hlo.py: no GPU needed), with the operands' quantizations in one Pallas
pass each (pallas_kernels.dual_quant, Fp8Backend.dual_quant, the default) or in XLA's fusions.

  python benchmarks/fp8_train_kernels.py                 # the heavy config's largest shapes
  python benchmarks/fp8_train_kernels.py --list          # every launch, in schedule order

Counts only: nothing runs, so no times (benchmarks/fp8_train.py --xla-quant times both on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_hlo  # noqa: E402  (sets JAX_PLATFORMS=cpu before JAX starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# configs/bench_fp8_gemm_heavy.json at batch 16 x 1024: the dense MLP's gate/up and the
# capacity-dispatched experts' gate/up (16 buckets of 5120 rows)
SHAPES = {
    "dense 16384x8192x2048": ("dense", (16384, 2048), (8192, 2048)),
    "experts 16x5120x2048x2048": ("batched", (16, 5120, 2048), (16, 2048, 2048)),
}


def projection(kind: str, x_shape, w_shape, *, dual_quant: bool, backend: str = "mosaic"):
  """Compiled forward + backward of one FP8 training projection: (y, dx, dW) from (x, W, dy)."""
  from pallas_kernels import fp8_train_ops
  from pallas_kernels.fp8_ops import Fp8Backend
  be = Fp8Backend(backend, training=True, dual_quant=dual_quant)
  fn = fp8_train_ops.fp8_train_linear if kind == "dense" else fp8_train_ops.fp8_train_batched
  y_shape = (*x_shape[:-1], w_shape[-2])

  def run(x, w, dy):
    y, pull = jax.vjp(lambda a, b: fn(a, b, backend=be), x, w)
    return (y, *pull(dy))

  with gpu_hlo.pretend_gpu():
    return gpu_hlo.compile_for_gpu(run, jax.ShapeDtypeStruct(x_shape, jnp.bfloat16),
                                   jax.ShapeDtypeStruct(w_shape, jnp.float32),
                                   jax.ShapeDtypeStruct(y_shape, jnp.bfloat16))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--backend", default="mosaic", choices=["mosaic", "triton"])
  ap.add_argument("--list", action="store_true", help="print every launch in schedule order")
  ap.add_argument("--json", help="write the counts here")
  args = ap.parse_args(argv)
  rows = []
  print(f"{'projection':30s} {'quantization':14s} kernels  memcpys")
  for name, (kind, xs, ws) in SHAPES.items():
    for dual in (True, False):
      rep = gpu_hlo.kernel_report(projection(kind, xs, ws, dual_quant=dual,
                                             backend=args.backend).as_text())
      how = "dual_quant" if dual else "XLA fusions"
      print(f"{name:30s} {how:14s} {rep.kernels:7d}  {rep.memcpys:7d}", flush=True)
      if args.list:
        print(rep.summary())
      rows.append(dict(projection=name, backend=args.backend, dual_quant=dual,
                       kernels=rep.kernels, memcpys=rep.memcpys))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()

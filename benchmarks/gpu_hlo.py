"""Compile JAX programs for an NVIDIA H100 without a GPU, and count the kernels they launch.

XLA's GPU compiler needs only a description of its target (a GpuTargetConfigProto in text form)
to run its whole pipeline: fusion, Triton GEMM rewriting, scheduling, PTX. JAX's CUDA plugin
(jax-cuda13-plugin + jax-cuda13-pjrt) takes that text as the `target_config` of a compile-only
topology, and `jit(f).trace(args on that topology's device).lower().compile()` then compiles
for sm_90 on a CPU-only machine. `JAX_PLATFORMS=cpu` (set below) makes the plugin skip its
driver checks. Nothing runs: there are no timings, and autotuning is skipped (XLA's default
Triton GEMM tiles, so a GEMM's split-K may differ from an autotuned on-device compile; the fusion
structure, hence the kernel count, matched on-device profiles in the configurations checked).

The target description is written here from `H100_SXM`, a few public facts of the H100 SXM
(80 GB HBM3): the fields XLA reads to compile (found by removing fields one at a time until the
compiled decode step of benchmarks/decode_kernels.py changed or the compiler failed), plus the
launch-dimension limits.

Library:
  compile_for_gpu(fn, *args, **kwargs) -> jax.stages.Compiled   (args: arrays or ShapeDtypeStructs)
  kernel_report(hlo_text) -> Report    (kernels per call, per while-loop iteration, histogram)
  listing(hlo_text, computation) -> the launches of one computation in schedule order, each
                                    with the source lines of the ops fused into it
  pretend_gpu()                  -> context: jax.devices() returns the compile-only H100 (for
                                    code that picks its kernels by the default device)
CLI:
  python benchmarks/gpu_hlo.py spec                       # print the target description
  python benchmarks/gpu_hlo.py hlo FILE [--list]          # count the kernels of an HLO dump
  python benchmarks/gpu_hlo.py toy [--list]               # a scanned matmul + layernorm toy
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # before JAX initialises a backend

import jax                                       # noqa: E402
import jax.numpy as jnp                          # noqa: E402

# cudaDeviceProp of an H100 SXM 80GB (NVIDIA's data sheet: 132 SMs, 1.98 GHz boost, 50 MB L2,
# 3.35 TB/s HBM3, 228 KB shared memory per SM of which 227 KB per block opt-in).
H100_SXM = {
    "core_count": 132,
    "fpus_per_core": 128,
    "clock_rate_ghz": 1.98,
    "memory_bandwidth": 3_352_320_000_000,
    "device_memory_size": 84_942_979_072,
    "l2_cache_size": 50 << 20,
    "threads_per_warp": 32,
    "threads_per_block_limit": 1024,
    "threads_per_core_limit": 2048,
    "registers_per_block_limit": 65536,
    "shared_memory_per_block": 48 << 10,
    "shared_memory_per_block_optin": 227 << 10,
    "block_dim_limit_x": 2**31 - 1,
    "block_dim_limit_y": 65535,
    "block_dim_limit_z": 65535,
}
H100_NAME = "NVIDIA H100 80GB HBM3"


def target_config(facts: dict = H100_SXM, *, name: str = H100_NAME,
                  capability: tuple[int, int] = (9, 0)) -> str:
  """The stream_executor.GpuTargetConfigProto text of a CUDA device (sm_XYa: `capability` with
  its architecture-specific features, which Hopper's wgmma kernels need)."""
  fields = "".join(f"  {k}: {v}\n" for k, v in facts.items())
  cc = (f"  cuda_compute_capability {{ major: {capability[0]} minor: {capability[1]} "
        "feature_extension: ACCELERATED_FEATURES }\n")
  return f"gpu_device_info {{\n{fields}{cc}}}\ndevice_description_str: \"{name}\"\n"


_topology = None


def gpu_device():
  """The compile-only H100 (platform 'gpu', compute_capability '9.0', core_count 132)."""
  global _topology
  if _topology is None:
    from jax.experimental import topologies
    try:
      _topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(),
                                               topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - say what is missing
      raise RuntimeError(
          "no CUDA compile-only topology: install jax-cuda13-plugin and jax-cuda13-pjrt of "
          f"jax's version ({jax.__version__}) with --no-deps (docs/benchmarks.md, decode "
          f"section): {e}") from e
  return _topology.devices[0]


@contextlib.contextmanager
def pretend_gpu():
  """Within: jax.devices() and jax.local_devices() return [the compile-only H100]. Code that
  picks kernels by jax.devices()[0] (Pallas GEMVs on GPUs, the FP8 backend) then picks the
  GPU's."""
  saved = jax.devices, jax.local_devices
  dev = gpu_device()
  jax.devices = jax.local_devices = lambda *a, **k: [dev]
  try:
    yield dev
  finally:
    jax.devices, jax.local_devices = saved


def _on_gpu(tree):
  sharding = jax.sharding.SingleDeviceSharding(gpu_device())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
                      if hasattr(x, "shape") and hasattr(x, "dtype") else x, tree)


def compile_for_gpu(fn, *args, **kwargs):
  """Compiles `fn` (jitted or not) for the H100. Array-like leaves of args and kwargs become
  ShapeDtypeStructs on the compile-only device (nothing is allocated); other leaves (static
  arguments of a jitted fn) pass unchanged. Returns jax.stages.Compiled."""
  fn = fn if hasattr(fn, "trace") else jax.jit(fn)
  args, kwargs = _on_gpu((args, kwargs))
  with jax.default_device(gpu_device()):     # Pallas' Triton lowering reads the device kind
    return fn.trace(*args, **kwargs).lower().compile()


# ---- kernels of an optimized HLO module ----------------------------------------------------------
# ops that launch nothing (aliasing, bookkeeping); async pairs count at their *-start
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier",
         "after-all", "add-dependency", "domain", "partition-id", "replica-id"}
_COMP = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = ")


def _opcode(rest: str) -> str:
  """The opcode of an instruction, from the text after ' = ' (a tuple type may come first)."""
  if rest.startswith("("):
    depth = 0
    for j, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
    rest = rest[j + 1:]
  else:
    rest = rest[rest.find(" "):]
  m = re.match(r"\s*([a-z][\w\-]*)\(", rest)
  return m.group(1) if m else "?"


def parse_hlo(text: str) -> tuple[dict, str]:
  """({computation: [(name, opcode, line)]}, the entry computation's name)."""
  comps, entry, cur = {}, None, None
  for line in text.split("\n"):
    m = _COMP.match(line)
    if m:
      cur = m.group(2)
      comps[cur] = []
      entry = cur if m.group(1) else entry
    elif cur is not None and (m := _INSTR.match(line)):
      comps[cur].append((m.group(1), _opcode(line[m.end():]), line))
    elif line.startswith("}"):
      cur = None
  return comps, entry


def _root(comps, comp):
  return next((i for i in reversed(comps.get(comp, ())) if i[2].lstrip().startswith("ROOT ")),
              None)


def _stem(name: str) -> str:
  """'loop_add_fusion.12' → 'loop_add_fusion'."""
  return re.sub(r"(\.\d+)+$", "", name)


def classify(name: str, op: str, line: str, comps: dict) -> tuple[str, str] | None:
  """('kernel' | 'memcpy', label) of a top-level instruction, or None if it launches nothing.
  Copies count as memcpy, and so do fusions XLA runs as a memcpy (kind __dynamic_memcpy, or a
  loop fusion whose root (dynamic-)slice or update carries a dynamic_slice_config)."""
  if op in _FREE or op.endswith(("-done", "-update")):
    return None
  if op in ("fusion", "fusion-start"):
    kind = (re.search(r"kind=(\w+)", line) or [None, "?"])[1]
    if bk := re.search(r'"fusion_backend_config":\{"kind":"([^"]+)"', line):
      kind = f"{kind}/{bk.group(1)}"
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    root = _root(comps, calls.group(1)) if calls else None
    if "__dynamic_memcpy" in kind or (
        kind == "kLoop" and root is not None and "dynamic_slice_config" in root[2]
        and root[1] in ("dynamic-slice", "dynamic-update-slice")):
      return "memcpy", f"memcpy:{root[1] if root else 'fusion'}"
    if kind == "kCustom" and root is not None:       # e.g. XLA's sort-based top_k
      kind = f"kCustom({root[1]})"
    label = f"fusion:{kind} {_stem(name)}"
    if _stem(name) == "fusion" and (prim := re.search(r'op_name="(?:[^"]*/)?([^"/]+)"', line)):
      label += f" [{prim.group(1)}]"
    return "kernel", label
  if op in ("custom-call", "custom-call-start"):
    target = re.search(r'custom_call_target="([^"]+)"', line)
    label = "custom-call:" + (target.group(1) if target else "?")
    if kname := re.search(r', name = "([^"]+)"', line):   # Pallas Triton kernels carry a name
      label += f" {kname.group(1)}"
    elif (opn := re.search(r'op_name="([^"]*)"', line)) and (
        jits := re.findall(r"jit\(([^)]+)\)", opn.group(1))):   # else: the jitted function
      label += f" {jits[-1]}"
    return "kernel", label
  if op in ("copy", "copy-start"):
    return "memcpy", op
  if op.endswith("-start"):                          # async collectives, send/recv
    return "kernel", op[:-len("-start")]
  return "kernel", op                                # an unfused op that runs (sort, rng, ...)


@dataclasses.dataclass
class Loop:
  body: str
  trip_count: int | None
  runs: int                                # how often the body runs per call
  kernels: int                             # per iteration (memcpys apart)
  memcpys: int
  histogram: collections.Counter           # label → launches per iteration


@dataclasses.dataclass
class Report:
  hlo: str
  kernels: int                             # per call (memcpys apart)
  memcpys: int
  histogram: collections.Counter           # label → launches per call
  loops: list[Loop]                        # busiest first
  notes: list[str]

  def summary(self, top: int = 25) -> str:
    out = [f"kernels per call: {self.kernels}   (+ {self.memcpys} memcpy/copy ops)"]
    out += [f"note: {n}" for n in self.notes]
    out += [f"  {n:6d}  {label}" for label, n in self.histogram.most_common(top)]
    for lp in self.loops:
      out.append(f"while body {lp.body}: trip count {lp.trip_count or 'unknown'}, runs "
                 f"x{lp.runs} per call, {lp.kernels} kernels (+{lp.memcpys} memcpy) per iteration")
      out += [f"    {n:4d}  {label}" for label, n in lp.histogram.most_common(top)]
    return "\n".join(out)


def kernel_report(text: str) -> Report:
  """The kernels an optimized HLO module launches per call, as XLA's GPU runtime issues them:
  every top-level instruction of the entry and of control-flow computations that does work (one
  fusion = one kernel; copies apart, as memcpys); a while body counts trip-count times (its
  known_trip_count; unknown: once, with its condition), each branch of a conditional once (an
  upper bound, noted). Command-buffer calls and async wrappers are entered."""
  comps, entry = parse_hlo(text)
  hist, counts, loops, notes = collections.Counter(), collections.Counter(), [], []

  def walk(comp, mult, own):
    for name, op, line in comps.get(comp, ()):
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", line).group(1)
        trip = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
        trip = int(trip.group(1)) if trip else None
        inner, per = collections.Counter(), collections.Counter()
        walk(body, mult * (trip or 1), inner)
        if trip is None:
          notes.append(f"while {name}: unknown trip count; body and condition counted once")
          walk(re.search(r"condition=%?([\w.\-]+)", line).group(1), mult, own)
        for label, n in inner.items():
          per[label.startswith(("copy", "memcpy"))] += n
        loops.append(Loop(body, trip, mult * (trip or 1), per[False], per[True], inner))
        if own is not None:
          own.update({k: v * (trip or 1) for k, v in inner.items()})
        continue
      if op == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches
                 else re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line))
        notes.append(f"conditional {name}: all {len(names)} branches counted (upper bound)")
        for b in names:
          walk(b, mult, own)
        continue
      if op in ("call", "async-start"):
        to = re.search(r"(?:to_apply|calls)=%?([\w.\-]+)", line)
        if to and to.group(1) in comps:
          walk(to.group(1), mult, own)
          continue
      c = classify(name, op, line, comps)
      if c is None:
        continue
      hist[c[1]] += mult
      counts[c[0]] += mult
      if own is not None:
        own[c[1]] += 1

  walk(entry, 1, None)
  loops.sort(key=lambda lp: -lp.runs * lp.kernels)
  return Report(text, counts["kernel"], counts["memcpy"], hist, loops, notes)


def _frames(text: str) -> dict[int, str]:
  """stack_frame_id → 'file.py:line function' (innermost frame), from the module's tables."""
  tables, cur = {}, None
  for line in text.split("\n"):
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      cur = tables.setdefault(line, {})
    elif line.startswith(("%", "ENTRY", "HloModule")) and tables:
      break
    elif cur is not None and (m := re.match(r"^(\d+) (.*)$", line)):
      cur[int(m.group(1))] = m.group(2)
  files = {k: os.path.basename(v.strip('"')) for k, v in tables.get("FileNames", {}).items()}
  funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
  locs = {}
  for k, v in tables.get("FileLocations", {}).items():
    if f := re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", v):
      locs[k] = f"{files.get(int(f[1]), '?')}:{f[3]} {funcs.get(int(f[2]), '?')}"
  return {k: locs.get(int(f[1]), "?") for k, v in tables.get("StackFrames", {}).items()
          if (f := re.search(r"file_location_id=(\d+)", v))}


def listing(text: str, comp: str | None = None) -> list[tuple[str, str, str]]:
  """The launches of one computation (default: the entry) in schedule order, as (category,
  label, origin): origin is the JAX op name of the kernel's root and the source lines of the
  ops fused into it (root first, at most three)."""
  comps, entry = parse_hlo(text)
  frames = _frames(text)
  where = lambda l: frames.get(int(f[1]), "") if (f := re.search(r"stack_frame_id=(\d+)", l)) else ""
  out = []
  for name, op, line in comps.get(comp or entry, ()):
    if op in ("while", "conditional", "call"):
      out.append(("control", f"{op} {name}", ""))
      continue
    if not (c := classify(name, op, line, comps)):
      continue
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    body = comps.get(calls.group(1), ()) if calls else ()
    root = _root(comps, calls.group(1)) if calls else None
    src = line if root is None else root[2]
    m = re.search(r'op_name="([^"]*)"', src) or re.search(r'op_name="([^"]*)"', line)
    opn = re.sub(r"^jit\([^)]*\)/", "", m.group(1) if m else "").replace("while/body/", "")
    seen = []
    for w in [where(src)] + [where(l) for _, o, l in body if o not in _FREE]:
      if w and w not in seen:
        seen.append(w)
    more = f" +{len(seen) - 3}" if len(seen) > 3 else ""
    out.append((c[0], f"{c[1]}  ({name})", f"{opn}  @ {'; '.join(seen[:3])}{more}"))
  return out


def print_listing(rep: Report, comps: list[str | None] | None = None) -> None:
  """Prints the launches of the busiest loop body and of the entry (or of `comps`)."""
  if comps is None:
    comps = ([rep.loops[0].body] if rep.loops else []) + [None]
  for comp in comps:
    print(f"\nlaunches of {comp or 'the entry computation'} in schedule order:")
    for cat, label, origin in listing(rep.hlo, comp):
      print(f"  {cat:7s} {label:70s} {origin}")


def toy(x, w, g):
  """A scan of (matmul → layernorm → gelu) layers."""
  def layer(h, wg):
    h = h @ wg[0]
    m = h.mean(-1, keepdims=True)
    h = (h - m) * jax.lax.rsqrt(((h - m) ** 2).mean(-1, keepdims=True) + 1e-5) * wg[1]
    return jax.nn.gelu(h), None
  return jax.lax.scan(layer, x, (w, g))[0].sum()


def main(argv=None):
  import argparse
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("what", choices=["spec", "hlo", "toy"])
  ap.add_argument("file", nargs="?", help="the optimized HLO text (for 'hlo')")
  ap.add_argument("--list", action="store_true", help="list the launches in schedule order")
  ap.add_argument("--top", type=int, default=25)
  a = ap.parse_args(argv)
  if a.what == "spec":
    print(target_config(), end="")
    return
  if a.what == "hlo":
    if not a.file:
      ap.error("hlo needs the HLO file")
    with open(a.file) as f:
      rep = kernel_report(f.read())
  else:
    sds = jax.ShapeDtypeStruct
    rep = kernel_report(compile_for_gpu(
        toy, sds((8, 1024), jnp.bfloat16), sds((6, 1024, 1024), jnp.bfloat16),
        sds((6, 1024), jnp.bfloat16)).as_text())
  print(rep.summary(a.top))
  if a.list:
    print_listing(rep)


if __name__ == "__main__":
  main()

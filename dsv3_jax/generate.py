"""Batched generation over the compressed MLA cache, with optional MTP speculative decoding.

Prompts of different lengths share one right-padded batch: row b's prompt fills cache slots
0..len_b-1, its first generated token lands at slot len_b, and attention masks every slot after
a query's own position, so padding is never seen. Prefill lengths are bucketed (powers of two)
and decoding runs `chunk` steps per jitted call (a lax.scan), so nothing recompiles per prompt
and the host syncs once per chunk.

MTP speculative decoding (`mtp=True`): each step the main model verifies [cur, draft] at
positions [P, P+1]. The token a at P+1 is sampled from the main model; if a equals the draft,
the token b sampled at P+2 is kept too. Sampling first and comparing afterwards keeps the output
distribution exactly that of plain decoding (greedy output is identical). The MTP module then
drafts the next token from (h_P, a) or (h_{P+1}, b). The step is one decoder block, one head and
one sampling pass more than a plain step: a and b are sampled in one pass over both rows, and
the MTP block runs over both positions (both cache slots are needed once b is accepted) but
only the row that drafts goes through the head.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.cache import Cache, concat_rows, init_cache
from dsv3_jax.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


def _bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _rows(x):
  return jnp.arange(x.shape[0])


class StaticGraph:
  """A model's nnx GraphDef as a static jit argument that is hashed once. jit hashes its static
  arguments at every call, and a GraphDef rehashes its whole tree each time: 0.24 ms of host
  time per call for the 4-layer demo model on one CPU core, more for deeper models, spent while
  the device waits for the next decode chunk."""

  def __init__(self, graphdef):
    self.graphdef = graphdef
    self._hash = hash(graphdef)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, StaticGraph) and self._hash == other._hash
                             and self.graphdef == other.graphdef)


# ---- pure, jitted steps (the graph and sampling settings are static) ---------------------------
@functools.partial(jax.jit, static_argnames=("graph", "sampling", "mtp"),
                   donate_argnames=("cache",))
def _prefill(graph: StaticGraph, params, tokens, lengths, cache: Cache, key, *, sampling, mtp):
  """tokens [B, P] right-padded, lengths [B]. Returns (first token [B], draft [B], cache)."""
  model = nnx.merge(graph.graphdef, params)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  h, cache = model.hidden(tokens, positions, cache, mode="full")
  last = lengths - 1
  first = sample(model.head(h[_rows(h), last]), key, sampling)
  draft = first
  if mtp:
    # MTP inputs at position i: (h_i, Emb(t_{i+1})); the token after the prompt is `first`.
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1).at[_rows(h), last].set(first)
    layer = model.mtp[0]
    m, c = layer(h, model.embed(nxt), positions, cache.mtp[0], mode="full")
    cache = dataclasses.replace(cache, mtp=(c,) + cache.mtp[1:])
    draft = jnp.argmax(model.head(layer.shared_head_norm(m[_rows(m), last])), -1).astype(jnp.int32)
  return first, draft, cache


@functools.partial(jax.jit, static_argnames=("graph", "sampling", "steps"),
                   donate_argnames=("cache",))
def _decode(graph: StaticGraph, params, cur, pos, cache: Cache, key, *, sampling, steps):
  """`steps` plain decode steps. cur [B] is the pending token at positions pos [B].
  Returns (tokens [B, steps], cur, pos, cache)."""
  model = nnx.merge(graph.graphdef, params)
  limit = cache.max_len - 1

  def step(carry, k):
    cur, pos, cache = carry
    h, cache = model.hidden(cur[:, None], pos[:, None], cache, mode="absorbed")
    nxt = sample(model.head(h[:, 0]), k, sampling)
    return (nxt, jnp.minimum(pos + 1, limit), cache), nxt

  (cur, pos, cache), toks = jax.lax.scan(step, (cur, pos, cache), jax.random.split(key, steps))
  return toks.T, cur, pos, cache


@functools.partial(jax.jit, static_argnames=("graph", "sampling", "steps"),
                   donate_argnames=("cache",))
def _decode_mtp(graph: StaticGraph, params, cur, draft, pos, cache: Cache, key, *, sampling,
                steps):
  """`steps` speculative steps. Returns (out [B, steps, 3] int32, cur, draft, pos, cache): per
  step the tokens a and b and whether b was accepted (1/0); each step emits a, then b where
  accepted. One array, so the host reads each chunk in one transfer."""
  model = nnx.merge(graph.graphdef, params)
  layer = model.mtp[0]
  limit = cache.max_len - 2

  def step(carry, k):
    cur, draft, pos, cache = carry
    toks = jnp.stack([cur, draft], axis=1)
    p2 = pos[:, None] + jnp.arange(2, dtype=pos.dtype)
    h, cache = model.hidden(toks, p2, cache, mode="absorbed")
    logits = model.head(h)                                        # [B, 2, V]
    # both positions in one sampling pass (one argmax when greedy); rows draw independent noise
    ab = sample(logits.reshape(-1, logits.shape[-1]), k, sampling).reshape(toks.shape)
    a, b = ab[:, 0], ab[:, 1]
    acc = a == draft
    m, c = layer(h, model.embed(ab), p2, cache.mtp[0], mode="absorbed")
    cache = dataclasses.replace(cache, mtp=(c,) + cache.mtp[1:])
    # only the row that drafts goes through the head: P+1 (after b) if accepted, else P
    m = jnp.where(acc[:, None], m[:, 1], m[:, 0])                  # [B, D]
    new_draft = jnp.argmax(model.head(layer.shared_head_norm(m)), -1).astype(jnp.int32)
    new_pos = jnp.minimum(pos + 1 + acc.astype(pos.dtype), limit)
    out = jnp.stack([a, b, acc.astype(jnp.int32)], axis=1)
    return (jnp.where(acc, b, a), new_draft, new_pos, cache), out

  keys = None if sampling.greedy else jax.random.split(key, steps)
  (cur, draft, pos, cache), out = jax.lax.scan(step, (cur, draft, pos, cache), keys,
                                               length=steps)
  return jnp.swapaxes(out, 0, 1), cur, draft, pos, cache


# ---- host-side engine ----------------------------------------------------------------------------
@dataclasses.dataclass
class Completion:
  prompt_ids: list[int]
  output_ids: list[int]
  finish_reason: str = "length"  # "eos", "stop" or "length"


@dataclasses.dataclass
class Stats:
  batch: int = 0
  prompt_tokens: int = 0
  generated_tokens: int = 0
  time_to_first_token_s: float = 0.0
  decode_time_s: float = 0.0
  mtp_steps: int = 0
  mtp_accepted: int = 0

  @property
  def prefill_tok_s(self) -> float:
    return self.prompt_tokens / self.time_to_first_token_s if self.time_to_first_token_s else 0.0

  @property
  def decode_tok_s(self) -> float:
    """Generated tokens per second after the first, all rows together."""
    n = self.generated_tokens - self.batch
    return n / self.decode_time_s if self.decode_time_s and n > 0 else 0.0

  @property
  def acceptance_rate(self) -> float:
    return self.mtp_accepted / self.mtp_steps if self.mtp_steps else 0.0

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s)
    if self.mtp_steps:
      d["mtp_acceptance_rate"] = self.acceptance_rate
    return d


class Engine:
  """Holds the split model and generates for batches of token-id prompts.

  Args:
    model: a Transformer.
    mtp: draft with the model's first MTP module (needs num_nextn_predict_layers ≥ 1).
    chunk: decode steps per jitted call (one host sync per chunk).
    cache_dtype: dtype of the compressed cache (default: the model's compute dtype).
    prefill_tokens: prompts are prefilled in row blocks of at most this many (padded) tokens,
      which bounds prefill's activation memory for large batches.
    expert_gemv: decode routed experts through the expert-indexed GEMV kernel
      (`Transformer.use_expert_gemv`, changing `model` in place); default: on GPUs, elsewhere
      as the model is set.
    dense_gemv: decode the projections (attention, shared experts, head) through the GEMV kernel
      (`Transformer.use_dense_gemv`, changing `model` in place); default: on GPUs, elsewhere as
      the model is set.
    attention_kernel: decode attention through the MLA decode kernel
      (`Transformer.use_attention_kernel`, changing `model` in place); default: as the model is
      set (off unless turned on: on an H100, V2-Lite, it was 3–4 % faster at batch 8 but 11 %
      slower at bf16 batch 1, docs/benchmarks.md decode round 5; it reads only the visible
      slots, which matters at long contexts).
    absorb_kernel: decode the W_UK absorption through pallas_kernels.mla_absorb
      (`Transformer.use_absorb_kernel`, changing `model` in place); default: on GPUs, elsewhere
      as the model is set.
    merged_shared: one decoding token reads its shared experts in the routed experts' fused
      gather (`Transformer.use_merged_shared`, changing `model` in place); default: as the
      model is set (off unless turned on).
    fused_input: each attention block's input norm and q/kv_a projections of a decoding step run
      in one GEMV launch (`Transformer.use_fused_input`, changing `model` in place; needs the
      dense GEMV kernels); default: as the model is set (off unless turned on).
    unstack: give every layer arrays of its own (`Transformer.unstack_layers`, changing `model`
      in place); compile time then grows with depth.
  """

  def __init__(self, model, *, mtp: bool = False, chunk: int = 8, cache_dtype=None,
               prefill_tokens: int = 8192, expert_gemv: bool | None = None,
               dense_gemv: bool | None = None, attention_kernel: bool | None = None,
               absorb_kernel: bool | None = None, merged_shared: bool | None = None,
               fused_input: bool | None = None, unstack: bool = False):
    if mtp and not len(model.mtp):
      raise ValueError("--mtp needs a model with an MTP module (num_nextn_predict_layers ≥ 1); "
                       "this checkpoint has none")
    if expert_gemv is not None or jax.devices()[0].platform == "gpu":
      model.use_expert_gemv(expert_gemv)
    if dense_gemv is not None or jax.devices()[0].platform == "gpu":
      model.use_dense_gemv(dense_gemv)
    if attention_kernel is not None:
      model.use_attention_kernel(attention_kernel)
    if absorb_kernel is not None or jax.devices()[0].platform == "gpu":
      model.use_absorb_kernel(absorb_kernel)
    if merged_shared is not None:
      model.use_merged_shared(merged_shared)
    if fused_input is not None:
      model.use_fused_input(fused_input)
    if unstack:
      model.unstack_layers()
    self.cfg = model.cfg
    self.graphdef, self.params = nnx.split(model)
    self.graph = StaticGraph(self.graphdef)
    self.mtp = mtp
    self.chunk = chunk
    self.cache_dtype = cache_dtype or model.dtype
    self.prefill_tokens = prefill_tokens

  def plan_cache_len(self, longest_prompt: int, max_new_tokens: int) -> int:
    """Cache slots needed: the prompt bucket, the new tokens and a speculative margin."""
    need = max(_bucket(longest_prompt), longest_prompt + max_new_tokens + 2)
    return -(-need // 64) * 64

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampling: SamplingParams = SamplingParams(), eos_ids: Sequence[int] = (),
               seed: int = 0, max_len: int | None = None,
               should_stop: Callable[[int, list[int]], bool] | None = None,
               on_tokens: Callable[[int, list[int]], None] | None = None,
               ) -> tuple[list[Completion], Stats]:
    """Generates up to max_new_tokens per prompt; rows finish independently.

    Args:
      prompts: token-id lists (each non-empty).
      eos_ids: tokens that end a row (kept in its output).
      max_len: cache length; default: just enough for the longest prompt plus the new tokens.
      should_stop(row, output_ids): True ends the row (e.g. a stop string appeared).
      on_tokens(row, new_ids): called as tokens arrive (streaming).
    """
    if not prompts:
      raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompt {i} is empty: give at least one token")
    if max_new_tokens < 1:
      raise ValueError(f"{max_new_tokens=} must be >= 1")
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    needed = longest + max_new_tokens + 2
    cache_len = max_len or self.plan_cache_len(longest, max_new_tokens)
    if needed > cache_len:
      raise ValueError(f"the longest prompt has {longest} tokens; with max_new_tokens="
                       f"{max_new_tokens} it needs {needed} cache slots, but the cache holds "
                       f"{cache_len}: shorten the prompt, lower --max-new-tokens or raise --max-len")
    if longest + max_new_tokens > self.cfg.max_position_embeddings:
      raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"the model's max_position_embeddings={self.cfg.max_position_embeddings}")
    batch = len(prompts)
    width = min(_bucket(longest), cache_len)
    tokens = np.zeros((batch, width), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    stats = Stats(batch=batch, prompt_tokens=sum(lengths))
    out = [Completion(list(map(int, p)), []) for p in prompts]
    done = [False] * batch
    eos = set(int(e) for e in eos_ids)

    def accept(row: int, new: list[int]):
      if done[row]:
        return
      kept = []
      for t in new:
        kept.append(t)
        out[row].output_ids.append(t)
        if t in eos:
          done[row], out[row].finish_reason = True, "eos"
        elif should_stop is not None and should_stop(row, out[row].output_ids):
          done[row], out[row].finish_reason = True, "stop"
        elif len(out[row].output_ids) >= max_new_tokens:
          done[row], out[row].finish_reason = True, "length"
        if done[row]:
          break
      if kept and on_tokens is not None:
        on_tokens(row, kept)

    key = jax.random.key(seed)
    t0 = time.perf_counter()
    key, k = jax.random.split(key)
    block = max(1, self.prefill_tokens // width)
    parts = []
    for r0 in range(0, batch, block):  # row blocks bound prefill memory; same key per block
      rows = slice(r0, min(r0 + block, batch))
      cache = init_cache(self.cfg, rows.stop - r0, cache_len, self.cache_dtype, with_mtp=self.mtp)
      parts.append(_prefill(self.graph, self.params, jnp.asarray(tokens[rows]),
                            jnp.asarray(lengths[rows], jnp.int32), cache,
                            jax.random.fold_in(k, r0), sampling=sampling, mtp=self.mtp))
    first = jnp.concatenate([p[0] for p in parts])
    draft = jnp.concatenate([p[1] for p in parts])
    cache = parts[0][2] if len(parts) == 1 else concat_rows([p[2] for p in parts])
    del parts
    first_host = np.asarray(first)
    stats.time_to_first_token_s = time.perf_counter() - t0
    for i in range(batch):
      accept(i, [int(first_host[i])])
    cur, pos = first, jnp.asarray(lengths, jnp.int32)
    t1 = time.perf_counter()
    while not all(done):
      if not sampling.greedy:      # greedy steps use no key: no split (a device call) per chunk
        key, k = jax.random.split(key)
      if self.mtp:
        steps, cur, draft, pos, cache = _decode_mtp(
            self.graph, self.params, cur, draft, pos, cache, k, sampling=sampling,
            steps=self.chunk)
        steps = np.asarray(steps).tolist()
        for i in range(batch):
          if done[i]:
            continue
          new = []
          for a, b, acc in steps[i]:
            new += [a, b] if acc else [a]
            stats.mtp_steps += 1
            stats.mtp_accepted += acc
            if len(out[i].output_ids) + len(new) >= max_new_tokens:
              break
          accept(i, new)
      else:
        toks, cur, pos, cache = _decode(self.graph, self.params, cur, pos, cache, k,
                                        sampling=sampling, steps=self.chunk)
        toks = np.asarray(toks)
        for i in range(batch):
          accept(i, [int(t) for t in toks[i]])
    stats.decode_time_s = time.perf_counter() - t1
    stats.generated_tokens = sum(len(c.output_ids) for c in out)
    return out, stats

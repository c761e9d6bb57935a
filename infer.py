#!/usr/bin/env python3
"""Text generation with a DeepSeek-V3-architecture checkpoint.

Examples:
  python infer.py --ckpt /data/DeepSeek-V3 --prompt "Write a haiku about JAX."
  python infer.py --ckpt /data/DeepSeek-V3 --chat
  python infer.py --ckpt DIR --raw --prompt "def fibonacci(n):" --temperature 0 --max-new-tokens 64
  python infer.py --ckpt DIR --input-file prompts.txt --json > out.json
  python infer.py --ckpt DIR --prompt "..." --mtp --temperature 0      # MTP speculative decoding

The checkpoint is an HF directory (config.json + safetensors, FP8 or bf16) or a converted Orbax
directory; its tokenizer files (tokenizer.json, tokenizer_config.json) must be beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

log = logging.getLogger("infer")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description="Generate text with a DeepSeek-V3-architecture model (JAX).",
      epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True, help="checkpoint directory (HF safetensors or Orbax)")
  p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint directory)")
  src = p.add_argument_group("input (one of)")
  src.add_argument("--prompt", action="append", default=[],
                   help="a prompt; repeat for a batch")
  src.add_argument("--input-file", help="a UTF-8 text file, one prompt per line (blank lines "
                                        "skipped), run in batches of --batch-size")
  src.add_argument("--chat", action="store_true",
                   help="interactive multi-turn chat (/clear resets history, /exit quits)")
  p.add_argument("--raw", action="store_true",
                 help="send prompts as they are, without the chat template")
  g = p.add_argument_group("generation")
  g.add_argument("--max-new-tokens", type=int, default=256, help="per prompt (default 256)")
  g.add_argument("--temperature", type=float, default=0.2,
                 help="0 = greedy; default 0.2 as DeepSeek's generate.py")
  g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
  g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
  g.add_argument("--seed", type=int, default=0, help="sampling seed (runs are reproducible)")
  g.add_argument("--stop", action="append", default=[],
                 help="stop a row when this string appears (repeatable; not included)")
  g.add_argument("--mtp", action="store_true",
                 help="MTP speculative decoding: the MTP module drafts, the model verifies")
  g.add_argument("--compare-plain", action="store_true",
                 help="with --mtp: also run plain decoding and print the measured speedup "
                      "(both compiled first, on the first batch)")
  m = p.add_argument_group("model")
  m.add_argument("--dtype", choices=["bfloat16", "float32"],
                 help="parameter/activation dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
  m.add_argument("--fp8", action="store_true",
                 help="keep FP8 weights as e4m3 + block scales (FP8 checkpoints only)")
  m.add_argument("--max-len", type=int,
                 help="cache length in tokens (default: longest prompt + max-new-tokens)")
  m.add_argument("--batch-size", type=int, default=8, help="rows per batch for --input-file")
  m.add_argument("--chunk", type=int, default=8, help="decode steps per device call")
  m.add_argument("--gemv", choices=["auto", "on", "off"], default="auto",
                 help="decode projections, routed experts and the W_UK absorption of few rows "
                      "through the kernels that read weights in place (GEMVs, mla_absorb): "
                      "auto = on GPUs (default), off = XLA's dots, gathers and reductions")
  m.add_argument("--unstack-layers", action="store_true",
                 help="give every layer arrays of its own instead of scanning the stacked layers "
                      "(kernels then read every weight in place; compile time grows with depth)")
  o = p.add_argument_group("output")
  o.add_argument("--json", action="store_true",
                 help="print JSON: prompt ids, output ids, text and timings")
  o.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
  args = p.parse_args(argv)
  modes = sum([bool(args.prompt), bool(args.input_file), args.chat])
  if modes != 1:
    p.error("give exactly one of --prompt, --input-file or --chat")
  if args.chat and args.json:
    p.error("--json is for --prompt / --input-file runs, not --chat")
  if args.compare_plain and not args.mtp:
    p.error("--compare-plain needs --mtp")
  return args


def read_prompts(path: str) -> list[str]:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise SystemExit(f"error: cannot read --input-file {path}: {e.strerror}")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise SystemExit(f"error: --input-file {path} is not UTF-8 text: byte {e.start} "
                     f"(line {line}) is {raw[e.start:e.start + 1]!r}")
  prompts = [line for line in text.splitlines() if line.strip()]
  if not prompts:
    raise SystemExit(f"error: --input-file {path} has no prompts (every line is blank)")
  return prompts


def load_model(path: str, dtype: str, fp8: bool, quiet: bool):
  """An Orbax directory from `python -m dsv3_jax.convert` (restored as stored: FP8 stays FP8),
  or an HF directory (FP8 weights dequantized to `dtype` unless `fp8`)."""
  import jax.numpy as jnp

  from dsv3_jax.checkpoint import from_hf_pretrained
  from dsv3_jax.orbax_checkpoint import PARAMS, from_pretrained

  if not os.path.isdir(path):
    raise SystemExit(f"error: --ckpt {path} is not a directory")
  t0 = time.perf_counter()
  orbax = os.path.isdir(os.path.join(path, PARAMS))
  if orbax:
    model = from_pretrained(path, dtype=None if fp8 else jnp.dtype(dtype),
                            compute_dtype=jnp.dtype(dtype))
  else:
    model = from_hf_pretrained(path, jnp.dtype(dtype), fp8=fp8, progress=not quiet)
  if not quiet:
    kind = "Orbax" if orbax else "HF"
    print(f"loaded {kind} checkpoint {path} ({dtype}{', fp8 weights' if fp8 else ''}) in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
  return model


def engine_options(args) -> dict:
  """generate.Engine's keyword arguments from the command line (all but `mtp`)."""
  gemv = {"auto": None, "on": True, "off": False}[args.gemv]
  return dict(chunk=args.chunk, unstack=args.unstack_layers, expert_gemv=gemv, dense_gemv=gemv,
              absorb_kernel=gemv)


class Session:
  """The model, tokenizer and engine, plus the text-level pieces (templates, stop strings)."""

  def __init__(self, args):
    import jax

    from dsv3_jax.generate import Engine
    from dsv3_jax.sampling import SamplingParams
    from dsv3_jax.tokenizer import Tokenizer, TokenizerError

    self.args = args
    try:
      self.tok = Tokenizer(args.tokenizer or args.ckpt)
    except TokenizerError as e:
      raise SystemExit(f"error: {e}")
    platform = jax.devices()[0].platform
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    self.model = load_model(args.ckpt, dtype, args.fp8, args.quiet)
    if self.tok.vocab_size > self.model.cfg.vocab_size:
      raise SystemExit(f"error: the tokenizer has {self.tok.vocab_size} tokens but the model's "
                       f"vocab_size is {self.model.cfg.vocab_size}: wrong tokenizer?")
    self.engine = Engine(self.model, mtp=args.mtp, **engine_options(args))
    self.sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p)

  def encode(self, text: str) -> list[int]:
    if not text.strip():
      raise ValueError("empty prompt: give some text")
    if self.args.raw:
      return self.tok.encode(text)
    return self.tok.encode_chat([{"role": "user", "content": text}])

  def _cut_at_stop(self, text: str) -> tuple[str, bool]:
    hits = [text.index(s) for s in self.args.stop if s in text]
    return (text[:min(hits)], True) if hits else (text, False)

  def run(self, prompt_ids: list[list[int]], stream: bool, engine=None):
    """Generates for a batch; streams text to stdout when `stream` (one row)."""
    shown = [""]

    def on_tokens(row, _new):
      text, _ = self._cut_at_stop(self.tok.decode(outputs_so_far[row]))
      if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
        return
      sys.stdout.write(text[len(shown[0]):])
      sys.stdout.flush()
      shown[0] = text

    outputs_so_far = [[] for _ in prompt_ids]

    def should_stop(row, ids):
      outputs_so_far[row] = ids
      return bool(self.args.stop) and self._cut_at_stop(self.tok.decode(ids))[1]

    completions, stats = (engine or self.engine).generate(
        prompt_ids, max_new_tokens=self.args.max_new_tokens, sampling=self.sampling,
        eos_ids=self.tok.eos_ids, seed=self.args.seed, max_len=self.args.max_len,
        should_stop=should_stop, on_tokens=on_tokens if stream else None)
    texts = [self._cut_at_stop(self.tok.decode(c.output_ids))[0] for c in completions]
    if stream:
      sys.stdout.write(texts[0][len(shown[0]):] + "\n")
      sys.stdout.flush()
    return completions, stats, texts


def peak_memory_bytes():
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # not every backend reports memory
    stats = {}
  return stats.get("peak_bytes_in_use")


def _timing_line(stats) -> str:
  s = (f"[{stats.batch} row(s): {stats.prompt_tokens} prompt tokens, "
       f"{stats.generated_tokens} generated; first token {stats.time_to_first_token_s * 1e3:.0f} ms"
       f", prefill {stats.prefill_tok_s:.0f} tok/s, decode {stats.decode_tok_s:.1f} tok/s")
  if stats.mtp_steps:
    s += f", MTP acceptance {stats.acceptance_rate:.1%}"
  return s + "]"


def batch_mode(session: Session, texts: list[str]) -> int:
  args = session.args
  try:
    ids = [session.encode(t) for t in texts]
  except ValueError as e:
    raise SystemExit(f"error: {e}")
  records, all_stats = [], []
  stream = len(texts) == 1 and not args.json
  rows = args.batch_size if args.input_file else len(ids)
  plain = None
  if args.compare_plain:  # compile both engines on the first batch: timings exclude compiling
    from dsv3_jax.generate import Engine
    plain = Engine(session.model, mtp=False, **engine_options(args))
    try:
      for engine in (session.engine, plain):
        session.run(ids[:rows], stream=False, engine=engine)
    except ValueError as e:
      raise SystemExit(f"error: {e}")
  for start in range(0, len(ids), rows):
    chunk = ids[start:start + rows]
    try:
      comps, stats, outs = session.run(chunk, stream)
    except ValueError as e:
      raise SystemExit(f"error: {e}")
    all_stats.append(stats)
    for k, (c, text) in enumerate(zip(comps, outs)):
      records.append({"prompt": texts[start + k], "prompt_ids": c.prompt_ids,
                      "output_ids": c.output_ids, "text": text,
                      "finish_reason": c.finish_reason})
      if not stream and not args.json:
        print(f"=== prompt {start + k + 1}: {texts[start + k]!r}\n{text}\n")
    if not args.quiet:
      print(_timing_line(stats), file=sys.stderr)
  speedup = None
  if plain is not None:
    _, base, _ = session.run(ids[:rows], stream=False, engine=plain)
    speedup = all_stats[0].decode_tok_s / base.decode_tok_s if base.decode_tok_s else None
    if not args.quiet:
      print(f"[plain decoding: {base.decode_tok_s:.1f} tok/s; MTP speedup {speedup:.2f}x]",
            file=sys.stderr)
  if args.json:
    first = all_stats[0]
    timings = {
        "time_to_first_token_s": first.time_to_first_token_s,
        "prefill_tok_s": first.prefill_tok_s,
        "decode_tok_s": sum(s.decode_tok_s for s in all_stats) / len(all_stats),
        "peak_device_memory_bytes": peak_memory_bytes(),
        "batches": [s.as_dict() for s in all_stats],
    }
    if args.mtp:
      steps = sum(s.mtp_steps for s in all_stats)
      timings["mtp_acceptance_rate"] = sum(s.mtp_accepted for s in all_stats) / max(steps, 1)
      timings["mtp_speedup"] = speedup
    print(json.dumps({"results": records, "timings": timings}, indent=2))
  return 0


def chat_mode(session: Session) -> int:
  history: list[dict[str, str]] = []
  print("chat: /clear resets the conversation, /exit quits", file=sys.stderr)
  while True:
    try:
      line = input("\n> ")
    except (EOFError, KeyboardInterrupt):
      print()
      return 0
    cmd = line.strip()
    if cmd in ("/exit", "/quit"):
      return 0
    if cmd == "/clear":
      history.clear()
      print("(history cleared)", file=sys.stderr)
      continue
    if not cmd:
      continue
    history.append({"role": "user", "content": line})
    ids = (session.tok.encode("".join(m["content"] for m in history)) if session.args.raw
           else session.tok.encode_chat(history))
    try:
      _, stats, texts = session.run([ids], stream=True)
    except ValueError as e:
      history.pop()
      print(f"error: {e}", file=sys.stderr)
      continue
    history.append({"role": "assistant", "content": texts[0]})
    if not session.args.quiet:
      print(_timing_line(stats), file=sys.stderr)


def main(argv=None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                      format="%(name)s: %(message)s")
  texts = [] if args.chat else (args.prompt or read_prompts(args.input_file))
  for i, t in enumerate(texts):  # checked before the (slow) model load
    if not t.strip():
      raise SystemExit(f"error: prompt {i + 1} is empty: give some text")
  session = Session(args)
  if args.chat:
    return chat_mode(session)
  return batch_mode(session, texts)


if __name__ == "__main__":
  sys.exit(main())

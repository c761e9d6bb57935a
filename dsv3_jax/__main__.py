"""Command line: `python -m dsv3_jax {info,demo} ...` (see --help)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd_info(args) -> int:
  from dsv3_jax.config import ConfigError, load_config
  from dsv3_jax.info import format_facts, model_facts

  try:
    cfg = load_config(args.config)
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  facts = model_facts(cfg)
  if args.json:
    print(json.dumps({"config": args.config, **facts}, indent=2))
  else:
    print(format_facts(args.config, facts))
  return 0


def _cmd_demo(args) -> int:
  """A tiny DeepSeek-V3 checkpoint (HF format) end to end on the CPU: load, check against HF's
  logits, generate greedily over the compressed cache, and size the real model."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dsv3_jax import core, from_hf_pretrained, load_config
  from dsv3_jax.cache import init_cache
  from dsv3_jax.info import format_facts, model_facts

  ckpt = args.ckpt
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; checkpoint {ckpt}")
  t0 = time.perf_counter()
  model = from_hf_pretrained(ckpt, jnp.float32)
  cfg = model.cfg
  print(f"loaded in {time.perf_counter() - t0:.1f}s: {cfg.num_hidden_layers} layers "
        f"({cfg.num_dense_layers} dense, {cfg.num_moe_layers} MoE with {cfg.n_routed_experts} "
        f"experts, top-{cfg.num_experts_per_tok}), {cfg.num_nextn_predict_layers} MTP module(s)")
  expected = os.path.join(ckpt, "expected.npz")
  if os.path.exists(expected):
    ref = np.load(expected)
    got = np.asarray(model(jnp.asarray(ref["input_ids"])))
    rel = np.linalg.norm(got - ref["logits"]) / np.linalg.norm(ref["logits"])
    print(f"logits vs HF transformers (fp32): relative error {rel:.2e}")

  graphdef, params = core.split(model)
  prompt = jnp.asarray([[0, 17, 42, 99, 7, 3, 250, 64]], jnp.int32)
  steps = args.new_tokens
  cache = init_cache(cfg, batch=1, max_len=prompt.shape[1] + steps, dtype=jnp.float32)
  t0 = time.perf_counter()
  logits, _, cache = core.prefill(graphdef, params, prompt, cache)
  tokens = [int(jnp.argmax(logits[0, -1]))]
  for i in range(steps - 1):
    pos = jnp.asarray([prompt.shape[1] + i], jnp.int32)
    logits, _, cache = core.decode_step(graphdef, params, jnp.asarray([[tokens[-1]]]), pos, cache)
    tokens.append(int(jnp.argmax(logits[0, -1])))
  dt = time.perf_counter() - t0
  print(f"greedy continuation of {prompt[0].tolist()}: {tokens}  ({steps / dt:.1f} tok/s, "
        f"compile included)")
  full = np.asarray(jnp.argmax(core.forward(graphdef, params, jnp.concatenate(
      [prompt, jnp.asarray([tokens[:-1]])], axis=1))[0][0, prompt.shape[1] - 1:], -1))
  same = full.tolist() == tokens
  print(f"absorbed-cache decode == argmax of one full forward: {same}")
  print()
  big = os.path.join(_REPO, "configs", "deepseek_v3_671b.json")
  if os.path.exists(big):
    print(format_facts("DeepSeek-V3 671B (configs/deepseek_v3_671b.json, via jax.eval_shape)",
                       model_facts(load_config(big))))
  return 0 if same else 1


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dsv3_jax",
      description="dsv3-jax: DeepSeek-V3 in JAX/Flax. Subcommands print model facts or run the "
                  "CPU demo.")
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("info", help="parameter counts and cache size of a config (no weights)",
                     description="Total parameters (without MTP), MTP parameters, active "
                                 "parameters per token and compressed-cache bytes per token, "
                                 "computed with jax.eval_shape. Example: python -m dsv3_jax info "
                                 "configs/deepseek_v3_671b.json")
  p.add_argument("config", help="an HF config.json (or a directory holding one)")
  p.add_argument("--json", action="store_true", help="print JSON instead of text")
  p.set_defaults(fn=_cmd_info)
  p = sub.add_parser("demo", help="run a tiny model end to end on the CPU",
                     description="Loads a tiny HF-format DeepSeek-V3 checkpoint, compares its "
                                 "logits with HF transformers', and decodes greedily.")
  p.add_argument("--ckpt", default=os.path.join(_REPO, "tests", "fixtures", "tiny_v3"),
                 help="HF checkpoint directory (default: the tiny test fixture)")
  p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
  p.set_defaults(fn=_cmd_demo)
  args = parser.parse_args(argv)
  return args.fn(args)


if __name__ == "__main__":
  sys.exit(main())

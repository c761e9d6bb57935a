"""infer.py end to end on the tiny checkpoint with a small trained BPE tokenizer."""

import json
import os

import jax.numpy as jnp
import pytest

import infer
from conftest import fixture_path
from dsv3_jax import core, from_hf_pretrained

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """The tiny_v3 weights with a 200-token BPE tokenizer (fits the 256-token vocab)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

  d = tmp_path_factory.mktemp("ckpt")
  src = fixture_path("tiny_v3")
  for name in os.listdir(src):
    if name != "expected.npz":
      os.symlink(os.path.join(src, name), d / name)
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<bos>", "<eos>", "<unk>"])
  text = ["def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
          "the quick brown fox jumps over the lazy dog", "hello world, print('hi')"] * 20
  tok.train_from_iterator(text, trainer)
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "add_bos_token": True,
       "chat_template": TEMPLATE}))
  return d


def run_json(capsys, *argv):
  assert infer.main(["--quiet", "--json", *argv]) == 0
  return json.loads(capsys.readouterr().out)


def test_greedy_cli_matches_full_forwards(ckpt, capsys):
  out = run_json(capsys, "--ckpt", str(ckpt), "--raw", "--prompt", "def fibonacci(n):",
                 "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "6")
  model = from_hf_pretrained(str(ckpt), jnp.float32)
  graphdef, params = core.split(model)
  for rec in out["results"]:
    assert rec["prompt_ids"][0] == 0  # <bos> added in raw mode (add_bos_token)
    seq = list(rec["prompt_ids"])
    for _ in range(6):
      logits, _ = core.forward(graphdef, params, jnp.asarray([seq]))
      seq.append(int(jnp.argmax(logits[0, -1])))
    assert rec["output_ids"] == seq[len(rec["prompt_ids"]):]
    assert isinstance(rec["text"], str)
  t = out["timings"]
  assert t["time_to_first_token_s"] > 0 and t["decode_tok_s"] > 0
  assert "peak_device_memory_bytes" in t


def test_chat_template_and_mtp(ckpt, capsys):
  plain = run_json(capsys, "--ckpt", str(ckpt), "--prompt", "hello world", "--temperature", "0",
                   "--max-new-tokens", "5")
  spec = run_json(capsys, "--ckpt", str(ckpt), "--prompt", "hello world", "--temperature", "0",
                  "--max-new-tokens", "5", "--mtp")
  ids = plain["results"][0]["prompt_ids"]
  from dsv3_jax.tokenizer import Tokenizer
  tok = Tokenizer(str(ckpt))
  assert ids == tok.encode("<bos><|user|>hello world<|assistant|>", add_bos=False)
  assert spec["results"][0]["output_ids"] == plain["results"][0]["output_ids"]
  assert 0.0 <= spec["timings"]["mtp_acceptance_rate"] <= 1.0


def test_input_file_batches(ckpt, tmp_path, capsys):
  f = tmp_path / "p.txt"
  f.write_text("hello\n\nthe quick brown fox\ndef f(n):\n")
  out = run_json(capsys, "--ckpt", str(ckpt), "--input-file", str(f), "--raw", "--batch-size",
                 "2", "--max-new-tokens", "3", "--temperature", "0")
  assert [r["prompt"] for r in out["results"]] == ["hello", "the quick brown fox", "def f(n):"]
  assert len(out["timings"]["batches"]) == 2
  single = run_json(capsys, "--ckpt", str(ckpt), "--prompt", "def f(n):", "--raw",
                    "--max-new-tokens", "3", "--temperature", "0")
  assert single["results"][0]["output_ids"] == out["results"][2]["output_ids"]


@pytest.mark.parametrize("argv, words", [
    (["--prompt", ""], "prompt 1 is empty"),
    (["--prompt", "hello " * 40, "--max-len", "32", "--max-new-tokens", "8"],
     "prompt has 42 tokens.*the cache holds 32"),
])
def test_bad_prompts(ckpt, argv, words):
  with pytest.raises(SystemExit, match=words):
    infer.main(["--quiet", "--ckpt", str(ckpt), "--raw", *argv])


def test_missing_tokenizer(tmp_path):
  with pytest.raises(SystemExit, match="no tokenizer.json in"):
    infer.main(["--quiet", "--ckpt", fixture_path("tiny_v3"), "--prompt", "hi"])


def test_non_utf8_input_file(ckpt, tmp_path):
  f = tmp_path / "bad.txt"
  f.write_bytes(b"hello\n\xff\xfe oops\n")
  with pytest.raises(SystemExit, match=r"not UTF-8 text: byte 6 \(line 2\)"):
    infer.main(["--quiet", "--ckpt", str(ckpt), "--input-file", str(f)])


def test_help_explains():
  with pytest.raises(SystemExit) as e:
    infer.main(["--help"])
  assert e.value.code == 0


def test_orbax_checkpoint_gives_the_same_output(ckpt, tmp_path, capsys):
  from dsv3_jax.convert import convert_hf_to_orbax
  out = tmp_path / "orbax"
  convert_hf_to_orbax(str(ckpt), str(out))
  assert (out / "tokenizer.json").exists()
  argv = ["--raw", "--prompt", "the quick", "--temperature", "0", "--max-new-tokens", "5",
          "--dtype", "float32"]
  hf = run_json(capsys, "--ckpt", str(ckpt), *argv)
  orbax = run_json(capsys, "--ckpt", str(out), *argv)
  assert orbax["results"][0]["output_ids"] == hf["results"][0]["output_ids"]


def test_gemv_option_reaches_the_engine():
  args = infer.parse_args(["--ckpt", "x", "--prompt", "p", "--gemv", "off", "--chunk", "4"])
  assert infer.engine_options(args) == dict(chunk=4, unstack=False, expert_gemv=False,
                                            dense_gemv=False, absorb_kernel=False)
  default = infer.engine_options(infer.parse_args(["--ckpt", "x", "--prompt", "p"]))
  assert default["expert_gemv"] is None and default["dense_gemv"] is None
  assert default["absorb_kernel"] is None

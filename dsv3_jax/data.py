"""Training data: a byte-level BPE tokenizer, a memory-mapped token file, shuffled packing.

    files = corpus_files("stdlib")                       # the embedded default corpus
    tok_dir = train_tokenizer(files, "data/tokenizer", vocab_size=8192)
    token_file = tokenize_corpus(files, tok_dir, "data/tokens.bin")
    ds = PackedDataset(token_file, seq_len=512, seed=0)
    batch = ds.batch(position, 64)                       # [64, 513] int32, deterministic

The corpus is tokenized once into a flat uint16/uint32 file: each document as
[bos] + tokens + [eos]. The stream is cut into windows of seq_len + 1 tokens (input and
shifted target); windows are visited in a fresh random order each epoch, drawn from
(seed, epoch) alone, so the batch at any position is a pure function of (seed, position): the
position is all a checkpoint needs to resume the data exactly.

The default corpus is the Python standard library's own source (`sysconfig`'s stdlib
directory), which every machine with Python has.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import uuid
from typing import Iterable, Sequence

import numpy as np

BOS, EOS, USER, ASSISTANT = "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT)
# Renders [{"role", "content"}, ...] as <|bos|>[system\n]<|user|>...<|assistant|>...<|eos|>...
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def corpus_files(spec: str = "stdlib") -> list[str]:
  """The documents of a corpus, sorted (a stable order on every machine).

  Args:
    spec: "stdlib" (every .py file of the Python standard library, site-packages excluded),
      a directory (its files, recursively), or a glob pattern.
  """
  if spec == "stdlib":
    root = sysconfig.get_paths()["stdlib"]
    files = [p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
             if "site-packages" not in os.path.relpath(p, root).split(os.sep)]
  elif os.path.isdir(spec):
    files = [p for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
             if os.path.isfile(p)]
  else:
    files = glob.glob(spec, recursive=True)
  files = sorted(files)
  if not files:
    raise FileNotFoundError(f"corpus {spec!r} has no files")
  return files


def read_text(path: str) -> str:
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def train_tokenizer(files: Sequence[str], out_dir: str, vocab_size: int = 8192) -> str:
  """Trains a byte-level BPE tokenizer on `files`; writes tokenizer.json, tokenizer_config.json
  (bos/eos, add_bos_token, a simple chat template) and generation_config.json into out_dir.

  Returns out_dir. Special tokens come first: <|bos|> 0, <|eos|> 1, <|user|> 2, <|assistant|> 3.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"{vocab_size=} must cover the 256 bytes and {len(SPECIAL_TOKENS)} specials")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator((read_text(p) for p in files), trainer, length=len(files))
  os.makedirs(out_dir, exist_ok=True)
  _atomic_write(os.path.join(out_dir, "tokenizer.json"), tok.to_str())
  config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True,
            "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 1 << 20}
  _atomic_write(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2))
  gen = {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS)}
  _atomic_write(os.path.join(out_dir, "generation_config.json"), json.dumps(gen, indent=2))
  return out_dir


def _atomic_write(path: str, data: str | bytes):
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # unique: several processes may build the same file
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  os.replace(tmp, path)


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def tokenize_corpus(files: Sequence[str], tokenizer_dir: str, out_path: str,
                    chunk: int = 256) -> str:
  """Tokenizes every document once into a flat token file (+ `<out_path>.json` metadata).

  Each document becomes [bos] + tokens + [eos]; uint16 when the vocabulary fits, else uint32.
  Returns out_path.
  """
  from tokenizers import Tokenizer

  tok_path = os.path.join(tokenizer_dir, "tokenizer.json")
  tok = Tokenizer.from_file(tok_path)
  bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
  dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
  tmp = f"{out_path}.{uuid.uuid4().hex}.tmp"
  total = 0
  with open(tmp, "wb") as f:
    for start in range(0, len(files), chunk):
      texts = [read_text(p) for p in files[start:start + chunk]]
      for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = np.asarray([bos] + enc.ids + [eos], dtype)
        f.write(ids.tobytes())
        total += ids.size
  meta = {"dtype": np.dtype(dtype).name, "num_tokens": total, "num_documents": len(files),
          "tokenizer_sha256": _sha256(tok_path), "bos_id": bos, "eos_id": eos}
  _atomic_write(out_path + ".json", json.dumps(meta, indent=2))
  os.replace(tmp, out_path)
  return out_path


def prepare(corpus: str, data_dir: str, vocab_size: int, tokenizer_dir: str | None = None,
            log=print) -> tuple[str, str]:
  """Builds (once) the tokenizer and the token file of `corpus` under data_dir.

  Returns (tokenizer_dir, token_file). A given tokenizer_dir is used as it is; otherwise one is
  trained into data_dir/tokenizer. Existing files are reused when they match.
  """
  os.makedirs(data_dir, exist_ok=True)
  files = None
  if tokenizer_dir is None:
    tokenizer_dir = os.path.join(data_dir, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
      files = corpus_files(corpus)
      log(f"training a {vocab_size}-token byte-level BPE tokenizer on {len(files)} files of "
          f"{corpus!r}")
      train_tokenizer(files, tokenizer_dir, vocab_size)
  token_file = os.path.join(data_dir, "tokens.bin")
  sha = _sha256(os.path.join(tokenizer_dir, "tokenizer.json"))
  meta_path = token_file + ".json"
  if os.path.exists(token_file) and os.path.exists(meta_path):
    with open(meta_path) as f:
      if json.load(f).get("tokenizer_sha256") == sha:
        return tokenizer_dir, token_file
  files = files or corpus_files(corpus)
  log(f"tokenizing {len(files)} files of {corpus!r} into {token_file}")
  tokenize_corpus(files, tokenizer_dir, token_file)
  return tokenizer_dir, token_file


class PackedDataset:
  """Fixed windows of seq_len + 1 tokens over a token file, in a shuffled, resumable order.

  Args:
    token_file: written by tokenize_corpus (its .json beside it).
    seq_len: T; each row holds T + 1 tokens (inputs row[:-1], targets row[1:]).
    seed: the shuffle seed.
    split: "train", or "val" (the last `val_fraction` of the stream, never trained on).
  """

  def __init__(self, token_file: str, seq_len: int, seed: int = 0, split: str = "train",
               val_fraction: float = 0.005):
    with open(token_file + ".json") as f:
      self.meta = json.load(f)
    self.tokens = np.memmap(token_file, dtype=self.meta["dtype"], mode="r")
    self.seq_len, self.seed, self.split = seq_len, seed, split
    windows = (self.tokens.size - 1) // seq_len
    n_val = max(1, int(windows * val_fraction))
    if windows - n_val < 1:
      raise ValueError(f"{token_file} holds {self.tokens.size} tokens: too few for windows of "
                       f"{seq_len + 1} (and a validation split)")
    if split == "train":
      self.first, self.count = 0, windows - n_val
    elif split == "val":
      self.first, self.count = windows - n_val, n_val
    else:
      raise ValueError(f"{split=} must be 'train' or 'val'")
    self._perm_cache: tuple[int, np.ndarray] | None = None

  def _perm(self, epoch: int) -> np.ndarray:
    if self._perm_cache is None or self._perm_cache[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._perm_cache = (epoch, rng.permutation(self.count))
    return self._perm_cache[1]

  def window(self, position: int) -> np.ndarray:
    """The window at a position of the infinite shuffled sequence: [T + 1] int32."""
    epoch, i = divmod(position, self.count)
    w = self.first + int(self._perm(epoch)[i])
    start = w * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)

  def batch(self, position: int, rows: int) -> np.ndarray:
    """Windows position .. position + rows - 1: [rows, T + 1] int32."""
    return np.stack([self.window(p) for p in range(position, position + rows)])

  def epochs(self, position: int) -> float:
    return position / self.count

  def iter_batches(self, position: int, rows: int) -> Iterable[np.ndarray]:
    while True:
      yield self.batch(position, rows)
      position += rows

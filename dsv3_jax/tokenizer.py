"""Tokenizer: HF `tokenizers` (tokenizer.json) + the chat template of tokenizer_config.json.

The chat template is rendered with jinja2 in a sandbox, as transformers does (same globals:
`raise_exception`, `strftime_now`; `trim_blocks` and `lstrip_blocks` on).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence


class TokenizerError(ValueError):
  """A missing or unusable tokenizer."""


def _token_text(tok: Any) -> str | None:
  if isinstance(tok, dict):  # serialized AddedToken
    return tok.get("content")
  return tok


class Tokenizer:
  """Encodes and decodes text; renders chat messages.

  Args:
    directory: holds tokenizer.json, optionally tokenizer_config.json (chat_template,
      bos/eos tokens, add_bos_token) and generation_config.json (eos_token_id).
  """

  def __init__(self, directory: str):
    from tokenizers import Tokenizer as HFTokenizer

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
      raise TokenizerError(f"no tokenizer.json in {directory}: put the model's tokenizer files "
                           "(tokenizer.json, tokenizer_config.json) beside its weights")
    try:
      self._tok = HFTokenizer.from_file(path)
    except Exception as e:  # the library raises plain Exceptions for bad files
      raise TokenizerError(f"cannot read {path}: {e}") from None
    conf: dict[str, Any] = {}
    conf_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(conf_path):
      with open(conf_path) as f:
        conf = json.load(f)
    self.chat_template: str | None = conf.get("chat_template")
    if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in self.chat_template}
      self.chat_template = named.get("default") or next(iter(named.values()), None)
    self.bos_token = _token_text(conf.get("bos_token"))
    self.eos_token = _token_text(conf.get("eos_token"))
    self.add_bos = bool(conf.get("add_bos_token", False)) and self.bos_token is not None
    eos = set()
    if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
      eos.add(self._tok.token_to_id(self.eos_token))
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.exists(gen_path):
      with open(gen_path) as f:
        e = json.load(f).get("eos_token_id")
      eos.update(e if isinstance(e, list) else [] if e is None else [e])
    self.eos_ids = sorted(eos)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; a BOS token first when the tokenizer config asks for one."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    bos = self.add_bos if add_bos is None else add_bos
    if bos and self.bos_token is not None:
      bos_id = self._tok.token_to_id(self.bos_token)
      if bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """Renders [{"role": ..., "content": ...}, ...] with the model's chat template."""
    if not self.chat_template:
      raise TokenizerError("this tokenizer has no chat_template in tokenizer_config.json: "
                           "use --raw to send prompts as they are")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      return env.from_string(self.chat_template).render(
          messages=messages, add_generation_prompt=add_generation_prompt,
          bos_token=self.bos_token or "", eos_token=self.eos_token or "")
    except TemplateError as e:
      raise TokenizerError(f"chat template failed: {e}") from None

  def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
    """Template-rendered ids (the template writes BOS itself, so none is added here)."""
    return self.encode(self.apply_chat_template(messages), add_bos=False)

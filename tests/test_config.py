"""ModelConfig: reading the released HF configs, writing them back, rejecting what we don't support."""

import json
import math
import os

import numpy as np
import pytest

from conftest import REPO
from dsv3_jax.config import ConfigError, ModelConfig, load_config
from dsv3_jax.layers import rope_inv_freq

CONFIGS = os.path.join(REPO, "configs")


def _raw(name):
  with open(os.path.join(CONFIGS, name + ".json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", ["deepseek_v3_671b", "deepseek_v3_1", "deepseek_v2_236b",
                                  "deepseek_v2_lite_16b", "tiny_v3", "tiny_v3_noqlora"])
def test_round_trip(name, tmp_path):
  cfg = load_config(os.path.join(CONFIGS, name + ".json"))
  cfg.save(tmp_path)
  again = load_config(tmp_path)
  assert again == cfg
  assert again.extra == cfg.extra
  written = json.loads((tmp_path / "config.json").read_text())
  raw = _raw(name)
  for key in raw:  # nothing the released file says is lost or changed
    if isinstance(raw[key], dict):
      for k in raw[key]:
        assert written[key][k] == raw[key][k], (key, k)
    else:
      assert written[key] == raw[key], key


def test_released_shapes():
  v3 = load_config(os.path.join(CONFIGS, "deepseek_v3_671b.json"))
  assert (v3.hidden_size, v3.num_hidden_layers, v3.n_routed_experts, v3.q_lora_rank) == (
      7168, 61, 256, 1536)
  assert v3.scoring_func == "sigmoid" and v3.group_scoring == "top2_sum" and v3.has_correction_bias
  assert v3.quantization is not None and v3.quantization.scale_fmt is None
  assert v3.cache_values_per_token == 576
  assert math.isclose(v3.softmax_scale, 0.1352338, rel_tol=1e-6)
  v31 = load_config(os.path.join(CONFIGS, "deepseek_v3_1.json"))
  assert v31.quantization.scale_fmt == "ue8m0"
  lite = load_config(os.path.join(CONFIGS, "deepseek_v2_lite_16b.json"))
  assert lite.q_lora_rank is None and lite.scoring_func == "softmax"
  assert not lite.has_correction_bias and lite.group_scoring == "max"
  assert math.isclose(lite.softmax_scale, 0.1147214, rel_tol=1e-6)
  v2 = load_config(os.path.join(CONFIGS, "deepseek_v2_236b.json"))
  assert (v2.n_group, v2.topk_group, v2.routed_scaling_factor) == (8, 3, 16.0)


def test_transformers5_rope_parameters_layout():
  raw = _raw("deepseek_v3_671b")
  rs = raw.pop("rope_scaling")
  theta = raw.pop("rope_theta")
  raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": theta,
                            **{k: v for k, v in rs.items() if k != "type"}}
  assert ModelConfig.from_hf_dict(raw) == load_config(os.path.join(CONFIGS,
                                                                   "deepseek_v3_671b.json"))


def test_yarn_frequencies_671b():
  cfg = load_config(os.path.join(CONFIGS, "deepseek_v3_671b.json"))
  base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
  f = rope_inv_freq(cfg)
  np.testing.assert_allclose(f[:11], base[:11], rtol=1e-12)       # high frequencies kept
  np.testing.assert_allclose(f[23:], base[23:] / 40, rtol=1e-12)  # low frequencies interpolated
  assert np.all((f[11:23] < base[11:23]) & (f[11:23] > base[11:23] / 40))
  no_yarn = cfg.replace(rope_scaling=None)
  np.testing.assert_allclose(rope_inv_freq(no_yarn), base, rtol=1e-12)


@pytest.mark.parametrize("change, words", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                              "weight_block_size": [64, 64]}}, "weight_block_size"),
    ({"model_type": "llama"}, "model_type"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
])
def test_unsupported_values_are_named(change, words):
  raw = _raw("deepseek_v3_671b")
  raw.update(change)
  with pytest.raises(ConfigError, match=words):
    ModelConfig.from_hf_dict(raw)


def test_missing_fields_and_bad_files(tmp_path):
  raw = _raw("tiny_v3")
  del raw["kv_lora_rank"]
  with pytest.raises(ConfigError, match="kv_lora_rank"):
    ModelConfig.from_hf_dict(raw)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="not valid JSON"):
    load_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="no config file"):
    load_config(tmp_path / "nowhere")

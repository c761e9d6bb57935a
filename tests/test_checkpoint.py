"""HF checkpoint mapping and loading: the 671B name/shape table, FP8 block scales, bad input."""

import json
import math
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import hf_reference
from conftest import REPO, fixture_path
from dsv3_jax import CheckpointError, ConfigError, from_hf_pretrained, load_config
from dsv3_jax.checkpoint import expected_tensors
from dsv3_jax.info import abstract_model, model_facts
from dsv3_jax.layers import quantize_blocks
from dsv3_jax.__main__ import main as cli_main


def released_v3_tensors(c):
  """The released DeepSeek-V3 checkpoint's tensor names and shapes, written from the config."""
  d, v, n = c["hidden_size"], c["vocab_size"], c["num_attention_heads"]
  nope, rope, vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
  t = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}

  def fp8(name, shape):
    t[name + ".weight"] = shape
    t[name + ".weight_scale_inv"] = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))

  for i in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
    p = f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = t[p + "post_attention_layernorm.weight"] = (d,)
    fp8(p + "self_attn.q_a_proj", (c["q_lora_rank"], d))
    t[p + "self_attn.q_a_layernorm.weight"] = (c["q_lora_rank"],)
    fp8(p + "self_attn.q_b_proj", (n * (nope + rope), c["q_lora_rank"]))
    fp8(p + "self_attn.kv_a_proj_with_mqa", (c["kv_lora_rank"] + rope, d))
    t[p + "self_attn.kv_a_layernorm.weight"] = (c["kv_lora_rank"],)
    fp8(p + "self_attn.kv_b_proj", (n * (nope + vd), c["kv_lora_rank"]))
    fp8(p + "self_attn.o_proj", (d, n * vd))
    if i < c["first_k_dense_replace"]:
      f = c["intermediate_size"]
      fp8(p + "mlp.gate_proj", (f, d)), fp8(p + "mlp.up_proj", (f, d)), fp8(p + "mlp.down_proj", (d, f))
    else:
      f, e = c["moe_intermediate_size"], c["n_routed_experts"]
      t[p + "mlp.gate.weight"] = (e, d)
      t[p + "mlp.gate.e_score_correction_bias"] = (e,)
      for j in range(e):
        q = f"{p}mlp.experts.{j}."
        fp8(q + "gate_proj", (f, d)), fp8(q + "up_proj", (f, d)), fp8(q + "down_proj", (d, f))
      fs = f * c["n_shared_experts"]
      q = p + "mlp.shared_experts."
      fp8(q + "gate_proj", (fs, d)), fp8(q + "up_proj", (fs, d)), fp8(q + "down_proj", (d, fs))
    if i >= c["num_hidden_layers"]:
      t[p + "enorm.weight"] = t[p + "hnorm.weight"] = t[p + "shared_head.norm.weight"] = (d,)
      t[p + "eh_proj.weight"] = (d, 2 * d)
      t[p + "embed_tokens.weight"] = t[p + "shared_head.head.weight"] = (v, d)
  return t


def test_671b_parameters_map_to_released_names_and_shapes():
  path = os.path.join(REPO, "configs", "deepseek_v3_671b.json")
  with open(path) as f:
    raw = json.load(f)
  cfg = load_config(path)
  want = released_v3_tensors(raw)
  assert len(want) == 91_991  # the released checkpoint's tensor count
  for fp8 in (False, True):  # dequantized (bf16) and FP8 parameter layouts map alike
    from flax import nnx
    _, state = nnx.split(abstract_model(cfg, fp8=fp8))
    abstract = {k: v.get_value() for k, v in nnx.to_flat_state(state)}
    got = expected_tensors(cfg, abstract, fp8=True)
    assert got == want
  assert model_facts(cfg)["total_params"] == 671_026_419_200


def test_info_cli_prints_671b_total(capsys):
  assert cli_main(["info", os.path.join(REPO, "configs", "deepseek_v3_671b.json"), "--json"]) == 0
  facts = json.loads(capsys.readouterr().out)
  assert facts["total_params"] == 671_026_419_200
  assert facts["cache_bytes_per_token"] == 61 * 576 * 2
  assert 37e9 < facts["active_params_per_token"] < 38e9


# ---- FP8 block-quantized checkpoint with dimensions that are not multiples of 128 ------------
RAGGED = dict(hf_reference.TINY_CONFIGS["tiny_v3"], hidden_size=200, q_lora_rank=136,
              kv_lora_rank=72, intermediate_size=300, moe_intermediate_size=136,
              num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_group=2, topk_group=1,
              num_experts_per_tok=2, num_hidden_layers=2, vocab_size=160)
RAGGED["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                 "quant_method": "fp8", "weight_block_size": [128, 128]}


def _is_fp8_weight(name):
  return name.endswith(("_proj.weight", "_proj_with_mqa.weight")) and ".eh_proj." not in name


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
  out = tmp_path_factory.mktemp("fp8")
  sd = hf_reference.random_state_dict(RAGGED, seed=11)
  tensors = {}
  for name, w in sd.items():
    if _is_fp8_weight(name):
      q, s = quantize_blocks(jnp.asarray(w))
      tensors[name] = np.asarray(q)
      tensors[name[:-len("weight")] + "weight_scale_inv"] = np.asarray(s)
    else:
      tensors[name] = w.astype(ml_dtypes.bfloat16)
  names = sorted(tensors)
  half = len(names) // 2
  index = {}
  for k, part in enumerate([names[:half], names[half:]]):
    fname = f"model-{k + 1:05d}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, str(out / fname))
    index.update({n: fname for n in part})
  (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
  (out / "config.json").write_text(json.dumps(RAGGED))
  return out, tensors


def _dequant_by_blocks(q, s):
  """Independent reference: every element times its own block's scale, block by block."""
  w = q.astype(np.float32)
  out = np.empty_like(w)
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
      out[blk] = w[blk] * s[i, j]
  return out


def test_fp8_checkpoint_dequantizes_exactly(fp8_ckpt):
  path, tensors = fp8_ckpt
  model = from_hf_pretrained(str(path), jnp.float32)
  got = np.asarray(model.moe_layers.self_attn.kv_a_proj_with_mqa.weight[...])[0]  # layer 1
  q = tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
  s = tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
  assert q.shape == (80, 200) and s.shape == (1, 2)
  np.testing.assert_array_equal(got, _dequant_by_blocks(q, s))
  e3 = np.asarray(model.moe_layers.mlp.experts.down_proj[...])[0, 3]
  np.testing.assert_array_equal(e3, _dequant_by_blocks(
      tensors["model.layers.1.mlp.experts.3.down_proj.weight"],
      tensors["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"]))
  gate = np.asarray(model.moe_layers.mlp.gate.weight[...])[0]
  np.testing.assert_array_equal(gate, tensors["model.layers.1.mlp.gate.weight"].astype(np.float32))


def test_fp8_checkpoint_kept_as_fp8(fp8_ckpt):
  path, tensors = fp8_ckpt
  kept = from_hf_pretrained(str(path), jnp.float32, fp8=True)
  w = kept.dense_layers.self_attn.q_b_proj
  assert w.weight[...].dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(w.weight[...])[0].view(np.uint8),
                                tensors["model.layers.0.self_attn.q_b_proj.weight"].view(np.uint8))
  np.testing.assert_array_equal(np.asarray(w.weight_scale_inv[...])[0],
                                tensors["model.layers.0.self_attn.q_b_proj.weight_scale_inv"])
  dense = from_hf_pretrained(str(path), jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 160, (2, 9)), jnp.int32)
  np.testing.assert_allclose(np.asarray(kept(tokens)), np.asarray(dense(tokens)), rtol=1e-5,
                             atol=1e-5)


# ---- bad input: one clear error, nothing loaded ------------------------------------------------
def _copy_fixture(tmp_path, name="tiny_v3_noqlora"):
  dst = tmp_path / name
  shutil.copytree(fixture_path(name), dst)
  return dst


def _rewrite(dst, edit):
  from dsv3_jax.safetensors_io import CheckpointReader
  reader = CheckpointReader(str(dst))
  tensors = {n: np.array(reader.get(n)) for n in reader.info}
  reader.close()
  edit(tensors)
  save_file(tensors, str(dst / "model.safetensors"))


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
  dst = _copy_fixture(tmp_path)

  def edit(t):
    del t["model.layers.1.mlp.experts.3.up_proj.weight"]
    t["model.layers.1.mlp.experts.99.up_proj.weight"] = np.zeros((2, 2), np.float32)
    t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :-1]

  _rewrite(dst, edit)
  with pytest.raises(CheckpointError) as err:
    from_hf_pretrained(str(dst), jnp.float32)
  msg = str(err.value)
  assert "1 missing tensor(s): model.layers.1.mlp.experts.3.up_proj.weight" in msg
  assert "1 unexpected tensor(s): model.layers.1.mlp.experts.99.up_proj.weight" in msg
  assert "model.layers.0.self_attn.o_proj.weight has shape [64, 63], expected [64, 64]" in msg


def test_wrong_dtype_is_named(tmp_path):
  dst = _copy_fixture(tmp_path)
  _rewrite(dst, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
  with pytest.raises(CheckpointError, match="model.norm.weight is int32"):
    from_hf_pretrained(str(dst), jnp.float32)


def test_config_that_disagrees_with_weights(tmp_path):
  dst = _copy_fixture(tmp_path)
  cfg = json.loads((dst / "config.json").read_text())
  cfg["n_routed_experts"] = 16
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="missing tensor.*experts.8"):
    from_hf_pretrained(str(dst), jnp.float32)


def test_mtp_copy_that_differs_is_refused(tmp_path):
  dst = _copy_fixture(tmp_path)
  _rewrite(dst, lambda t: t["model.layers.2.embed_tokens.weight"].__setitem__((0, 0), 5.0))
  with pytest.raises(CheckpointError, match="model.layers.2.embed_tokens.weight differs"):
    from_hf_pretrained(str(dst), jnp.float32)


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:4], "truncated"),
    (lambda b: b[:len(b) // 2], "past the end of the file"),
    (lambda b: (1 << 40).to_bytes(8, "little") + b[8:], "header length"),
    (lambda b: b[:8] + b"{" * 8 + b[16:], "bad JSON"),
])
def test_corrupt_safetensors(tmp_path, damage, words):
  dst = _copy_fixture(tmp_path)
  f = dst / "model.safetensors"
  f.write_bytes(damage(f.read_bytes()))
  with pytest.raises(CheckpointError, match=words):
    from_hf_pretrained(str(dst), jnp.float32)


def test_pickled_checkpoints_are_refused(tmp_path):
  dst = _copy_fixture(tmp_path)
  (dst / "model.safetensors").unlink()
  (dst / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(CheckpointError, match="never loaded.*safetensors"):
    from_hf_pretrained(str(dst), jnp.float32)


def test_index_listing_a_missing_shard(tmp_path):
  dst = tmp_path / "t"
  shutil.copytree(fixture_path("tiny_v3"), dst)
  (dst / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors"):
    from_hf_pretrained(str(dst), jnp.float32)


def test_unsupported_config_value(tmp_path):
  dst = _copy_fixture(tmp_path)
  cfg = json.loads((dst / "config.json").read_text())
  cfg["hidden_act"] = "gelu"
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="hidden_act='gelu'"):
    from_hf_pretrained(str(dst), jnp.float32)


def test_bf16_checkpoint_loads(tmp_path):
  dst = _copy_fixture(tmp_path)
  _rewrite(dst, lambda t: t.update({n: v.astype(ml_dtypes.bfloat16) for n, v in t.items()
                                   if not n.endswith("correction_bias")}))
  model = from_hf_pretrained(str(dst), jnp.bfloat16)
  assert model.lm_head.weight[...].dtype == jnp.bfloat16
  tokens = jnp.asarray([[1, 2, 3, 4]])
  ref = np.load(fixture_path("tiny_v3_noqlora") + "/expected.npz")
  out = model(jnp.asarray(ref["input_ids"]))
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  rel = np.linalg.norm(np.asarray(out) - ref["logits"]) / np.linalg.norm(ref["logits"])
  assert rel < 5e-2  # bf16 weights and activations: close to the fp32 reference, not equal

"""HF ⇄ Orbax conversion (dsv3_jax.convert / export / orbax_checkpoint).

Tiny checkpoints: the committed fp32 fixtures, and an FP8 one built here (e4m3 + 128×128 block
scales from layers.quantize_blocks, bf16 elsewhere, dims that are not multiples of 128, three
shards). Converted models must restore to exactly the parameters (hence logits) of the direct
HF loader; HF → Orbax → HF must be bit-exact; bad inputs must fail before anything is written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import hf_reference as ref
from dsv3_jax import CheckpointError, from_hf_pretrained, from_pretrained
from dsv3_jax import convert as convert_mod
from dsv3_jax.checkpoint import hf_tensor_table, scale_name
from dsv3_jax.config import ModelConfig
from dsv3_jax.convert import convert_hf_to_orbax, main
from dsv3_jax.export import export_orbax_to_hf
from dsv3_jax.layers import quantize_blocks
from dsv3_jax.safetensors_io import CheckpointReader
from dsv3_jax.sharding import TRAIN_RULES, make_mesh

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "tiny_v3")
NOQLORA = os.path.join(FIXTURES, "tiny_v3_noqlora")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FP8_CONFIG = {
    **copy.deepcopy(ref.TINY_CONFIGS["tiny_v3"]),
    # widths that are not multiples of 128: partial FP8 blocks along both axes
    "hidden_size": 160, "intermediate_size": 288, "moe_intermediate_size": 136,
    "q_lora_rank": 144, "kv_lora_rank": 40, "vocab_size": 300, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
TOKENIZER = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
             "tokenizer_config.json": '{"bos_token": "<s>"}\n'}


def fp8_state_dict(cfg: dict, seed: int) -> dict[str, np.ndarray]:
  """DeepSeek's released layout: projections e4m3 + float32 weight_scale_inv, the rest bf16,
  e_score_correction_bias float32."""
  sd = ref.random_state_dict(cfg, seed)
  table = hf_tensor_table(ModelConfig.from_hf_dict(cfg))
  out = {}
  for name, w in sd.items():
    e = table.get(name)
    if e is not None and e.scale_path is not None:
      q, s = quantize_blocks(jnp.asarray(w))
      out[name], out[scale_name(name)] = np.asarray(q), np.asarray(s)
    elif name.endswith("e_score_correction_bias"):
      out[name] = w
    else:
      out[name] = w.astype(ml_dtypes.bfloat16)
  return out


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("fp8") / "tiny_fp8")
  ref.write_checkpoint(FP8_CONFIG, fp8_state_dict(FP8_CONFIG, seed=7), d, num_shards=3)
  for name, text in TOKENIZER.items():
    with open(os.path.join(d, name), "w") as f:
      f.write(text)
  return d


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fp8_dir):
  """Converted once, shared: {"tiny": fp32 fixture, "fp8": kept FP8, "bf16": dequantized}."""
  root = tmp_path_factory.mktemp("converted")
  out = {"tiny": str(root / "tiny"), "fp8": str(root / "fp8"), "bf16": str(root / "bf16")}
  convert_hf_to_orbax(TINY, out["tiny"], progress=False)
  convert_hf_to_orbax(fp8_dir, out["fp8"], progress=False)
  convert_hf_to_orbax(fp8_dir, out["bf16"], dtype="bf16", progress=False)
  return out


def flat_params(model) -> dict:
  return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.split(model)[1])}


def assert_same_params(a, b):
  pa, pb = flat_params(a), flat_params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
    assert pa[k].tobytes() == pb[k].tobytes(), f"parameter {k} differs"


def tokens(vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (2, 10)), jnp.int32)


# ---- HF → Orbax → restore -----------------------------------------------------------------------
def test_fp32_checkpoint_restores_like_the_hf_loader(converted):
  model = from_pretrained(converted["tiny"])
  direct = from_hf_pretrained(TINY, jnp.float32)
  assert_same_params(model, direct)
  expected = np.load(os.path.join(TINY, "expected.npz"))
  logits = np.asarray(model(jnp.asarray(expected["input_ids"])))
  np.testing.assert_array_equal(logits, np.asarray(direct(jnp.asarray(expected["input_ids"]))))
  # and both agree with HF transformers' fp32 logits at the parity tests' tolerance
  np.testing.assert_allclose(logits, expected["logits"], rtol=1e-4, atol=1e-4)


def test_restore_with_a_cast(converted):
  model = from_pretrained(converted["tiny"], dtype=jnp.bfloat16)
  assert model.embed_tokens.weight.get_value().dtype == jnp.bfloat16
  assert model.moe_layers.mlp.gate.e_score_correction_bias.get_value().dtype == jnp.float32
  assert_same_params(model, from_hf_pretrained(TINY, jnp.bfloat16))


def test_fp8_kept_as_e4m3_with_scales(converted, fp8_dir):
  model = from_pretrained(converted["fp8"])
  ex = model.moe_layers.mlp.experts
  assert ex.gate_proj.get_value().dtype == jnp.float8_e4m3fn
  assert ex.gate_proj_scale_inv.get_value().shape == (2, 8, 2, 2)  # [L, E, ⌈136/128⌉, ⌈160/128⌉]
  assert model.embed_tokens.weight.get_value().dtype == jnp.bfloat16
  direct = from_hf_pretrained(fp8_dir, jnp.bfloat16, fp8=True)
  assert_same_params(model, direct)
  x = tokens(FP8_CONFIG["vocab_size"])
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(direct(x)))
  with open(os.path.join(converted["fp8"], "config.json"), "rb") as a, \
       open(os.path.join(fp8_dir, "config.json"), "rb") as b:
    assert a.read() == b.read()


def test_fp8_dequantized_to_bf16(converted, fp8_dir):
  model = from_pretrained(converted["bf16"])
  assert model.moe_layers.mlp.experts.gate_proj_scale_inv is None
  direct = from_hf_pretrained(fp8_dir, jnp.bfloat16)
  assert_same_params(model, direct)
  x = tokens(FP8_CONFIG["vocab_size"], seed=1)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(direct(x)))
  with open(os.path.join(converted["bf16"], "config.json")) as f:
    cfg = json.load(f)
  assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("scale", [1e-3, 1e-37])  # the second gives f32 subnormals
def test_dequantize_is_bitwise_the_numpy_reference(scale):
  from dsv3_jax.checkpoint import _dequantize_np
  from dsv3_jax.convert import dequantize

  rng = np.random.default_rng(0)
  w = (rng.standard_normal((300, 260)) * 100).astype(ml_dtypes.float8_e4m3fn)
  s = (rng.random((3, 3)) * scale).astype(np.float32)
  want = _dequantize_np(w, s).astype(ml_dtypes.bfloat16)
  got = dequantize(w, s, jnp.bfloat16)
  assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
  assert scale > 1e-30 or np.any((want != 0) & (np.abs(want.astype(np.float32)) < 1.2e-38))


def test_side_files_and_layout(converted):
  out = converted["fp8"]
  for name, text in TOKENIZER.items():
    with open(os.path.join(out, name)) as f:
      assert f.read() == text
  assert not os.path.exists(out + ".partial")
  assert not {"_convert_state.json", "_convert_done.txt"} & set(os.listdir(out))
  with open(os.path.join(out, "dsv3_convert.json")) as f:
    prov = json.load(f)
  assert prov["dtype"] == "fp8" and prov["fp8"] and prov["param_dtype"] == "bfloat16"


def test_orbax_reads_our_metadata_like_its_own(converted, tmp_path):
  """Orbax's metadata API parses our files, and Orbax's own save of the same tree writes the
  same tree metadata (up to write shapes)."""
  import orbax.checkpoint as ocp

  params_dir = os.path.join(converted["fp8"], "params")
  model = from_pretrained(converted["fp8"])
  pure = nnx.to_pure_dict(nnx.split(model)[1])
  with ocp.StandardCheckpointer() as ck:
    meta = ck.metadata(params_dir).item_metadata
    got = {jax.tree_util.keystr(k): (tuple(v.shape), np.dtype(v.dtype))
           for k, v in jax.tree_util.tree_flatten_with_path(meta)[0]}
    want = {jax.tree_util.keystr(k): (v.shape, v.dtype)
            for k, v in jax.tree_util.tree_flatten_with_path(pure)[0]}
    assert {k.replace("'", "") for k in got} == {k.replace("'", "") for k in want}
    assert sorted(got.values(), key=str) == sorted(want.values(), key=str)
    ck.save(str(tmp_path / "orbax_own"), pure)
  with open(os.path.join(params_dir, "_METADATA")) as f:
    ours = json.load(f)
  with open(tmp_path / "orbax_own" / "_METADATA") as f:
    theirs = json.load(f)

  def strip(m):
    return {k: ({**v, "value_metadata": {**v["value_metadata"], "write_shape": None}})
            for k, v in m["tree_metadata"].items()}

  assert strip(ours) == strip(theirs)
  # OUT_DIR itself is an Orbax composite checkpoint whose item "params" is the model
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        pure)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
    restored = ck.restore(converted["fp8"],
                          ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  assert jax.tree.all(jax.tree.map(lambda a, b: a.tobytes() == np.asarray(b).tobytes(),
                                   jax.tree.map(np.asarray, pure), restored["params"]))
  assert {k: v for k, v in ours.items() if k != "tree_metadata"} == \
         {k: v for k, v in theirs.items() if k != "tree_metadata"}


def test_restore_onto_mesh_shards_experts(converted):
  mesh = make_mesh(data=2, expert=4)
  model = from_pretrained(converted["tiny"], mesh=mesh, rules=TRAIN_RULES)
  w = model.moe_layers.mlp.experts.gate_proj.get_value()         # [L=2, E=8, F, D]
  assert w.sharding.mesh.shape == mesh.shape
  assert tuple(w.sharding.spec)[:2] == (None, "expert")  # (F, D → tensor, fsdp: size 1 here)
  assert {s.data.shape for s in w.addressable_shards} == {(2, 2, 32, 64)}
  assert {s.index[1] for s in w.addressable_shards} == {slice(0, 2), slice(2, 4), slice(4, 6),
                                                         slice(6, 8)}
  mtp = model.mtp[0].block.mlp.experts.down_proj.get_value()     # [E, D, F]
  assert tuple(mtp.sharding.spec)[0] == "expert"
  assert {s.data.shape for s in mtp.addressable_shards} == {(2, 64, 32)}
  single = from_pretrained(converted["tiny"])
  assert_same_params(model, single)
  x = tokens(256)
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(single(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_small_chunks_write_in_row_bands(converted, fp8_dir, tmp_path, monkeypatch, dtype):
  """With 4 KiB chunks, big tensors (embedding [300, 160], dense MLP [288, 160], ...) are written
  (and dequantized) in 128-row bands; the result is the same."""
  from dsv3_jax import orbax_checkpoint

  monkeypatch.setattr(orbax_checkpoint, "CHUNK_BYTES", 4096)
  out = str(tmp_path / "banded")
  convert_hf_to_orbax(fp8_dir, out, dtype=dtype, progress=False)
  with open(os.path.join(out, "params", "array_metadatas", "process_0")) as f:
    chunks = {m["array_metadata"]["param_name"]: m["array_metadata"]["chunk_shape"]
              for m in json.load(f)["array_metadatas"]}
  assert chunks["embed_tokens.weight"] == [128, 160]
  assert chunks["dense_layers.mlp.gate_proj.weight"] == [1, 128, 160]
  assert_same_params(from_pretrained(out), from_pretrained(converted["bf16" if dtype else "fp8"]))
  if dtype is None:
    export_orbax_to_hf(out, str(tmp_path / "hf"), progress=False)
    assert_bit_exact(fp8_dir, str(tmp_path / "hf"))


# ---- Orbax → HF ----------------------------------------------------------------------------------
def assert_bit_exact(src: str, dst: str):
  a, b = CheckpointReader(src), CheckpointReader(dst)
  assert sorted(a.info) == sorted(b.info)
  for n in a.info:
    assert a.info[n] == b.info[n], n
    assert a.get(n).tobytes() == b.get(n).tobytes(), f"{n} differs"


@pytest.mark.parametrize("which", ["tiny", "fp8"])
def test_round_trip_is_bit_exact(converted, fp8_dir, tmp_path, which):
  src = {"tiny": TINY, "fp8": fp8_dir}[which]
  out = str(tmp_path / "hf")
  r = export_orbax_to_hf(converted[which], out, max_shard_bytes=300_000, progress=False)
  assert r.files > 1
  assert_bit_exact(src, out)
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert files == sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
  from safetensors import safe_open  # the reference parser accepts our streamed files
  for fname in files:
    with safe_open(os.path.join(out, fname), "numpy") as f:
      assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == fname)
      assert f.metadata() == {"format": "pt"}
  with open(os.path.join(src, "config.json"), "rb") as a, \
       open(os.path.join(out, "config.json"), "rb") as b:
    assert a.read() == b.read()
  if which == "fp8":
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_round_trip_single_file(tmp_path):
  orbax, out = str(tmp_path / "orbax"), str(tmp_path / "hf")
  convert_hf_to_orbax(NOQLORA, orbax, progress=False)
  assert export_orbax_to_hf(orbax, out, progress=False).files == 1
  assert os.path.exists(os.path.join(out, "model.safetensors"))
  assert_bit_exact(NOQLORA, out)


def test_export_refuses_params_that_disagree_with_config(converted, tmp_path):
  orbax = str(tmp_path / "orbax")
  shutil.copytree(converted["tiny"], orbax)
  with open(os.path.join(orbax, "config.json")) as f:
    cfg = json.load(f)
  cfg["num_hidden_layers"], cfg["kv_lora_rank"] = 4, 24
  with open(os.path.join(orbax, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(CheckpointError, match=r"misshapen parameter.*kv_a_proj_with_mqa"):
    export_orbax_to_hf(orbax, str(tmp_path / "hf"), progress=False)
  assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "hf.partial")


def test_from_pretrained_on_an_hf_directory_says_what_to_do():
  with pytest.raises(CheckpointError, match="python -m dsv3_jax.convert"):
    from_pretrained(TINY)


# ---- validation: every bad input fails before anything is written ------------------------------
def _write(tmp_path, mutate_sd=None, mutate_cfg=None, shards=2, cfg=None):
  cfg = copy.deepcopy(cfg or ref.TINY_CONFIGS["tiny_v3"])
  sd = ref.random_state_dict(cfg, seed=3)
  if mutate_sd:
    mutate_sd(sd)
  if mutate_cfg:
    mutate_cfg(cfg)
  d = str(tmp_path / "hf")
  ref.write_checkpoint(cfg, sd, d, num_shards=shards)
  return d


def _corrupt_bytes(d, fn):
  path = os.path.join(d, "model-00002-of-00002.safetensors")
  with open(path, "rb") as f:
    raw = bytearray(f.read())
  with open(path, "wb") as f:
    f.write(fn(raw))


def _pickled_only(d):
  for n in os.listdir(d):
    if n.endswith(".safetensors") or n.endswith(".index.json"):
      os.remove(os.path.join(d, n))
  with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
    f.write(b"\x80\x02not really a pickle")


L0 = "model.layers.0."
MTP = "model.layers.3."
BAD_INPUTS = {
    "missing": (dict(mutate_sd=lambda sd: sd.pop(L0 + "mlp.up_proj.weight")),
                r"1 missing tensor\(s\): model.layers.0.mlp.up_proj.weight"),
    "unexpected": (dict(mutate_sd=lambda sd: sd.update({"model.layers.0.mlp.bias": np.ones(4,
                                                        np.float32)})),
                   r"1 unexpected tensor\(s\): model.layers.0.mlp.bias"),
    "misshapen": (dict(mutate_sd=lambda sd: sd.update({L0 + "self_attn.o_proj.weight":
                                                       np.ones((64, 60), np.float32)})),
                  r"o_proj.weight has shape \[64, 60\], expected \[64, 64\]"),
    "wrong_dtype": (dict(mutate_sd=lambda sd: sd.update({"model.norm.weight": np.ones(64,
                                                         np.int32)})),
                    r"wrong dtype.*model.norm.weight is int32"),
    "config_disagrees": (dict(mutate_cfg=lambda c: c.update(num_hidden_layers=2)),
                         r"(?s)missing tensor.*unexpected tensor\(s\): model.layers.3\."),
    "config_width": (dict(mutate_cfg=lambda c: c.update(intermediate_size=96)),
                     r"misshapen.*model.layers.0.mlp.down_proj.weight has shape \[64, 128\], "
                     r"expected \[64, 96\]"),
    "config_says_fp8": (dict(mutate_cfg=lambda c: c.update(quantization_config=FP8_CONFIG[
        "quantization_config"])), r"config.json and the weights disagree"),
    "mtp_copy_differs": (dict(mutate_sd=lambda sd: sd[MTP + "embed_tokens.weight"].__setitem__(
        (5, 5), 9.0)), r"model.layers.3.embed_tokens.weight differs from model.embed_tokens"),
    "truncated": (dict(after=lambda d: _corrupt_bytes(d, lambda b: b[:-100])),
                  r"model-00002-of-00002.safetensors: tensor .* past the end of the file"),
    "header_length": (dict(after=lambda d: _corrupt_bytes(
        d, lambda b: struct.pack("<Q", 10**9) + b[8:])), r"header length 1000000000 is past "
                      r"the end of the file"),
    "bad_json": (dict(after=lambda d: _corrupt_bytes(d, lambda b: b[:8] + b"[" + b[9:])),
                 r"corrupt safetensors header \(bad JSON"),
    "missing_shard": (dict(after=lambda d: os.remove(os.path.join(
        d, "model-00001-of-00002.safetensors"))), r"lists shard model-00001-of-00002"
                      r".safetensors, which is missing"),
    "pickled": (dict(after=_pickled_only), r"pickled PyTorch files are never loaded.*"
                r"safe_serialization=True"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_writing(tmp_path, case):
  kw, message = BAD_INPUTS[case]
  kw = dict(kw)
  after = kw.pop("after", None)
  d = _write(tmp_path, **kw)
  if after:
    after(d)
  out = str(tmp_path / "out")
  with pytest.raises(CheckpointError, match=message):
    convert_hf_to_orbax(d, out, progress=False)
  assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_fp8_scale_of_the_wrong_dtype(tmp_path):
  sd = fp8_state_dict(FP8_CONFIG, seed=1)
  name = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
  sd[name] = sd[name].astype(ml_dtypes.bfloat16)
  d = str(tmp_path / "hf")
  ref.write_checkpoint(FP8_CONFIG, sd, d, num_shards=2)
  with pytest.raises(CheckpointError, match=f"{name} is bfloat16"):
    convert_hf_to_orbax(d, str(tmp_path / "out"), progress=False)
  with pytest.raises(CheckpointError, match="not an FP8 checkpoint.*omit --dtype"):
    convert_hf_to_orbax(TINY, str(tmp_path / "out"), dtype="fp8", progress=False)
  assert not os.path.exists(tmp_path / "out")


def test_mixed_float_dtypes_are_cast_with_a_warning(tmp_path):
  def bf16_embedding(sd):
    for n in ("model.embed_tokens.weight", "model.layers.3.embed_tokens.weight"):
      sd[n] = sd[n].astype(ml_dtypes.bfloat16)

  d = _write(tmp_path, mutate_sd=bf16_embedding)
  with pytest.warns(UserWarning, match=r"cast to bfloat16 .*losing precision: model.layers.0"):
    convert_hf_to_orbax(d, str(tmp_path / "out"), progress=False)
  model = from_pretrained(str(tmp_path / "out"))
  assert model.lm_head.weight.get_value().dtype == jnp.bfloat16
  assert model.moe_layers.mlp.gate.e_score_correction_bias.get_value().dtype == jnp.float32


def test_existing_output_needs_overwrite(converted, tmp_path):
  out = str(tmp_path / "out")
  os.makedirs(out)
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert_hf_to_orbax(TINY, out, progress=False)
  convert_hf_to_orbax(TINY, out, overwrite=True, progress=False)
  assert_same_params(from_pretrained(out), from_pretrained(converted["tiny"]))


# ---- interruption -------------------------------------------------------------------------------
_KILL_AFTER = textwrap.dedent("""
    import os, signal, sys
    from dsv3_jax import convert, orbax_checkpoint
    convert.MAX_INFLIGHT = 0               # commit (and journal) every tensor before the next
    n = 0
    write = orbax_checkpoint.ParamWriter.write
    def dying_write(self, *a):
      global n
      n += 1
      if n == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind
      return write(self, *a)
    orbax_checkpoint.ParamWriter.write = dying_write
    convert.convert_hf_to_orbax(sys.argv[1], sys.argv[2], progress=False)
""")


def _killed_run(src, out, after_writes):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, "-c", _KILL_AFTER, src, out, str(after_writes)],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == -9, proc.stderr
  with open(os.path.join(out + ".partial", "_convert_done.txt")) as f:
    return f.read().splitlines()


def test_killed_conversion_continues_on_rerun(converted, fp8_dir, tmp_path, capsys):
  out = str(tmp_path / "out")
  done = _killed_run(fp8_dir, out, after_writes=120)
  assert 10 < len(done) < 120
  assert not os.path.exists(out)                    # nothing that looks complete
  r = convert_hf_to_orbax(fp8_dir, out, progress=False)
  assert r.resumed == len(done)
  assert "continuing the interrupted conversion" in capsys.readouterr().err
  assert not os.path.exists(out + ".partial")
  assert_same_params(from_pretrained(out), from_pretrained(converted["fp8"]))


def test_rerun_with_other_options_starts_afresh(converted, fp8_dir, tmp_path, capsys):
  out = str(tmp_path / "out")
  _killed_run(fp8_dir, out, after_writes=60)
  r = convert_hf_to_orbax(fp8_dir, out, dtype="bf16", progress=False)
  assert r.resumed == 0
  assert "starting afresh" in capsys.readouterr().err
  assert_same_params(from_pretrained(out), from_pretrained(converted["bf16"]))


def test_torn_journal_line_is_not_trusted(converted, tmp_path, monkeypatch):
  out = str(tmp_path / "out")
  calls = []

  def stop(*a):
    calls.append(1)
    if len(calls) == 30:
      raise KeyboardInterrupt
    return real(*a)

  real = convert_mod.ParamWriter.write
  monkeypatch.setattr(convert_mod, "MAX_INFLIGHT", 0)
  monkeypatch.setattr(convert_mod.ParamWriter, "write", stop)
  with pytest.raises(KeyboardInterrupt):
    convert_hf_to_orbax(TINY, out, progress=False)
  monkeypatch.undo()
  journal = os.path.join(out + ".partial", "_convert_done.txt")
  with open(journal) as f:
    done = f.read().splitlines()
  with open(journal, "a") as f:
    f.write("model.layers.2.mlp.experts.5.up")  # a write cut short mid-line
  r = convert_hf_to_orbax(TINY, out, progress=False)
  assert r.resumed == len(done) > 0
  assert_same_params(from_pretrained(out), from_pretrained(converted["tiny"]))


# ---- command line -------------------------------------------------------------------------------
def test_cli(tmp_path, capsys):
  out, back = str(tmp_path / "out"), str(tmp_path / "back")
  assert main([NOQLORA, out, "--no-progress", "--no-compression"]) == 0
  assert main(["--export", out, back, "--no-progress"]) == 0
  assert_bit_exact(NOQLORA, back)
  assert main([str(tmp_path / "nowhere"), str(tmp_path / "x"), "--no-progress"]) == 2
  assert "error:" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main(["--export", out, str(tmp_path / "y"), "--dtype", "bf16"])
  with pytest.raises(SystemExit):
    main(["--help"])
  assert "--export ORBAX_DIR HF_OUT_DIR" in capsys.readouterr().out

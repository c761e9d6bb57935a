"""Generation: greedy == repeated full forwards, batches, mixed lengths, EOS, MTP, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from dsv3_jax import core, from_hf_pretrained
from dsv3_jax.generate import Engine
from dsv3_jax.sampling import SamplingParams, sample

PROMPTS = [[5, 17, 99, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 200, 1], [42]]


@pytest.fixture(scope="module")
def model():
  return from_hf_pretrained(fixture_path("tiny_v3"), jnp.float32)


def greedy_by_full_forwards(model, prompt, n):
  graphdef, params = core.split(model)
  seq = list(prompt)
  for _ in range(n):
    logits, _ = core.forward(graphdef, params, jnp.asarray([seq]))
    seq.append(int(jnp.argmax(logits[0, -1])))
  return seq[len(prompt):]


def test_greedy_equals_repeated_full_forwards_mixed_lengths(model):
  outs, stats = Engine(model, chunk=4).generate(PROMPTS, max_new_tokens=9)
  for p, o in zip(PROMPTS, outs):
    assert o.output_ids == greedy_by_full_forwards(model, p, 9)
    assert o.finish_reason == "length"
  assert stats.generated_tokens == 27 and stats.decode_tok_s > 0


def test_batch_equals_rows_one_by_one(model):
  engine = Engine(model, chunk=3)
  batch, _ = engine.generate(PROMPTS, max_new_tokens=7)
  for p, b in zip(PROMPTS, batch):
    alone, _ = engine.generate([p], max_new_tokens=7)
    assert alone[0].output_ids == b.output_ids


def test_rows_finish_independently_at_eos(model):
  engine = Engine(model, chunk=4)
  ref, _ = engine.generate(PROMPTS[:2], max_new_tokens=10)
  eos = ref[0].output_ids[2]
  assert eos not in ref[0].output_ids[:2]
  outs, _ = engine.generate(PROMPTS[:2], max_new_tokens=10, eos_ids=[eos])
  assert outs[0].output_ids == ref[0].output_ids[:3] and outs[0].finish_reason == "eos"
  cut = ref[1].output_ids.index(eos) + 1 if eos in ref[1].output_ids else 10
  assert outs[1].output_ids == ref[1].output_ids[:cut]


def test_stop_callback_and_streaming(model):
  seen = {0: [], 1: []}
  outs, _ = Engine(model, chunk=2).generate(
      PROMPTS[:2], max_new_tokens=8, should_stop=lambda row, ids: row == 1 and len(ids) == 3,
      on_tokens=lambda row, new: seen[row].extend(new))
  assert len(outs[1].output_ids) == 3 and outs[1].finish_reason == "stop"
  assert seen[0] == outs[0].output_ids and seen[1] == outs[1].output_ids


def bigram_mtp_model(model):
  """Weakens attention/MLP outputs and makes the MTP module a copy of the model's bigram part,
  so that its drafts are often (not always) right: exercises accept and reject paths."""
  for stack in (model.dense_layers, model.moe_layers):
    stack.self_attn.o_proj.weight[...] *= 0.3
    mlp = stack.mlp
    if hasattr(mlp, "experts"):
      mlp.experts.down_proj[...] *= 0.3
      mlp.shared_experts.down_proj.weight[...] *= 0.3
    else:
      mlp.down_proj.weight[...] *= 0.3
  mtp = model.mtp[0]
  d = model.cfg.hidden_size
  mtp.eh_proj.weight[...] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], axis=1)
  mtp.block.self_attn.o_proj.weight[...] *= 0
  mtp.block.mlp.experts.down_proj[...] *= 0
  mtp.block.mlp.shared_experts.down_proj.weight[...] *= 0
  for norm in (mtp.enorm, mtp.shared_head_norm):
    norm.weight[...] = model.norm.weight[...]
  return model


def test_mtp_greedy_equals_plain_greedy(model):
  plain, _ = Engine(model, chunk=4).generate(PROMPTS, max_new_tokens=12)
  spec, stats = Engine(model, chunk=3, mtp=True).generate(PROMPTS, max_new_tokens=12)
  assert [o.output_ids for o in spec] == [o.output_ids for o in plain]
  tuned = bigram_mtp_model(from_hf_pretrained(fixture_path("tiny_v3"), jnp.float32))
  plain, _ = Engine(tuned, chunk=4).generate(PROMPTS, max_new_tokens=16)
  spec, stats = Engine(tuned, chunk=3, mtp=True).generate(PROMPTS, max_new_tokens=16)
  assert [o.output_ids for o in spec] == [o.output_ids for o in plain]
  assert 0.2 < stats.acceptance_rate < 1.0, stats.acceptance_rate  # both paths taken
  assert stats.mtp_steps < sum(len(o.output_ids) for o in spec)   # fewer steps than tokens


def test_sampling_is_reproducible_and_respects_top_k(model):
  engine = Engine(model, chunk=4)
  params = SamplingParams(temperature=1.0, top_k=5, top_p=0.9)
  a, _ = engine.generate(PROMPTS, max_new_tokens=6, sampling=params, seed=1)
  b, _ = engine.generate(PROMPTS, max_new_tokens=6, sampling=params, seed=1)
  c, _ = engine.generate(PROMPTS, max_new_tokens=6, sampling=params, seed=2)
  assert [o.output_ids for o in a] == [o.output_ids for o in b]
  assert [o.output_ids for o in a] != [o.output_ids for o in c]
  greedy, _ = engine.generate(PROMPTS, max_new_tokens=6)
  top1, _ = engine.generate(PROMPTS, max_new_tokens=6, seed=3,
                            sampling=SamplingParams(temperature=1.0, top_k=1))
  assert [o.output_ids for o in top1] == [o.output_ids for o in greedy]


def test_mtp_sampling_is_reproducible_and_top1_is_greedy():
  """The speculative step samples both verified positions in one pass (one key, one row of
  noise each): seeds reproduce, and top-1 sampling (through the sampling path, not argmax)
  gives plain greedy output with drafts both accepted and rejected."""
  tuned = bigram_mtp_model(from_hf_pretrained(fixture_path("tiny_v3"), jnp.float32))
  engine = Engine(tuned, chunk=3, mtp=True)
  params = SamplingParams(temperature=1.0, top_k=5, top_p=0.9)
  a, _ = engine.generate(PROMPTS, max_new_tokens=8, sampling=params, seed=1)
  b, _ = engine.generate(PROMPTS, max_new_tokens=8, sampling=params, seed=1)
  c, _ = engine.generate(PROMPTS, max_new_tokens=8, sampling=params, seed=2)
  assert [o.output_ids for o in a] == [o.output_ids for o in b]
  assert [o.output_ids for o in a] != [o.output_ids for o in c]
  greedy, _ = Engine(tuned, chunk=4).generate(PROMPTS, max_new_tokens=12)
  top1, stats = engine.generate(PROMPTS, max_new_tokens=12, seed=3,
                                sampling=SamplingParams(temperature=1.0, top_k=1))
  assert [o.output_ids for o in top1] == [o.output_ids for o in greedy]
  assert 0.2 < stats.acceptance_rate < 1.0, stats.acceptance_rate


def test_sample_rows_are_independent():
  """Rows sampled together from one key (as the MTP step samples both verified positions)
  draw independent tokens: their joint frequencies are the product of the marginals."""
  p = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
  keys = jax.random.split(jax.random.key(4), 40000)
  draws = np.asarray(jax.vmap(lambda k: sample(jnp.log(jnp.asarray(p)), k,
                                               SamplingParams(temperature=1.0)))(keys))
  joint = np.bincount(draws[:, 0] * 3 + draws[:, 1], minlength=9).reshape(3, 3) / len(draws)
  np.testing.assert_allclose(joint, np.outer(p[0], p[1]), atol=0.01)


def test_sample_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]]))
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, SamplingParams(temperature=1.0)))(keys))
  freq = np.bincount(draws.ravel(), minlength=5) / draws.size
  np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.015)
  # top_p = 0.7 keeps {0, 1} (mass 0.75 reached at the second token): renormalised 2/3, 1/3
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, SamplingParams(temperature=1.0,
                                                                         top_p=0.7)))(keys))
  freq = np.bincount(draws.ravel(), minlength=5) / draws.size
  np.testing.assert_allclose(freq, [2 / 3, 1 / 3, 0, 0, 0], atol=0.015)
  # temperature 0.5 squares the probabilities (renormalised)
  p2 = np.array([0.5, 0.25, 0.15, 0.07, 0.03]) ** 2
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, SamplingParams(temperature=0.5)))(keys))
  np.testing.assert_allclose(np.bincount(draws.ravel(), minlength=5) / draws.size,
                             p2 / p2.sum(), atol=0.015)


def test_engines_of_one_model_share_compiled_steps(model):
  """The graph is a static argument hashed once per Engine (StaticGraph); equal graphs of two
  engines still hit the same compiled decode step."""
  from dsv3_jax import generate
  first, _ = Engine(model, chunk=2).generate([[5, 17]], max_new_tokens=5)
  n = generate._decode._cache_size()
  again, _ = Engine(model, chunk=2).generate([[5, 17]], max_new_tokens=5)
  assert generate._decode._cache_size() == n and again[0].output_ids == first[0].output_ids
  graph = generate.StaticGraph(nnx.split(model)[0])
  assert graph == generate.StaticGraph(nnx.split(model)[0]) and hash(graph) == graph._hash


def test_bad_requests(model):
  engine = Engine(model)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    engine.generate([[1, 2], []], max_new_tokens=4)
  with pytest.raises(ValueError, match="needs 36 cache slots, but the cache holds 16"):
    engine.generate([list(range(30))], max_new_tokens=4, max_len=16)
  with pytest.raises(ValueError, match="max_position_embeddings=256"):
    engine.generate([list(range(200))], max_new_tokens=100)
  with pytest.raises(ValueError, match="temperature"):
    SamplingParams(temperature=-1)


def test_prefill_in_row_blocks_changes_nothing(model):
  one, _ = Engine(model, chunk=4, mtp=True).generate(PROMPTS, max_new_tokens=6)
  blocks, _ = Engine(model, chunk=4, mtp=True, prefill_tokens=16).generate(PROMPTS,
                                                                            max_new_tokens=6)
  assert [o.output_ids for o in blocks] == [o.output_ids for o in one]


# ---- layers with their own arrays (Transformer.unstack_layers) --------------------------------
def test_unstacked_layers_generate_like_the_scanned_stack(model):
  tokens = jnp.asarray([[5, 17, 99, 3, 7, 8, 120]])
  scanned, _ = Engine(model, chunk=4).generate(PROMPTS, max_new_tokens=8)
  spec, _ = Engine(model, chunk=3, mtp=True).generate(PROMPTS, max_new_tokens=8)
  unstacked = from_hf_pretrained(fixture_path("tiny_v3"), jnp.float32).unstack_layers()
  assert isinstance(unstacked.moe_layers, nnx.List)
  assert len(unstacked.moe_layers) == model.cfg.num_moe_layers
  assert unstacked.moe_layers[1].mlp.experts.gate_proj.shape == (8, 32, 64)
  np.testing.assert_allclose(np.asarray(unstacked(tokens)), np.asarray(model(tokens)),
                             rtol=1e-5, atol=1e-5)
  got, _ = Engine(unstacked, chunk=4).generate(PROMPTS, max_new_tokens=8)
  assert [o.output_ids for o in got] == [o.output_ids for o in scanned]
  got, _ = Engine(unstacked, chunk=3, mtp=True).generate(PROMPTS, max_new_tokens=8)
  assert [o.output_ids for o in got] == [o.output_ids for o in spec]


def _wide_model(fp8: bool, *, seed: int = 5, dtype=jnp.float32, **widths):
  """tiny_v3 widened to 128-multiples (the GEMV kernels reduce whole 128-wide slabs)."""
  from dsv3_jax import Transformer, load_config
  cfg = load_config(fixture_path("tiny_v3")).replace(hidden_size=128, moe_intermediate_size=128,
                                                      num_hidden_layers=3, **widths)
  return Transformer(cfg, rngs=nnx.Rngs(seed), param_dtype=dtype, dtype=dtype, fp8=fp8,
                     fp8_backend="triton" if fp8 else "xla")


@pytest.mark.parametrize("fp8", [False, True])
def test_gemv_experts_equal_the_gathered_experts(fp8):
  """Decoding through the expert-indexed GEMV kernel (interpret mode here) gives the rows of
  XLA's gather path: one MoE layer's output, and greedy generation with the kernel reading the
  whole stacked weight at the layer's index (scanned) or the layer's own arrays (unstacked)."""
  ref = _wide_model(fp8)
  model = _wide_model(fp8).unstack_layers().use_expert_gemv(True)
  experts = model.moe_layers[0].mlp.experts
  assert experts.gemv
  x = jax.random.normal(jax.random.key(1), (2, 128), jnp.float32)
  routing = model.moe_layers[0].mlp.gate(x)
  assert routing.experts.size <= experts.num_experts           # the few-rows (decode) path
  assert experts.takes_gemv(2, 2) and not experts.takes_gemv(1, 2)  # one token: XLA's gather
  got, want = experts(x, routing), experts._gathered(x, routing)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(want)).max() > 1e-3
  prompts = [[5, 17, 99, 3], [42]]
  plain, _ = Engine(ref, chunk=4, expert_gemv=False).generate(prompts, max_new_tokens=6)
  got, _ = Engine(model, chunk=4).generate(prompts, max_new_tokens=6)
  assert [o.output_ids for o in got] == [o.output_ids for o in plain]
  scanned = _wide_model(fp8)
  got, _ = Engine(scanned, chunk=4, expert_gemv=True).generate(prompts, max_new_tokens=6)
  assert scanned.moe_layers.mlp.experts.gemv
  assert [o.output_ids for o in got] == [o.output_ids for o in plain]


def test_gemv_reads_the_stack_at_the_layer_index():
  """LayerOfStack hands the kernel [L·E, ...] and ids + l·E: each layer's rows equal those of
  its own slice."""
  from dsv3_jax.moe import LayerOfStack
  model = _wide_model(False)
  stacked = model.moe_layers.mlp.experts
  _, state = nnx.split(stacked)
  unstacked = _wide_model(False).unstack_layers()
  layer1 = unstacked.moe_layers[1].mlp.experts
  layer1.gemv = True
  x = jax.random.normal(jax.random.key(2), (2, 128), jnp.float32)
  routing = unstacked.moe_layers[1].mlp.gate(x)
  assert layer1.takes_gemv(*routing.experts.shape)
  want = layer1(x, routing)
  for name in ("gate_proj", "up_proj", "down_proj"):
    var = getattr(layer1, name)
    var.set_value(LayerOfStack(state[name].get_value(), jnp.int32(1)))
  got = layer1(x, routing)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


def _gemv_model(fp8: bool):
  """_wide_model with every projection's input a whole number of 128-wide slabs, in bf16."""
  return _wide_model(fp8, seed=7, dtype=jnp.bfloat16, intermediate_size=256, q_lora_rank=128,
                     kv_lora_rank=128, v_head_dim=32)


@pytest.mark.parametrize("fp8", [False, True])
def test_dense_gemv_decodes_like_the_xla_path(fp8):
  """Projections of ≤ 16 rows through pallas_kernels.gemv (interpret mode here): inside the
  scanned stack the kernel gets every Linear weight whole with the layer index; greedy
  generation (bf16 weights plain, FP8 weights with MTP) equals the dot / act_quant + FP8 GEMM
  path, scanned and unstacked."""
  from dsv3_jax.model import _whole_in_place
  ref = _gemv_model(fp8)
  model = _gemv_model(fp8).use_dense_gemv(True)
  layers = model.moe_layers
  assert layers.self_attn.q_b_proj.gemv and model.lm_head.gemv and model.mtp[0].eh_proj.gemv
  whole = _whole_in_place(layers, 2, jnp.bfloat16)
  for path in [("self_attn", "q_a_proj"), ("self_attn", "kv_b_proj"), ("self_attn", "o_proj"),
               ("mlp", "shared_experts", "down_proj")]:
    assert (*path, "weight") in whole
  assert not _whole_in_place(layers, 17, jnp.bfloat16)       # prefill: scan's slices
  # one bf16 row keeps XLA's dot; e4m3 weights take the kernel from one row on
  assert bool(_whole_in_place(layers, 1, jnp.bfloat16)) == fp8
  lin = model.moe_layers.self_attn.o_proj
  assert lin.takes_gemv(2, jnp.bfloat16) and not lin.takes_gemv(17, jnp.bfloat16)
  assert lin.takes_gemv(2, jnp.float32) == fp8 and lin.takes_gemv(1, jnp.bfloat16) == fp8
  prompts = [[5, 17, 99, 3], [42]]      # 2 rows: bf16 weights take the kernel too
  run = lambda m, **kw: [o.output_ids for o in Engine(m, chunk=3, **kw).generate(
      prompts, max_new_tokens=6)[0]]
  assert run(model, mtp=fp8) == run(ref, mtp=fp8, dense_gemv=False)
  # layers with their own arrays (compared with the same structure: in bf16, and more so with
  # FP8's activation quantization, scanned and unstacked programs round differently enough to
  # flip this random model's near-tied logits)
  assert (run(_gemv_model(fp8), dense_gemv=True, unstack=True)
          == run(_gemv_model(fp8), dense_gemv=False, unstack=True))


@pytest.mark.parametrize("fp8, q_lora", [(False, 128), (True, 128), (True, None)])
def test_fused_input_decodes_like_separate_projections(fp8, q_lora, monkeypatch):
  """`Transformer.use_fused_input`: a decoding attention block's input RMSNorm and its q (or
  q_a) and kv_a projections in one gemv_parts launch (interpret mode here), reading the
  scanned stack's weights and norm in place. One block's output equals the separate path's
  (norm, then two projections) within bf16 rounding of the norm, and greedy generation gives
  the same tokens, with and without a q LoRA (V3 / V2-Lite form)."""
  from dsv3_jax.mla import MLA
  from dsv3_jax.model import _whole_in_place
  def make():
    m = _wide_model(fp8, seed=7, dtype=jnp.bfloat16, intermediate_size=256, q_lora_rank=q_lora,
                    kv_lora_rank=128, v_head_dim=32)
    norm = m.moe_layers.input_layernorm.weight         # [L, D]: distinct per layer, not ones
    norm[...] = jax.random.uniform(jax.random.key(8), norm.shape, jnp.float32, 0.5,
                                   1.5).astype(norm.dtype)
    return m

  model = make().use_dense_gemv(True).use_fused_input(True)
  attn = model.moe_layers.self_attn
  assert attn.takes_fused_input(1, jnp.bfloat16) and attn.takes_fused_input(16, jnp.bfloat16)
  assert not attn.takes_fused_input(17, jnp.bfloat16)                 # prefill
  no_gemv = make().use_dense_gemv(False).use_fused_input(True)
  assert not no_gemv.moe_layers.self_attn.takes_fused_input(1, jnp.bfloat16)  # needs the kernels
  q_in = "q_a_proj" if q_lora else "q_proj"
  whole = _whole_in_place(model.moe_layers, 1, jnp.bfloat16)
  for path in [("input_layernorm",), ("self_attn", q_in), ("self_attn", "kv_a_proj_with_mqa")]:
    assert (*path, "weight") in whole
  assert ("input_layernorm", "weight") not in _whole_in_place(model.moe_layers, 17, jnp.bfloat16)

  # one block, own arrays: fused against norm + separate projections
  layer = make().unstack_layers().use_dense_gemv(True).use_fused_input(True).moe_layers[0]
  x = jax.random.normal(jax.random.key(3), (2, 1, 128), jnp.float32).astype(jnp.bfloat16) * 4
  pos = jnp.array([[3], [7]], jnp.int32)
  got, _ = layer.self_attn(x, pos, norm=layer.input_layernorm)
  layer.self_attn.fuse_input = False
  want, _ = layer.self_attn(layer.input_layernorm(x), pos)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=0.02, atol=0.02 * float(jnp.abs(want).max()))
  assert float(jnp.abs(want).max()) > 1e-3

  fused = []
  original = MLA._fused_input
  monkeypatch.setattr(MLA, "_fused_input",
                      lambda self, x, norm: fused.append(x.shape) or original(self, x, norm))
  prompts = [[5, 17, 99, 3], [42]]
  run = lambda m, **kw: [o.output_ids for o in Engine(m, chunk=3, **kw).generate(
      prompts, max_new_tokens=6)[0]]
  if fp8 and q_lora:        # generation: the bf16 and the no-q-LoRA forms suffice (test time)
    return
  want = run(make(), dense_gemv=True)
  assert not fused
  assert run(make(), dense_gemv=True, fused_input=True) == want
  assert fused and all(s[0] * s[1] <= 16 for s in fused)               # decode steps only

"""HF-transformers reference for the dsv3-jax parity tests.

Tiny DeepSeek-V3 configs in the released ``config.json`` form, random weights under the
released checkpoint tensor names, a safetensors writer (numpy only) and ``hf_logits``, which
runs ``transformers.DeepseekV3ForCausalLM`` (eager, fp32) on a checkpoint directory.

Importing this module needs only numpy; torch / transformers / safetensors are imported
lazily inside the functions that need them.  Reference environment: torch 2.13.0 (CPU),
transformers 5.17.0 (see tests/fixtures/make_hf_fixtures.py).

Notes on transformers 5.17 (models/deepseek_v3/):
* ``rope_scaling`` in config.json is still accepted: ``PreTrainedConfig.__post_init__`` calls
  ``convert_rope_params_to_dict`` (modeling_rope_utils.py ~L743), which pops ``rope_scaling``
  into ``config.rope_parameters`` and moves ``rope_theta`` into it.  Nothing had to be changed
  in the released config form; ``rope_scaling: null`` gives ``rope_type="default"``.
* ``rope_interleave`` is not in released configs; the 5.17 default is True (interleaved
  pairs, as in the official code), so it is left out here on purpose.
* Per-expert tensors ``mlp.experts.{e}.{gate,up,down}_proj.weight`` are fused on load into
  ``mlp.experts.gate_up_proj`` [E, 2I, H] / ``mlp.experts.down_proj`` [E, H, I] by the
  "qwen2_moe" conversion mapping (conversion_mapping.py).
* The MTP layer (index num_hidden_layers) is not part of DeepseekV3ForCausalLM; HF only
  silences ``model.layers.61.*``, so for these tiny configs its keys come back as
  ``unexpected_keys`` (reported, harmless).
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np

_COMMON = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "kv_lora_rank": 16,
    "max_position_embeddings": 256,
    "moe_intermediate_size": 32,
    "moe_layer_freq": 1,
    "n_group": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 4.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64,
        "rope_type": "yarn",
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "torch_dtype": "float32",
    "use_cache": True,
    "v_head_dim": 16,
    "vocab_size": 256,
}

TINY_CONFIGS: dict[str, dict] = {
    "tiny_v3": copy.deepcopy(_COMMON),
    "tiny_v3_noqlora": {
        **copy.deepcopy(_COMMON),
        "q_lora_rank": None,
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 3,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.5,
        "n_shared_experts": 2,
        "num_hidden_layers": 2,
        "rope_scaling": None,
        "num_nextn_predict_layers": 1,
    },
}


# ----------------------------------------------------------------------------- weights


def _layer_tensors(cfg: dict, prefix: str, moe: bool, rng: np.random.Generator, out: dict) -> None:
    """One decoder layer (attention + dense MLP or MoE + its two norms) under `prefix`."""
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    r_kv = cfg["kv_lora_rank"]
    r_q = cfg["q_lora_rank"]

    def lin(name, n_out, n_in, gain=1.0):
        # std = gain / sqrt(fan_in): unit-scale activations after normed inputs
        out[prefix + name] = (rng.standard_normal((n_out, n_in)) * (gain / np.sqrt(n_in))).astype(np.float32)

    def norm(name, n):
        out[prefix + name] = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    norm("input_layernorm.weight", H)
    norm("post_attention_layernorm.weight", H)
    a = "self_attn."
    if r_q is None:
        lin(a + "q_proj.weight", nh * (dn + dr), H)
    else:
        lin(a + "q_a_proj.weight", r_q, H)
        norm(a + "q_a_layernorm.weight", r_q)
        lin(a + "q_b_proj.weight", nh * (dn + dr), r_q)
    lin(a + "kv_a_proj_with_mqa.weight", r_kv + dr, H)
    norm(a + "kv_a_layernorm.weight", r_kv)
    lin(a + "kv_b_proj.weight", nh * (dn + dv), r_kv)
    lin(a + "o_proj.weight", H, nh * dv, gain=0.5)

    if not moe:
        I = cfg["intermediate_size"]
        lin("mlp.gate_proj.weight", I, H)
        lin("mlp.up_proj.weight", I, H)
        lin("mlp.down_proj.weight", H, I, gain=0.5)
        return
    E = cfg["n_routed_experts"]
    I = cfg["moe_intermediate_size"]
    Is = I * cfg["n_shared_experts"]
    lin("mlp.gate.weight", E, H, gain=2.0)
    out[prefix + "mlp.gate.e_score_correction_bias"] = (0.25 * rng.standard_normal(E)).astype(np.float32)
    for e in range(E):
        lin(f"mlp.experts.{e}.gate_proj.weight", I, H)
        lin(f"mlp.experts.{e}.up_proj.weight", I, H)
        lin(f"mlp.experts.{e}.down_proj.weight", H, I, gain=0.5)
    lin("mlp.shared_experts.gate_proj.weight", Is, H)
    lin("mlp.shared_experts.up_proj.weight", Is, H)
    lin("mlp.shared_experts.down_proj.weight", H, Is, gain=0.5)


def random_state_dict(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights under the released DeepSeek-V3 checkpoint names and shapes.

    Linear weights are N(0, gain²/fan_in) (gain 1; 0.5 for output projections, 2 for the
    router), the embedding N(0, 1), lm_head N(0, 1/H) -> logits std ~1; norm weights
    1 + 0.1·N(0,1); e_score_correction_bias 0.25·N(0,1) (changes a share of the expert
    selections, see routing_bias_effect).  The MTP layer at index num_hidden_layers holds
    enorm/hnorm/eh_proj, copies of embed_tokens / lm_head (as the released checkpoint does)
    under embed_tokens / shared_head.head, shared_head.norm, and a full MoE decoder layer.
    """
    rng = np.random.default_rng(seed)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    L = cfg["num_hidden_layers"]
    sd: dict[str, np.ndarray] = {}
    sd["model.embed_tokens.weight"] = rng.standard_normal((V, H)).astype(np.float32)
    for i in range(L):
        _layer_tensors(cfg, f"model.layers.{i}.", i >= cfg["first_k_dense_replace"], rng, sd)
    sd["model.norm.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    sd["lm_head.weight"] = (rng.standard_normal((V, H)) / np.sqrt(H)).astype(np.float32)
    for k in range(cfg.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{L + k}."
        sd[p + "enorm.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
        sd[p + "hnorm.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
        sd[p + "eh_proj.weight"] = (rng.standard_normal((H, 2 * H)) / np.sqrt(2 * H)).astype(np.float32)
        sd[p + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].copy()
        sd[p + "shared_head.norm.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
        sd[p + "shared_head.head.weight"] = sd["lm_head.weight"].copy()
        _layer_tensors(cfg, p, True, rng, sd)
    return sd


# ----------------------------------------------------------------------------- writing


def write_checkpoint(cfg: dict, state_dict: dict[str, np.ndarray], out_dir: str, num_shards: int = 1) -> None:
    """config.json + model.safetensors, or model-0000k-of-0000n.safetensors + index when sharded."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    meta = {"format": "pt"}  # transformers refuses safetensors files without format metadata
    names = list(state_dict)  # insertion order: layer by layer
    tensors = {k: np.ascontiguousarray(state_dict[k]) for k in names}
    if num_shards <= 1:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata=meta)
        os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)
        return
    total = sum(t.nbytes for t in tensors.values())
    # contiguous split of the ordered names into shards of ~equal byte size
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    acc = 0
    for k in names:
        s = min(num_shards - 1, int(acc * num_shards // total))
        shards[s].append(k)
        acc += tensors[k].nbytes
    weight_map = {}
    for s, keys in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, os.path.join(out_dir, fname), metadata=meta)
        os.chmod(os.path.join(out_dir, fname), 0o644)
        for k in keys:
            weight_map[k] = fname
    index = {"metadata": {"total_size": int(total)}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------- HF forward


def load_hf_model(ckpt_dir: str):
    """Load with transformers (offline, fp32, eager attention, eager experts loop).

    Returns (model, loading_info).  Raises if any parameter is missing or mismatched.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        ckpt_dir,
        dtype=torch.float32,  # 5.x name of `torch_dtype` (which is deprecated there)
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
        local_files_only=True,
    )
    model.eval()
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    assert not missing, f"HF reported missing keys: {missing}"
    assert not mismatched, f"HF reported mismatched shapes: {mismatched}"
    return model, info


def hf_logits(ckpt_dir: str, input_ids: np.ndarray) -> np.ndarray:
    """fp32 logits [B, T, V] of DeepseekV3ForCausalLM on `input_ids` (causal, no padding)."""
    import torch

    model, _ = load_hf_model(ckpt_dir)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), use_cache=False)
    return out.logits.detach().to(torch.float32).numpy().copy()


def routing_bias_effect(ckpt_dir: str, input_ids: np.ndarray) -> dict[str, float]:
    """Per MoE layer: share of tokens whose top-k expert SET changes if e_score_correction_bias is zeroed.

    Uses the router inputs that HF's own forward produces.
    """
    import torch

    model, _ = load_hf_model(ckpt_dir)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            hooks.append(gate.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o[2].clone())))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), use_cache=False)
        for h in hooks:
            h.remove()
        res = {}
        for i, idx_bias in list(captured.items()):
            gate = model.model.layers[i].mlp.gate
            saved = gate.e_score_correction_bias.clone()
            gate.e_score_correction_bias.zero_()
            hooks = [gate.register_forward_hook(lambda m, a, o: captured.__setitem__(-1, o[2].clone()))]
            model(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), use_cache=False)
            hooks[0].remove()
            gate.e_score_correction_bias.copy_(saved)
            a = idx_bias.sort(-1).values
            b = captured[-1].sort(-1).values
            res[f"layer{i}"] = float((a != b).any(-1).float().mean())
    return res

"""Model configuration: one frozen dataclass, read from and written to HF `config.json`.

Dimension alphabet used across the package (shape comments, einsum strings, axis names):
  B batch, T query length, S key length, D model width, N heads, H nope head dim,
  R rope dim, C kv latent, Q q latent, F FFN width, E experts, K top-k, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal, Mapping

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
# topk_method → how a group of experts is scored for group-limited routing.
_GROUP_SCORING = {"noaux_tc": "top2_sum", "group_limited_greedy": "max", "greedy": "max"}


class ConfigError(ValueError):
  """A config value this implementation does not support, or an inconsistent config."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """YaRN parameters (the `rope_scaling` / `rope_parameters` block of an HF config)."""

  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8Quant:
  """The checkpoint's `quantization_config` (DeepSeek FP8: e4m3 weights, 128×128 block scales)."""

  block_size: tuple[int, int] = (128, 128)
  activation_scheme: str = "dynamic"
  # "ue8m0" (V3.1): activation scales rounded up to powers of two.
  scale_fmt: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """DeepSeek-V2/V3 architecture hyper-parameters (HF names where one exists)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  moe_intermediate_size: int
  num_hidden_layers: int
  first_k_dense_replace: int
  num_attention_heads: int
  q_lora_rank: int | None
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  n_routed_experts: int
  n_shared_experts: int
  num_experts_per_tok: int
  n_group: int = 1
  topk_group: int = 1
  topk_method: str = "noaux_tc"
  scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
  routed_scaling_factor: float = 1.0
  norm_topk_prob: bool = True
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-6
  num_nextn_predict_layers: int = 0
  quantization: Fp8Quant | None = None
  initializer_range: float = 0.006
  model_type: str = "deepseek_v3"
  # Every other key of the HF config (token ids, architectures, ...), kept for writing back.
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def __post_init__(self):
    errors = []
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      errors.append(f"model_type={self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    if self.scoring_func not in ("sigmoid", "softmax"):
      errors.append(f"scoring_func={self.scoring_func!r} must be 'sigmoid' or 'softmax'")
    if self.topk_method not in _GROUP_SCORING:
      errors.append(f"topk_method={self.topk_method!r} must be one of {sorted(_GROUP_SCORING)}")
    if self.n_group < 1 or self.n_routed_experts % self.n_group:
      errors.append(f"n_routed_experts={self.n_routed_experts} must be a multiple of n_group={self.n_group}")
    if not 1 <= self.topk_group <= self.n_group:
      errors.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
    if self.n_group > 1 and self.n_routed_experts // self.n_group < 2 and self.topk_method == "noaux_tc":
      errors.append("noaux_tc group scoring needs at least 2 experts per group")
    max_k = self.topk_group * (self.n_routed_experts // self.n_group)
    if not 1 <= self.num_experts_per_tok <= max_k:
      errors.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {max_k}] "
                    f"(topk_group × experts per group)")
    if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
      errors.append(f"first_k_dense_replace={self.first_k_dense_replace} must be in "
                    f"[0, num_hidden_layers={self.num_hidden_layers}]")
    if self.qk_rope_head_dim % 2:
      errors.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
    if self.q_lora_rank is not None and self.q_lora_rank <= 0:
      errors.append(f"q_lora_rank={self.q_lora_rank} must be positive or null")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                 "qk_rope_head_dim", "v_head_dim", "n_routed_experts"):
      if getattr(self, name) <= 0:
        errors.append(f"{name}={getattr(self, name)} must be positive")
    if self.n_shared_experts < 0 or self.num_nextn_predict_layers < 0:
      errors.append("n_shared_experts and num_nextn_predict_layers must be >= 0")
    if errors:
      raise ConfigError("unsupported DeepSeek config: " + "; ".join(errors))

  # ---- derived sizes -------------------------------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_dense_layers(self) -> int:
    return self.first_k_dense_replace

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.first_k_dense_replace

  @property
  def shared_intermediate_size(self) -> int:
    return self.n_shared_experts * self.moe_intermediate_size

  @property
  def group_scoring(self) -> str:
    """How a group is scored for group-limited routing: 'top2_sum' (V3) or 'max' (V2)."""
    return _GROUP_SCORING[self.topk_method]

  @property
  def has_correction_bias(self) -> bool:
    """V3's aux-loss-free balancing bias (`e_score_correction_bias`) exists for noaux_tc."""
    return self.topk_method == "noaux_tc"

  @property
  def cache_values_per_token(self) -> int:
    """Values cached per token per layer by absorbed MLA: kv latent C + rope key R."""
    return self.kv_lora_rank + self.qk_rope_head_dim

  @property
  def softmax_scale(self) -> float:
    """qk_head_dim^-0.5, times YaRN's m² whenever rope scaling is YaRN (as HF does)."""
    scale = self.qk_head_dim ** -0.5
    rs = self.rope_scaling
    if rs is not None and rs.mscale_all_dim:
      m = yarn_mscale(rs.factor, rs.mscale_all_dim)
      scale *= m * m
    return scale

  @property
  def fp8(self) -> bool:
    return self.quantization is not None

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ---- HF config.json ------------------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Reads an HF DeepSeek-V2/V3 config dict (transformers 4 or 5 layout)."""
    d = dict(d)
    problems = []
    if d.get("hidden_act", "silu") != "silu":
      problems.append(f"hidden_act={d['hidden_act']!r} (only 'silu')")
    if d.get("tie_word_embeddings", False):
      problems.append("tie_word_embeddings=true (DeepSeek models have a separate lm_head)")
    if d.get("attention_bias", False):
      problems.append("attention_bias=true (DeepSeek attention has no biases)")
    nkv = d.get("num_key_value_heads", d.get("num_attention_heads"))
    if nkv != d.get("num_attention_heads"):
      problems.append(f"num_key_value_heads={nkv} != num_attention_heads (MLA has no GQA)")
    if d.get("moe_layer_freq", 1) != 1:
      problems.append(f"moe_layer_freq={d['moe_layer_freq']} (only 1)")
    if problems:
      raise ConfigError("unsupported DeepSeek config: " + "; ".join(problems))
    required = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok")
    missing = [k for k in required if d.get(k) is None]
    if missing:
      raise ConfigError(f"config is missing required DeepSeek fields: {missing}")

    rope_theta = d.get("rope_theta")
    rope_block = d.get("rope_scaling")
    if rope_block is None and isinstance(d.get("rope_parameters"), Mapping):
      rope_block = d["rope_parameters"]  # transformers 5 layout; also holds rope_theta
      rope_theta = rope_theta or rope_block.get("rope_theta")
    rope_scaling = _read_rope(rope_block)

    qc = d.get("quantization_config")
    quant = None
    if qc:
      if qc.get("quant_method", "fp8") != "fp8" or qc.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"unsupported quantization_config {qc}: only fp8 e4m3 block scales")
      block = tuple(qc.get("weight_block_size", (128, 128)))
      if block != (128, 128):
        raise ConfigError(f"unsupported weight_block_size {list(block)}: only [128, 128]")
      scale_fmt = qc.get("scale_fmt")
      if scale_fmt not in (None, "ue8m0"):
        raise ConfigError(f"unsupported quantization_config.scale_fmt={scale_fmt!r}")
      quant = Fp8Quant(block_size=block, activation_scheme=qc.get("activation_scheme", "dynamic"),
                       scale_fmt=scale_fmt)

    model_type = d.get("model_type", "deepseek_v3")
    default_method = "noaux_tc" if model_type == "deepseek_v3" else "greedy"
    known = {f.name for f in dataclasses.fields(cls)} | {
        "rope_scaling", "rope_parameters", "quantization_config", "num_key_value_heads",
        "hidden_act", "tie_word_embeddings", "attention_bias", "moe_layer_freq"}
    q_lora = d.get("q_lora_rank")
    return cls(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        moe_intermediate_size=d["moe_intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        first_k_dense_replace=d.get("first_k_dense_replace", 0),
        num_attention_heads=d["num_attention_heads"],
        q_lora_rank=q_lora if q_lora else None,
        kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"],
        v_head_dim=d["v_head_dim"],
        n_routed_experts=d["n_routed_experts"],
        n_shared_experts=d.get("n_shared_experts") or 0,
        num_experts_per_tok=d["num_experts_per_tok"],
        n_group=d.get("n_group") or 1,
        topk_group=d.get("topk_group") or 1,
        topk_method=d.get("topk_method") or default_method,
        scoring_func=d.get("scoring_func", "softmax"),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        rope_theta=float(rope_theta or 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        num_nextn_predict_layers=d.get("num_nextn_predict_layers", 0) or 0,
        quantization=quant,
        initializer_range=float(d.get("initializer_range", 0.006)),
        model_type=model_type,
        extra={k: v for k, v in d.items() if k not in known},
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF config.json dict (released DeepSeek layout, `rope_scaling` form)."""
    d: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3"
                          else "DeepseekV2ForCausalLM"],
        "model_type": self.model_type,
    }
    d.update(self.extra)
    for f in dataclasses.fields(self):
      if f.name in ("extra", "rope_scaling", "quantization"):
        continue
      d[f.name] = getattr(self, f.name)
    d.update(num_key_value_heads=self.num_attention_heads, hidden_act="silu",
             tie_word_embeddings=False, attention_bias=False, moe_layer_freq=1)
    if self.rope_scaling is not None:
      # both spellings: DeepSeek's files say "type", transformers says "rope_type"
      d["rope_scaling"] = {"type": "yarn", "rope_type": "yarn",
                           **dataclasses.asdict(self.rope_scaling)}
    else:
      d["rope_scaling"] = None
    if self.quantization is not None:
      q = self.quantization
      d["quantization_config"] = {"activation_scheme": q.activation_scheme, "fmt": "e4m3",
                                  "quant_method": "fp8", "weight_block_size": list(q.block_size)}
      if q.scale_fmt:
        d["quantization_config"]["scale_fmt"] = q.scale_fmt
    return dict(sorted(d.items()))

  def save(self, path: str | os.PathLike) -> None:
    """Writes config.json (atomically: a temporary file renamed into place)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.to_hf_dict(), f, indent=2)
      f.write("\n")
    os.replace(tmp, path)


def _read_rope(block: Mapping[str, Any] | None) -> RopeScaling | None:
  if not block:
    return None
  kind = block.get("rope_type", block.get("type"))
  if kind in (None, "default"):
    return None
  if kind != "yarn":
    raise ConfigError(f"unsupported rope scaling type {kind!r}: only 'yarn' (or none)")
  try:
    return RopeScaling(
        factor=float(block["factor"]),
        original_max_position_embeddings=int(block["original_max_position_embeddings"]),
        beta_fast=float(block.get("beta_fast", 32)),
        beta_slow=float(block.get("beta_slow", 1)),
        mscale=float(block.get("mscale", 1.0)),
        mscale_all_dim=float(block.get("mscale_all_dim", 0.0)),
    )
  except KeyError as e:
    raise ConfigError(f"YaRN rope scaling block is missing {e.args[0]!r}: {dict(block)}") from None


def yarn_mscale(factor: float, mscale: float) -> float:
  """YaRN's attention-magnitude correction m = 0.1·mscale·ln(factor) + 1 (1 when factor ≤ 1)."""
  return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def load_config(path: str | os.PathLike) -> ModelConfig:
  """Reads a `config.json` (or a directory holding one) into a ModelConfig."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"no config file at {path}") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None
  try:
    return ModelConfig.from_hf_dict(d)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None

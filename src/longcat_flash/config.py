"""ModelConfig: the LongCat-Flash hyperparameters, named exactly as in the official HF `config.json`.

Reading and writing `config.json` is lossless for every field we use, and what we write loads in
`transformers.LongcatFlashConfig`. Every invalid value fails here with a ValueError naming the field, so the
model code can assume a consistent config.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ZERO_EXPERT_TYPES = ("identity", "drop")

# Keys transformers writes into config.json that we either derive or do not need.
_DERIVED_OR_IGNORED = {
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "output_router_logits", "attention_dropout", "num_key_value_heads", "head_dim", "qk_head_dim",
    "num_hidden_layers", "auto_map", "_name_or_path", "attention_method", "router_dtype",
    "rounter_params_dtype", "nextn_use_scmoe", "disable_quant_module", "quantization_config",
}
# HF attribute_map aliases accepted on input.
_ALIASES = {
    "num_local_experts": "n_routed_experts",
    "num_experts_per_tok": "moe_topk",
    "intermediate_size": "ffn_hidden_size",
    "moe_intermediate_size": "expert_ffn_hidden_size",
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """LongCat-Flash shape. Field names are the official `config.json` names (see docs/architecture.md §2)."""

    vocab_size: int = 131072
    hidden_size: int = 6144
    num_layers: int = 28  # ScMoE layers; each holds 2 MLA blocks, 2 dense FFNs and 1 MoE
    num_attention_heads: int = 64
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    ffn_hidden_size: int = 12288
    expert_ffn_hidden_size: int = 2048
    n_routed_experts: int = 512
    zero_expert_num: int = 256
    zero_expert_type: str = "identity"
    moe_topk: int = 12
    routed_scaling_factor: float = 6.0
    norm_topk_prob: bool = False
    router_bias: bool = False
    mla_scale_q_lora: bool = True
    mla_scale_kv_lora: bool = True
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1.0e7
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0  # 1 = the dense MTP head (`model.mtp.*`); HF-written configs have none
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden_size",
                    "expert_ffn_hidden_size", "n_routed_experts", "moe_topk", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.zero_expert_num, int) or self.zero_expert_num < 0:
            raise ValueError(f"ModelConfig.zero_expert_num must be an integer >= 0, got {self.zero_expert_num!r}")
        if self.zero_expert_type not in ZERO_EXPERT_TYPES:
            raise ValueError(f"ModelConfig.zero_expert_type must be one of {ZERO_EXPERT_TYPES}, "
                             f"got {self.zero_expert_type!r}")
        if self.moe_topk > self.n_experts_total:
            raise ValueError(f"ModelConfig.moe_topk={self.moe_topk} exceeds n_routed_experts + zero_expert_num "
                             f"= {self.n_experts_total}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelConfig.qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        for name in ("q_lora_rank", "kv_lora_rank"):
            if getattr(self, name) > self.hidden_size:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must not exceed "
                                 f"hidden_size={self.hidden_size} (it is a low-rank bottleneck)")
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"ModelConfig.hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.num_nextn_predict_layers not in (0, 1):
            raise ValueError(f"ModelConfig.num_nextn_predict_layers must be 0 or 1 (one dense MTP head), "
                             f"got {self.num_nextn_predict_layers!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"ModelConfig.{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # ---- derived sizes (never stored twice) ----
    @property
    def n_experts_total(self) -> int:
        """Router width: FFN experts followed by zero-computation experts."""
        return self.n_routed_experts + self.zero_expert_num

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_attention_blocks(self) -> int:
        """MLA blocks in the trunk (two per ScMoE layer); the MTP block, if any, is number `2 * num_layers`."""
        return 2 * self.num_layers

    @property
    def q_lora_scale(self) -> float:
        """Variance alignment (report §4.1): sqrt(d_model / d_q) on both query parts, or 1."""
        return math.sqrt(self.hidden_size / self.q_lora_rank) if self.mla_scale_q_lora else 1.0

    @property
    def kv_lora_scale(self) -> float:
        """Variance alignment (report §4.1): sqrt(d_model / d_kv) on the normalised KV latent, or 1."""
        return math.sqrt(self.hidden_size / self.kv_lora_rank) if self.mla_scale_kv_lora else 1.0

    @property
    def default_ffn_expert_target(self) -> float:
        """K_e: expected FFN experts per token. The report's 8 of 12, i.e. 2/3 of top-k when zero experts exist."""
        return self.moe_topk * 2 / 3 if self.zero_expert_num else float(self.moe_topk)

    # ---- config.json I/O ----
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a `config.json` dict (official or transformers-written); unknown keys are an error."""
        values: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            key = _ALIASES.get(key, key)
            if key in ("rope_parameters", "rope_scaling"):
                values.update(_rope_fields(key, value))
            elif key == "eos_token_id" and isinstance(value, list):
                values[key] = value[0] if value else None
            elif key in known:
                values[key] = value
            elif key not in _DERIVED_OR_IGNORED:
                raise ValueError(f"config.json: unknown field {key!r}; known fields: {sorted(known)}")
        if raw.get("head_dim") not in (None, values.get("qk_rope_head_dim", cls.qk_rope_head_dim)):
            raise ValueError(f"config.json: head_dim={raw['head_dim']} must equal qk_rope_head_dim "
                             "(transformers uses head_dim as the rotary dimension)")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` dict, with the derived keys transformers expects."""
        out = dataclasses.asdict(self)
        theta = out.pop("rope_theta")
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        out.update(architectures=["LongcatFlashForCausalLM"], model_type="longcat_flash",
                   head_dim=self.qk_rope_head_dim, qk_head_dim=self.qk_head_dim,
                   num_key_value_heads=self.num_attention_heads)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(raw)

    def save_json(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _rope_fields(key: str, value: Any) -> dict[str, Any]:
    """Map `rope_parameters` / legacy `rope_scaling` to our fields; only the default RoPE is supported."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"config.json: {key} must be an object, got {value!r}")
    rope_type = value.get("rope_type", value.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json: {key}.rope_type={rope_type!r} is not supported (only 'default')")
    return {"rope_theta": value["rope_theta"]} if "rope_theta" in value else {}

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

from .files import atomic_write_text

ZERO_EXPERT_TYPES = ("identity", "drop")
ROPE_TYPES = ("default", "yarn")

# Keys transformers writes into config.json that we either derive or do not need.
_DERIVED_OR_IGNORED = {
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "output_router_logits", "attention_dropout", "num_key_value_heads", "head_dim", "qk_head_dim",
    "num_hidden_layers", "auto_map", "_name_or_path", "attention_method", "router_dtype",
    "rounter_params_dtype", "nextn_use_scmoe", "disable_quant_module", "quantization_config",
    # the official remote-code config's deployment and training-layout fields: they change no computation here
    "ep_size", "pretraining_tp", "params_dtype",
    # transformers' generic PretrainedConfig keys (what a forward returns, classification labels, hints): a causal
    # LM's logits are the same whatever they say
    "output_hidden_states", "output_attentions", "return_dict", "torchscript", "id2label", "label2id",
    "problem_type", "tokenizer_class", "is_decoder", "chunk_size_feed_forward", "use_bfloat16", "tf_legacy_loss",
    "finetuning_task", "task_specific_params", "prefix", "sep_token_id", "decoder_start_token_id",
}
# Keys read only at the value that changes nothing; another describes a model this is not (transformers builds it)
_ONLY_AT = {"is_encoder_decoder": False, "add_cross_attention": False, "tie_encoder_decoder": False,
            "pruned_heads": {}, "use_sliding_window": False, "mlp_bias": False}
def _check_derived(raw: dict[str, Any], cfg: ModelConfig) -> None:
    """Derived keys are not read, but one that disagrees with its source describes another model (transformers
    would size it from the derived key)."""
    if "num_layers" in raw and raw.get("num_hidden_layers") not in (None, cfg.num_layers, 2 * cfg.num_layers):
        raise ValueError(f"config.json: num_hidden_layers={raw['num_hidden_layers']!r} disagrees with num_layers="
                         f"{cfg.num_layers} (it is num_layers, or 2 * num_layers as transformers counts sublayers)")
    if raw.get("rope_parameters"):  # null or {}: says nothing, the top-level keys alone describe the model
        _check_rope_spellings(raw, cfg.max_position_embeddings)
    if raw.get("head_dim") not in (None, cfg.qk_rope_head_dim):
        raise ValueError(f"config.json: head_dim={raw['head_dim']!r} must equal qk_rope_head_dim="
                         f"{cfg.qk_rope_head_dim} (transformers uses head_dim as the rotary dimension)")
    if raw.get("qk_head_dim") not in (None, cfg.qk_head_dim):
        raise ValueError(f"config.json: qk_head_dim={raw['qk_head_dim']!r} disagrees with qk_nope_head_dim + "
                         f"qk_rope_head_dim = {cfg.qk_head_dim}")
    if raw.get("num_key_value_heads") not in (None, cfg.num_attention_heads):  # transformers would repeat k and v
        raise ValueError(f"config.json: num_key_value_heads={raw['num_key_value_heads']!r} disagrees with "
                         f"num_attention_heads={cfg.num_attention_heads} (MLA gives every head its own keys and "
                         "values)")
    for key in ("dtype", "torch_dtype"):  # the weights' dtype comes from the safetensors; transformers refuses these
        if raw.get(key) not in (None, *_FLOATING_DTYPES):
            raise ValueError(f"config.json: {key}={raw[key]!r} is not a floating-point dtype (one of "
                             f"{', '.join(_FLOATING_DTYPES)})")


_FLOATING_DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")  # the dtype names config.json may hold

# HF attribute_map aliases accepted on input.
_ALIASES = {
    "num_local_experts": "n_routed_experts",
    "num_experts_per_tok": "moe_topk",
    "intermediate_size": "ffn_hidden_size",
    "moe_intermediate_size": "expert_ffn_hidden_size",
}


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Context extension of the rotary embedding: the non-theta keys of transformers' `rope_parameters`.

    "default" is plain RoPE (all other fields unset). "yarn" (arXiv 2309.00071) divides the frequencies that turn
    fewer than `beta_slow` times over the original length by `factor`, keeps those that turn more than `beta_fast`
    times, ramps linearly in between, and multiplies cos/sin by `attention_scaling`; with `mscale_all_dim` set the
    softmax scale also gets `softmax_mscale` (DeepSeek's rule, which transformers' LongcatFlash follows).
    """

    rope_type: str = "default"
    factor: float = 1.0  # new context / original context
    original_max_position_embeddings: int | None = None  # the length the model was trained at before extension
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # cos/sin multiplier; None = derived from factor and the mscales
    truncate: bool = True  # round the ramp's ends out to whole dimensions

    def __post_init__(self) -> None:
        where = "ModelConfig.rope_scaling"
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"{where}.rope_type={self.rope_type!r} is not supported; choose one of {ROPE_TYPES}")
        if self.rope_type == "default":
            changed = [f.name for f in dataclasses.fields(self)
                       if f.name != "rope_type" and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"{where}.{changed[0]}={getattr(self, changed[0])!r} only applies with "
                                 "rope_type='yarn' (set the fields together, e.g. rope_scaling={'rope_type': "
                                 "'yarn', 'factor': 4, 'original_max_position_embeddings': 4096})")
            return
        for name in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{where}.{name} must be a positive finite number, got {value!r}")
        if self.factor < 1:
            raise ValueError(f"{where}.factor must be >= 1 (it extends the context), got {self.factor!r}")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"{where}.beta_fast={self.beta_fast} must exceed beta_slow={self.beta_slow}")
        original = self.original_max_position_embeddings
        if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
            raise ValueError(f"{where}.original_max_position_embeddings must be a positive integer for "
                             f"rope_type='yarn' (the pre-extension context length), got {original!r}")
        if self.truncate not in (True, False):
            raise ValueError(f"{where}.truncate must be true or false, got {self.truncate!r}")

    @property
    def attention_scaling(self) -> float:
        """The factor on cos and sin (so on every q.k rope term), as transformers' `_compute_yarn_parameters`."""
        if self.rope_type == "default":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor, 1.0)

    @property
    def softmax_mscale(self) -> float:
        """The factor on the softmax scale: mscale(factor, mscale_all_dim)^2 with yarn (transformers' LongcatFlash)."""
        if self.rope_type == "default" or not self.mscale_all_dim:
            return 1.0
        return _yarn_mscale(self.factor, self.mscale_all_dim) ** 2

    def to_dict(self) -> dict[str, Any]:
        """The keys this adds to `rope_parameters` (none for the default RoPE)."""
        if self.rope_type == "default":
            return {}
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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
    rope_scaling: RopeScaling = RopeScaling()  # config.json: the other keys of `rope_parameters`
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0  # 1 = the dense MTP head (`model.mtp.*`); HF-written configs have none
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2  # config.json may list several; generation ends at any
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, (list, tuple)):  # transformers' spelling of several; none listed: None,
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id) or None)  # as from_dict reads []
        if isinstance(self.rope_scaling, dict):  # RopeScaling's fields as a dict (`RopeScaling.to_dict`'s form)
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError as err:
                raise ValueError(f"ModelConfig.rope_scaling: {err}; its fields: "
                                 f"{[f.name for f in dataclasses.fields(RopeScaling)]}") from None
        positive = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden_size",
                    "expert_ffn_hidden_size", "n_routed_experts", "moe_topk", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("norm_topk_prob", "router_bias", "mla_scale_q_lora", "mla_scale_kv_lora", "attention_bias",
                     "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):  # "no" or 0 would read as a choice it is not
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if type(self.zero_expert_num) is not int or self.zero_expert_num < 0:
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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        if self.rope_theta <= 1:  # the frequencies are powers of 1/theta; YaRN divides by log(theta)
            raise ValueError(f"ModelConfig.rope_theta must be > 1, got {self.rope_theta!r}")
        original = self.rope_scaling.original_max_position_embeddings
        if original is not None and original > self.max_position_embeddings:
            raise ValueError(f"ModelConfig.rope_scaling.original_max_position_embeddings={original} exceeds "
                             f"max_position_embeddings={self.max_position_embeddings}")
        if self.hidden_act != "silu":
            raise ValueError(f"ModelConfig.hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.num_nextn_predict_layers not in (0, 1) or isinstance(self.num_nextn_predict_layers, bool):
            raise ValueError(f"ModelConfig.num_nextn_predict_layers must be 0 or 1 (one dense MTP head), "
                             f"got {self.num_nextn_predict_layers!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            several = name == "eos_token_id" and isinstance(value, tuple)
            for token in value if several else [value]:
                if token is not None and not (isinstance(token, int) and not isinstance(token, bool)):
                    raise ValueError(f"ModelConfig.{name} must be a token id (an integer)"
                                     f"{' or a list of them' if name == 'eos_token_id' else ''}, got {value!r}")
                if token is not None and not 0 <= token < self.vocab_size:
                    raise ValueError(f"ModelConfig.{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # ---- derived sizes (never stored twice) ----
    @property
    def n_experts_total(self) -> int:
        """Router width: FFN experts followed by zero-computation experts."""
        return self.n_routed_experts + self.zero_expert_num

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a generated sequence."""
        eos = self.eos_token_id
        return eos if isinstance(eos, tuple) else () if eos is None else (eos,)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_attention_blocks(self) -> int:
        """MLA blocks in the trunk (two per ScMoE layer); the MTP block, if any, is number `2 * num_layers`."""
        return 2 * self.num_layers

    @property
    def q_lora_scale(self) -> float:
        """Variance alignment (report §2.3.1): sqrt(d_model / d_q) on both query parts, or 1."""
        return math.sqrt(self.hidden_size / self.q_lora_rank) if self.mla_scale_q_lora else 1.0

    @property
    def kv_lora_scale(self) -> float:
        """Variance alignment (report §2.3.1): sqrt(d_model / d_kv) on the normalised KV latent, or 1."""
        return math.sqrt(self.hidden_size / self.kv_lora_rank) if self.mla_scale_kv_lora else 1.0

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale: 1/sqrt(qk_head_dim), times YaRN's mscale^2 when configured."""
        return self.qk_head_dim ** -0.5 * self.rope_scaling.softmax_mscale

    @property
    def default_ffn_expert_target(self) -> float:
        """K_e: expected FFN experts per token. The report's 8 of 12, i.e. 2/3 of top-k when zero experts exist (at
        most every FFN expert: most_ffn_experts)."""
        return min(self.moe_topk * 2 / 3, self.most_ffn_experts) if self.zero_expert_num else float(self.moe_topk)

    @property
    def fewest_ffn_experts(self) -> int:
        """The fewest FFN experts a token can pick: top-k less the zero experts, each of which it picks once."""
        return max(0, self.moe_topk - self.zero_expert_num)

    @property
    def most_ffn_experts(self) -> int:
        """The most FFN experts a token can pick: top-k, or every FFN expert where there are fewer (the rest of its
        top-k are zero experts)."""
        return min(self.moe_topk, self.n_routed_experts)

    @property
    def dominant_parameters(self) -> int:
        """The embedding table(s) and every layer's routed experts (three matrices each): a lower bound of the
        model's parameters that needs no model built (building 10^8 layers, even on the meta device, takes hours)."""
        tables = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return tables + self.num_layers * self.n_routed_experts * 3 * self.hidden_size * self.expert_ffn_hidden_size

    # ---- config.json I/O ----
    @classmethod
    def from_dict(cls, raw: dict[str, Any], prequantized: bool = False) -> ModelConfig:
        """Build from a `config.json` dict (official or transformers-written); unknown keys are an error.
        `prequantized`: the config of pre-quantized weights is read for its shape (`longcat info`), not refused."""
        values: dict[str, Any] = {}
        rope: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling"}
        if raw.get("quantization_config") and not prequantized:  # the official FP8 release: scales we do not read
            method = raw["quantization_config"].get("quant_method") if isinstance(raw["quantization_config"], dict) \
                else None
            raise ValueError(f"config.json: quantization_config (quant_method={method!r}): pre-quantized checkpoints "
                             "are not loaded; use the bf16 checkpoint, quantized at load time with --quantize")
        if raw.get("model_type", "longcat_flash") != "longcat_flash":
            raise ValueError(f"config.json: model_type={raw['model_type']!r} is not a LongCat-Flash model "
                             "('longcat_flash')")
        if raw.get("pretraining_tp", 1) != 1:
            raise ValueError(f"config.json: pretraining_tp={raw['pretraining_tp']!r}: only 1 (unsliced linears) is "
                             "supported")
        if "num_layers" not in raw and isinstance(raw.get("num_hidden_layers"), int):
            values["num_layers"] = raw["num_hidden_layers"] // 2  # transformers': two sublayers per layer
        for alias, name in _ALIASES.items():  # one would win by its place in the file
            if alias in raw and name in raw and raw[alias] != raw[name]:
                raise ValueError(f"config.json: {alias}={raw[alias]!r} disagrees with {name}={raw[name]!r} (two "
                                 "names of one field)")
        for key, value in raw.items():
            key = _ALIASES.get(key, key)
            if key in ("rope_parameters", "rope_scaling"):
                rope[key] = value
            elif key == "eos_token_id" and isinstance(value, list):  # transformers' spelling of several
                values[key] = tuple(value) if len(value) > 1 else value[0] if value else None
            elif key in known:
                values[key] = value
            elif key in _ONLY_AT:
                if value != _ONLY_AT[key]:
                    raise ValueError(f"config.json: {key}={value!r} is not supported (only {_ONLY_AT[key]!r})")
            elif key not in _DERIVED_OR_IGNORED:
                raise ValueError(f"config.json: unknown field {key!r}; known fields: {sorted(known)}")
        key = "rope_scaling" if rope.get("rope_scaling") else "rope_parameters"  # transformers' precedence
        context = values.get("max_position_embeddings", cls.max_position_embeddings)
        if key in rope:
            values.update(_rope_fields(key, rope[key], context))
        cfg = cls(**values)  # every field checked before the derived keys are compared with them
        _check_derived(raw, cfg)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` dict, with the derived keys transformers expects."""
        out = dataclasses.asdict(self)
        theta, _ = out.pop("rope_theta"), out.pop("rope_scaling")
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **self.rope_scaling.to_dict()}
        # the same again in the keys transformers 4.x, vLLM, SGLang and the official remote code read (5.x takes both)
        out.update(rope_theta=theta, rope_scaling=self.rope_scaling.to_dict() or None)
        out.update(architectures=["LongcatFlashForCausalLM"], model_type="longcat_flash",
                   head_dim=self.qk_rope_head_dim, qk_head_dim=self.qk_head_dim,
                   num_key_value_heads=self.num_attention_heads)
        return out

    @classmethod
    def from_json(cls, path: str | Path, prequantized: bool = False) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: must hold a JSON object of config fields, not {type(raw).__name__}")
        try:
            return cls.from_dict(raw, prequantized)
        except ValueError as err:  # which config.json, where a command reads several (init_from, grow SRC --out DST)
            raise ValueError(f"{path}: {str(err).removeprefix('config.json: ')}") from None

    def save_json(self, path: str | Path, dtype: str | None = None) -> None:
        """Write config.json (into `path` when it is a directory) atomically; `dtype` is the stored weights' dtype
        ("bfloat16"), the field transformers reads to choose a dtype."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        fields = self.to_dict() if dtype is None else {**self.to_dict(), "dtype": dtype}
        atomic_write_text(path, json.dumps(fields, indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _check_rope_spellings(raw: dict[str, Any], max_position_embeddings: int) -> None:
    """`rope_parameters` beside a top-level `rope_theta` / `rope_scaling` (what save_json writes, for readers of
    either spelling) must say the same: edited in one place, transformers 5 and this read one model, vLLM, SGLang
    and transformers 4.x another."""
    new = _rope_fields("rope_parameters", raw["rope_parameters"], max_position_embeddings)
    old = {**_rope_fields("rope_scaling", raw.get("rope_scaling"), max_position_embeddings),
           **({"rope_theta": raw["rope_theta"]} if "rope_theta" in raw else {})}
    if "rope_scaling" in raw and raw["rope_scaling"] is None:
        old["rope_scaling"] = RopeScaling()  # null: plain RoPE
    defaulted = bool(raw.get("rope_scaling")) and "rope_theta" not in old  # that rope_scaling wins, at the default base
    if defaulted:
        old["rope_theta"] = ModelConfig.rope_theta
    for key in ("rope_theta", "rope_scaling"):
        ours, theirs = new.get(key, RopeScaling() if key == "rope_scaling" else None), old.get(key)
        if theirs is not None and ours is not None and ours != theirs:
            given = " (not given: the default, with which the top-level rope_scaling is read)" if (
                defaulted and key == "rope_theta") else ""
            raise ValueError(f"config.json: rope_parameters and the top-level {key} disagree (rope_parameters: "
                             f"{ours!r}; {key}: {theirs!r}{given}): readers of the one and of the other would run "
                             "different models; make them the same")


def _rope_fields(key: str, value: Any, max_position_embeddings: int) -> dict[str, Any]:
    """Map `rope_parameters` / legacy `rope_scaling` to `rope_theta` and `rope_scaling`, as transformers reads them."""
    if value is None:
        return {}
    is_object = isinstance(value, dict)
    if not is_object:
        raise ValueError(f"config.json: {key} must be an object, got {value!r}")
    value = dict(value)
    if "type" in value:  # the legacy spelling of rope_type
        value.setdefault("rope_type", value.pop("type"))
    out = {"rope_theta": value.pop("rope_theta")} if "rope_theta" in value else {}
    if value.get("partial_rotary_factor", 1.0) != 1.0:  # 1.0 (the rotary dims are qk_rope_head_dim) changes nothing
        raise ValueError(f"config.json: {key}.partial_rotary_factor={value['partial_rotary_factor']!r} is not "
                         "supported (only 1.0: the rotary part of a head is qk_rope_head_dim)")
    value.pop("partial_rotary_factor", None)
    if value.get("rope_type", "default") not in ROPE_TYPES:  # named first: its own keys would read as unknown
        raise ValueError(f"config.json: {key}.rope_type={value['rope_type']!r} is not supported; choose one of "
                         f"{ROPE_TYPES}")
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"config.json: {key}.{unknown[0]} is not supported; known keys: {sorted(known)}")
    for name in ("beta_fast", "beta_slow"):  # transformers reads a null or 0 ramp bound as its default
        if name in value and value[name] in (None, 0):
            del value[name]
    for name in ("mscale", "mscale_all_dim"):  # and a 0 mscale as none given
        if value.get(name) == 0 and not isinstance(value[name], bool):
            value[name] = None
    rope_type = value.setdefault("rope_type", "default")
    if rope_type == "yarn":
        if value.get("factor") is None:
            raise ValueError(f"config.json: {key}.factor is required for rope_type='yarn'")
        # transformers: the ramp is measured against max_position_embeddings when no original length is given
        value.setdefault("original_max_position_embeddings", max_position_embeddings)
    try:
        out["rope_scaling"] = RopeScaling(**value)
    except ValueError as err:
        raise ValueError(f"config.json: {key}: {err}") from None
    return out

"""Named model shapes: one function each, so a preset reads as one screen of numbers."""
from __future__ import annotations

from collections.abc import Callable

from .config import ModelConfig


def tiny() -> ModelConfig:
    """For tests: every feature on (zero experts, MTP), runs in milliseconds."""
    return ModelConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        ffn_hidden_size=128, expert_ffn_hidden_size=32, n_routed_experts=8, zero_expert_num=4, moe_topk=3,
        routed_scaling_factor=1.0, max_position_embeddings=512, num_nextn_predict_layers=1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def small() -> ModelConfig:
    """Default training shape for 2 CPU cores: ~26M parameters, 32 FFN + 16 zero experts, top-6 (K_e = 4)."""
    return ModelConfig(
        vocab_size=8192, hidden_size=256, num_layers=4, num_attention_heads=4,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        ffn_hidden_size=768, expert_ffn_hidden_size=128, n_routed_experts=32, zero_expert_num=16, moe_topk=6,
        routed_scaling_factor=2.0, max_position_embeddings=4096, num_nextn_predict_layers=1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def bench() -> ModelConfig:
    """~1B total parameters for benchmarks: d=1024, 6 layers, 64 FFN + 32 zero experts, top-8, expert width 512."""
    return ModelConfig(
        vocab_size=32000, hidden_size=1024, num_layers=6, num_attention_heads=8,
        q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        ffn_hidden_size=4096, expert_ffn_hidden_size=512, n_routed_experts=64, zero_expert_num=32, moe_topk=8,
        routed_scaling_factor=2.0, max_position_embeddings=8192, num_nextn_predict_layers=1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def longcat_flash() -> ModelConfig:
    """The released LongCat-Flash-Chat shape (560B). Build it on the meta device only."""
    return ModelConfig(num_nextn_predict_layers=1, bos_token_id=1, eos_token_id=2, pad_token_id=3)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny, "small": small, "bench": bench, "longcat_flash": longcat_flash,
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()

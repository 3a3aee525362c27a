"""Analytic parameter, KV-cache and FLOP bookkeeping for a ModelConfig, in the official checkpoint's layout.

Every count here follows the tensor list of the released checkpoint (docs/architecture.md §3), so `total` equals the
number of elements in `model.*` + `lm_head.weight` (the `e_score_correction_bias` buffers excluded) and `mtp` the
number in `model.mtp.*`.

Conventions (they are what reproduce the report's 560B / 18.6B / 27B / 31.3B, report §1):
  * active parameters per token = everything a token's forward pass multiplies or reads, except the input
    embedding row lookup and the FFN experts it did not select. The lm_head IS counted, the router and all
    norms are counted, zero experts have no parameters. With `tie_word_embeddings` the one shared [V, H] matrix
    is counted once, as the head.
  * active at 0 FFN experts = all 12 routed slots went to zero experts (the report's 18.6B minimum); at top-k = all
    12 went to real experts (31.3B maximum); at K_e (default 8 = 2/3 of top-k) the report's 27B average.
  * MTP is reported separately and never counted in `total` or the active figures.
  * FLOPs per token = 2 FLOPs per multiply-accumulate over the active *matmul* weights at K_e (norms, biases and
    the embedding lookup excluded; lm_head and router included), plus the attention score/value work of one new
    token attending to `context` cached positions in the absorbed MLA form the decode path uses:
    per attention block 2 * heads * context * (kv_lora_rank + qk_rope_head_dim)  (q . [latent | k_rope])
                      + 2 * heads * context * kv_lora_rank                         (probabilities . latent).
    The absorbed form applies kv_b_proj once per query token (as W_UK on q and W_UV on the output), which the
    matmul term already counts, so nothing is double counted.
  * KV cache per token covers the 2 * num_layers trunk attention blocks: the latent layout (what SGLang/vLLM and
    our decode path store) and the expanded K/V layout (older HF). The MTP block, if served, adds one more block
    (1,152 B latent for the 560B shape) and is excluded here, as it is from the FLOPs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig


@dataclass(frozen=True)
class ParamReport:
    """Parameter counts (elements), cache sizes (bytes per token) and FLOPs per token for one config."""

    num_layers: int
    moe_topk: int
    fewest_ffn_experts: int  # the fewest a token can pick (moe_topk - zero experts), for `active_min`
    most_ffn_experts: int  # the most a token can pick (moe_topk, or every FFN expert), for `active_max`
    ffn_experts_target: float  # K_e used for `active_target` and `flops_per_token`
    context: int  # cached positions each new token attends to, for `attention_flops`
    bytes_per_value: int  # element size of the KV cache (2 = bf16)
    # components (elements)
    mla_block: int  # one attention block incl. q_a/kv_a norms (and biases if attention_bias)
    dense_mlp: int  # one SwiGLU of ffn_hidden_size
    router: int  # classifier [E+Z, H] (+ bias); e_score_correction_bias is a buffer, not counted
    expert: int  # one FFN expert, 3 * H * Fe
    per_layer: int  # one ScMoE layer with all its experts
    embedding: int  # model.embed_tokens [V, H]
    lm_head: int  # [V, H], 0 when tied to the embedding
    # totals (elements)
    total: int  # backbone, MTP excluded
    mtp: int  # model.mtp.*, including its own embedding copy
    active_min: int  # per token, fewest_ffn_experts per layer
    active_target: float  # per token, K_e FFN experts per layer
    active_max: int  # per token, top-k FFN experts per layer
    # decode costs
    kv_cache_latent_bytes_per_token: int  # (kv_lora_rank + qk_rope_head_dim) per attention block
    kv_cache_expanded_bytes_per_token: int  # heads * (qk_head_dim + v_head_dim) per attention block
    attention_flops: float  # per token at `context`, absorbed MLA, all attention blocks
    flops_per_token: float  # 2 * active matmul weights at K_e + attention_flops

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for `--json` output."""
        return dataclasses.asdict(self)


def ffn_experts_per_token(cfg: ModelConfig, given: float | None = None) -> float:
    """K_e, the FFN experts a token uses on average: `given`, checked to be one a token can reach, or by default
    `cfg.default_ffn_expert_target` (8 of 12 for the 560B shape), or the fewest a token can pick where that is
    more."""
    k_e = max(cfg.default_ffn_expert_target, cfg.fewest_ffn_experts) if given is None else float(given)
    if not cfg.fewest_ffn_experts <= k_e <= cfg.most_ffn_experts:  # no zero experts: moe_topk exactly (NaN fails)
        raise ValueError(f"ffn_experts_target (--ffn-experts) must be in [{cfg.fewest_ffn_experts}, "
                         f"{cfg.most_ffn_experts}] (a token picks moe_topk={cfg.moe_topk} experts, at most "
                         f"zero_expert_num={cfg.zero_expert_num} of them zero experts and at most "
                         f"n_routed_experts={cfg.n_routed_experts} FFN experts), got {k_e:g}")
    return k_e


def param_report(cfg: ModelConfig, ffn_experts_target: float | None = None, context: int = 0,
                 bytes_per_value: int = 2) -> ParamReport:
    """Count everything for `cfg`, the average figures at K_e FFN experts a token (`ffn_experts_per_token`)."""
    k_e = ffn_experts_per_token(cfg, ffn_experts_target)
    if not 0 <= context <= cfg.max_position_embeddings:
        raise ValueError(f"context must be 0 to max_position_embeddings={cfg.max_position_embeddings} cached "
                         f"positions, got {context}")
    if bytes_per_value <= 0:
        raise ValueError(f"bytes_per_value must be a positive number of bytes, got {bytes_per_value}")
    embedding = cfg.vocab_size * cfg.hidden_size
    lm_head = 0 if cfg.tie_word_embeddings else embedding
    layer = _layer_params(cfg)
    total = cfg.num_layers * layer + embedding + cfg.hidden_size + lm_head
    attention_flops = _attention_flops(cfg, context)
    return ParamReport(
        num_layers=cfg.num_layers, moe_topk=cfg.moe_topk, fewest_ffn_experts=cfg.fewest_ffn_experts,
        most_ffn_experts=cfg.most_ffn_experts,
        ffn_experts_target=k_e, context=context,
        bytes_per_value=bytes_per_value,
        mla_block=_mla_params(cfg), dense_mlp=_dense_mlp_params(cfg), router=_router_params(cfg),
        expert=_expert_params(cfg), per_layer=layer, embedding=embedding, lm_head=lm_head,
        total=total, mtp=_mtp_params(cfg) if cfg.num_nextn_predict_layers else 0,
        active_min=int(_active_params(cfg, total, cfg.fewest_ffn_experts)),
        active_target=_active_params(cfg, total, k_e),
        active_max=int(_active_params(cfg, total, cfg.most_ffn_experts)),
        kv_cache_latent_bytes_per_token=cfg.num_attention_blocks * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        * bytes_per_value,
        kv_cache_expanded_bytes_per_token=cfg.num_attention_blocks * cfg.num_attention_heads
        * (cfg.qk_head_dim + cfg.v_head_dim) * bytes_per_value,
        attention_flops=attention_flops,
        flops_per_token=2 * _active_matmul_weights(cfg, k_e) + attention_flops,
    )


# ---- components, each the sum of its checkpoint tensors (docs/architecture.md §3.2 / §3.3) ----
def _mla_weights(cfg: ModelConfig) -> int:
    """The five projection matrices of one MLA block: q_a, q_b, kv_a_with_mqa, kv_b, o."""
    h, d = cfg.num_attention_heads, cfg.hidden_size
    return (d * cfg.q_lora_rank                                          # q_a_proj [dq, H]
            + cfg.q_lora_rank * h * cfg.qk_head_dim                      # q_b_proj [nh*(dn+dr), dq]
            + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)              # kv_a_proj_with_mqa [dkv+dr, H]
            + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv_b_proj [nh*(dn+dv), dkv]
            + h * cfg.v_head_dim * d)                                    # o_proj [H, nh*dv]


def _mla_params(cfg: ModelConfig) -> int:
    """Weights + the q_a/kv_a RMSNorms + (attention_bias) biases on q_a_proj, kv_a_proj_with_mqa and o_proj."""
    norms = cfg.q_lora_rank + cfg.kv_lora_rank
    biases = cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.hidden_size
    return _mla_weights(cfg) + norms + (biases if cfg.attention_bias else 0)


def _dense_mlp_params(cfg: ModelConfig) -> int:
    """gate_proj, up_proj [F, H] and down_proj [H, F]."""
    return 3 * cfg.hidden_size * cfg.ffn_hidden_size


def _expert_params(cfg: ModelConfig) -> int:
    """One FFN expert: gate/up [Fe, H], down [H, Fe]. Zero experts have no tensors at all."""
    return 3 * cfg.hidden_size * cfg.expert_ffn_hidden_size


def _router_params(cfg: ModelConfig) -> int:
    """Classifier over all N+Z experts; e_score_correction_bias is a buffer and not a parameter."""
    bias = cfg.n_experts_total if cfg.router_bias else 0
    return cfg.n_experts_total * cfg.hidden_size + bias


def _layer_params(cfg: ModelConfig) -> int:
    """One ScMoE layer: 2 MLA, 2 dense MLPs, 4 RMSNorms [H], the router and N experts."""
    return (2 * _mla_params(cfg) + 2 * _dense_mlp_params(cfg) + 4 * cfg.hidden_size
            + _router_params(cfg) + cfg.n_routed_experts * _expert_params(cfg))


def _mtp_params(cfg: ModelConfig) -> int:
    """Own embedding, enorm, hnorm, eh_proj [H, 2H], one dense decoder layer and a final norm; no head."""
    d = cfg.hidden_size
    return cfg.vocab_size * d + 2 * d + 2 * d * d + d + _mla_params(cfg) + d + _dense_mlp_params(cfg) + d


# ---- per-token views ----
def _active_params(cfg: ModelConfig, total: int, ffn_experts: float) -> float:
    """Total minus the embedding lookup (unless tied to the head) minus every unselected FFN expert."""
    lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    unselected = cfg.num_layers * (cfg.n_routed_experts - ffn_experts) * _expert_params(cfg)
    return total - lookup - unselected


def _active_matmul_weights(cfg: ModelConfig, ffn_experts: float) -> float:
    """Weights a token multiplies by: attention projections, dense MLPs, router, K_e experts, lm_head."""
    per_layer = (2 * _mla_weights(cfg) + 2 * _dense_mlp_params(cfg) + cfg.n_experts_total * cfg.hidden_size
                 + ffn_experts * _expert_params(cfg))
    return cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size


def _attention_flops(cfg: ModelConfig, context: int) -> float:
    """Absorbed-MLA score + value FLOPs of one new token over `context` cached positions, all blocks."""
    per_key = 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * cfg.kv_lora_rank  # per head
    return float(cfg.num_attention_blocks * cfg.num_attention_heads * context * per_key)


# ---- presentation ----
def _human(n: float, unit: str = "") -> str:
    """560661000000 -> '560.66 B' (decimal prefixes, as the report quotes parameter counts)."""
    for scale, prefix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".rstrip()


def format_report(report: ParamReport) -> str:
    """A two-column table: components, totals, active per token, KV cache and FLOPs per token."""
    r = report
    blocks, k = 2 * r.num_layers, r.moe_topk
    rows = [
        (f"MLA block (each of {blocks})", _human(r.mla_block)),
        (f"dense SwiGLU MLP (each of {blocks})", _human(r.dense_mlp)),
        ("router classifier (per layer)", _human(r.router)),
        ("FFN expert (each)", _human(r.expert)),
        ("ScMoE layer incl. all experts", _human(r.per_layer)),
        ("embedding [V, H]", _human(r.embedding)),
        ("lm_head [V, H]", _human(r.lm_head) if r.lm_head else "tied"),
        ("total (backbone, no MTP)", _human(r.total)),
        ("MTP head", _human(r.mtp) if r.mtp else "none"),
        (f"active/token, {r.fewest_ffn_experts} FFN experts", _human(r.active_min)),
        (f"active/token, K_e={r.ffn_experts_target:g} of {k}", _human(r.active_target)),
        (f"active/token, {r.most_ffn_experts} FFN experts", _human(r.active_max)),
        (f"KV cache/token, latent ({r.bytes_per_value} B/value)",
         f"{r.kv_cache_latent_bytes_per_token:,} B"),
        (f"KV cache/token, expanded ({r.bytes_per_value} B/value)",
         f"{r.kv_cache_expanded_bytes_per_token:,} B"),
        (f"attention FLOPs/token at context {r.context}", _human(r.attention_flops, "FLOP")),
        (f"FLOPs/token at K_e, context {r.context}", _human(r.flops_per_token, "FLOP")),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>14}" for name, value in rows)


def info_command(cfg: ModelConfig, *, ffn_experts_target: float | None = None, context: int = 0,
                 bytes_per_value: int = 2, as_json: bool = False) -> str:
    """What `longcat info` prints: the table, or one JSON object with `as_json`."""
    report = param_report(cfg, ffn_experts_target, context, bytes_per_value)
    if as_json:
        return json.dumps(report.to_dict(), sort_keys=True)
    return format_report(report)

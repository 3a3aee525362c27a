"""Theoretical decode cost (report §6.3.2, Table 7): per-layer times, TPOT and $ per million output tokens.

Scenario (the report's, all overridable): EP=128 over H800s, 96 sequences per device, MTP with one draft token
accepted 80% of the time (1.8 tokens per step; Qwen3 is given an equivalent speculative scheme), DeepEP
all-to-all at 40 GB/s (1 GB = 1e9 B) with FP8 dispatch and BF16 combine, FlashMLA at 660 TFLOPS, $2 per
GPU-hour; MLAShape runs data-parallel, Qwen3's GQA runs TP4 (it has 4 KV heads).

How each row is computed (per device, per layer; `tokens` = sequences x (1 + draft tokens) = 96 x 2 = 192,
because the verification forward carries the last accepted token plus the draft):

  dispatch  = tokens x fan-out x hidden x 1 B / bandwidth
  combine   = tokens x fan-out x hidden x 2 B / bandwidth
      fan-out = the FFN experts a token's hidden state travels to: top-8 for DeepSeek-V3 and Qwen3, K_e = 8 for
      LongCat-Flash (zero experts are computed where the token lives and never travel; shared experts are
      local). One copy per (token, expert) pair as in DeepEP's low-latency kernels: no node-level dedup, no
      discount for experts on the sending device, FP8 scale factors not counted (they would add 4 B per 128
      values, +3.1%). This reproduces 235.9/471.9 µs, 275.3/550.5 µs and 157.3/314.6 µs (report: 236/472,
      275/551, 157/315).
  MoE       = roofline of tokens x (fan-out + shared) x 2 x 3·H·Fe FLOPs at the FP8 GEMM rate and the FP8 weight
      bytes of the experts held by the device (ceil(N / EP) + shared) at HBM bandwidth. The report does not say
      which GEMM rate it used; 1979 TFLOPS, the H800's dense FP8 peak, gives 76.9 / 29.3 / 58.6 µs
      (report: 77 / 29 / 60). At EP=128 every model is compute-bound, so a smaller EP only adds time.
  attention = max(core FLOPs / 660 TFLOPS, KV-cache bytes / HBM) + projection FLOPs / 660 TFLOPS, for ONE
      attention block (LongCat's row is its first MLAShape, the one SBO cannot hide). Core FLOPs follow FlashMLA's
      convention, 2·heads·S·(2·d_kv + d_rope) per query token for absorbed MLAShape and 2·heads·S·2·d_head for GQA;
      projections are 2 FLOPs per weight per token (q_a, q_b, kv_a, the absorbed kv_b, o). Under TP the group
      serves TP x 96 sequences and each device holds ceil(kv_heads / TP) cache heads.

What cannot be reconstructed exactly: the attention row. The report states neither the context length nor
its FLOP convention, and its LongCat block (264 µs) is 0.56x DeepSeek-V3's layer (471 µs). A LongCat MLAShape block
has exactly half the heads, about half the projection weights and the same 576-value latent, so at one shared
context the FLOP conventions (core only, or with projections at 660 TFLOPS or at the GEMM rate) give a ratio of
0.49-0.50 and adding the KV-cache read time gives about 0.64; none gives 0.56, and the best shared context still
misses one of the two by at least 5.7%. We use context 5000 (the average context of the report's measured
LongCat rows, Table 6) and the convention above: 514 µs (+9%), 335 µs (+7%, Qwen3, KV-read-bound at 3.35 TB/s,
an H800 figure the report does not state) and 255 µs (-3%). The error reaches LongCat's TPOT only through its
exposed first MLAShape (-0.14 ms) and DeepSeek-V3's TPOT only through its three dense layers; TBO hides attention
everywhere else.

Overlap:
  SBO (LongCat, report Fig. 9): layer = attention block + max(dispatch, dense FFN + next block's QKV projection)
      + MoE + max(combine, next block's core attention and output projection + dense FFN). At the report's
      numbers communication dominates both windows, which gives its 264+236+60+472 = 1032 µs.
  TBO (DeepSeek-V3, Qwen3): the report gives no formula; what reproduces its TPOTs is
      layer = max(attention, dispatch + combine) + MoE — the two micro-batches' all-to-all is the critical path,
      attention hides under it, the expert GEMM does not. A dense layer (DeepSeek-V3's first 3) exposes
      attention + its dense FFN. This gives 30.1 ms and 26.2 ms (report: 30, 26.2).
  TPOT = sum of layer times / expected tokens per step (1 + a + a² + ... over the draft tokens; 1.8 here).
  $ per million output tokens = $/GPU-hour x TPOT / sequences per device.
Not modelled (the report does not either): the MTP draft forward, the lm_head, sampling, kernel launch gaps.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig
from ..presets import longcat_flash
from . import params

OVERLAPS = ("SBO", "TBO")


# ---- attention shapes ----
@dataclass(frozen=True)
class MLAShape:
    """Multi-head latent attention in its absorbed decode form: one cache head of kv_lora_rank + rope values."""

    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def qkv_weights(self, hidden: int) -> int:
        """q_a, q_b, kv_a_with_mqa and W_UK (kv_b's key half, absorbed into the query)."""
        q_a = hidden * self.q_lora_rank
        q_b = self.q_lora_rank * self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        kv_a = hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
        return q_a + q_b + kv_a + self.heads * self.qk_nope_head_dim * self.kv_lora_rank

    def out_weights(self, hidden: int) -> int:
        """W_UV (kv_b's value half, applied to the attention output) and o_proj."""
        return self.heads * self.v_head_dim * (self.kv_lora_rank + hidden)

    def core_flops_per_key(self) -> int:
        """FlashMLA's count per query token and cached position: QK over 576 dims, PV over 512, all heads."""
        return self.heads * 2 * (2 * self.kv_lora_rank + self.qk_rope_head_dim)

    @property
    def cache_heads(self) -> int:
        """The latent is shared by all heads (MQA-like), so TP cannot split it."""
        return 1

    @property
    def cache_values_per_head(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class GQA:
    """Grouped-query attention: `kv_heads` cached K and V heads shared by `heads` query heads."""

    heads: int
    kv_heads: int
    head_dim: int

    def qkv_weights(self, hidden: int) -> int:
        return hidden * (self.heads + 2 * self.kv_heads) * self.head_dim

    def out_weights(self, hidden: int) -> int:
        return self.heads * self.head_dim * hidden

    def core_flops_per_key(self) -> int:
        """QK and PV, each 2 * head_dim FLOPs per query head and cached position."""
        return self.heads * 2 * 2 * self.head_dim

    @property
    def cache_heads(self) -> int:
        return self.kv_heads

    @property
    def cache_values_per_head(self) -> int:
        return 2 * self.head_dim  # K and V


@dataclass(frozen=True)
class DecodeShape:
    """What the cost model needs of a model: layer counts, widths, routing fan-out and overlap strategy."""

    name: str
    num_layers: int
    dense_layers: int  # leading layers with a dense FFN and no all-to-all (DeepSeek-V3: first_k_dense_replace)
    hidden_size: int
    attention: MLAShape | GQA
    attention_tp: int  # 1 = data-parallel attention
    attention_blocks_per_layer: int  # 2 for an ScMoE layer
    dense_ffn_hidden_size: int  # ScMoE's mlps (two per layer) or the dense layers' FFN; 0 = none
    dense_ffn_tp: int
    n_routed_experts: int  # FFN experts; zero experts excluded
    ffn_experts_per_token: float  # fan-out of dispatch/combine: top-k, or K_e with zero experts
    shared_experts: int
    expert_ffn_hidden_size: int
    overlap: str  # "SBO" or "TBO"
    native_mtp: bool
    max_context: int  # the longest context the model is published to serve

    def __post_init__(self) -> None:
        if self.overlap not in OVERLAPS:
            raise ValueError(f"DecodeShape.overlap must be one of {OVERLAPS}, got {self.overlap!r}")
        if self.overlap == "SBO" and (self.attention_blocks_per_layer != 2 or not self.dense_ffn_hidden_size):
            raise ValueError("DecodeShape: SBO needs ScMoE layers (2 attention blocks and dense FFNs per layer)")
        if not 0 <= self.dense_layers <= self.num_layers:
            raise ValueError(f"DecodeShape.dense_layers must be in [0, num_layers], got {self.dense_layers}")


def longcat_decode_shape(cfg: ModelConfig, name: str = "LongCat-Flash",
                         ffn_experts_per_token: float | None = None) -> DecodeShape:
    """Any LongCat config as a DecodeShape; the fan-out is K_e (zero experts never leave the device), as `longcat
    info` counts it."""
    k_e = params.ffn_experts_per_token(cfg, ffn_experts_per_token)
    return DecodeShape(
        name=name, num_layers=cfg.num_layers, dense_layers=0, hidden_size=cfg.hidden_size,
        attention=MLAShape(cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                      cfg.qk_rope_head_dim, cfg.v_head_dim),
        attention_tp=1, attention_blocks_per_layer=2, dense_ffn_hidden_size=cfg.ffn_hidden_size,
        dense_ffn_tp=2,  # report §6.1.1: "TP2 or TP4 instead of TP8"
        n_routed_experts=cfg.n_routed_experts, ffn_experts_per_token=k_e, shared_experts=0,
        expert_ffn_hidden_size=cfg.expert_ffn_hidden_size, overlap="SBO",
        native_mtp=cfg.num_nextn_predict_layers > 0, max_context=cfg.max_position_embeddings,
    )


# Public config.json shapes: deepseek-ai/DeepSeek-V3 and Qwen/Qwen3-235B-A22B.
DEEPSEEK_V3 = DecodeShape(
    name="DeepSeek-V3", num_layers=61, dense_layers=3, hidden_size=7168,
    attention=MLAShape(heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128),
    attention_tp=1, attention_blocks_per_layer=1, dense_ffn_hidden_size=18432, dense_ffn_tp=1,
    n_routed_experts=256, ffn_experts_per_token=8, shared_experts=1, expert_ffn_hidden_size=2048,
    overlap="TBO", native_mtp=True, max_context=163840,
)
QWEN3_235B_A22B = DecodeShape(
    name="Qwen3-235B-A22B", num_layers=94, dense_layers=0, hidden_size=4096,
    attention=GQA(heads=64, kv_heads=4, head_dim=128),
    attention_tp=4, attention_blocks_per_layer=1, dense_ffn_hidden_size=0, dense_ffn_tp=1,
    n_routed_experts=128, ffn_experts_per_token=8, shared_experts=0, expert_ffn_hidden_size=1536,
    overlap="TBO", native_mtp=False, max_context=131072,  # 40960 in config.json; 131072 with YaRN (model card)
)
LONGCAT_FLASH = longcat_decode_shape(longcat_flash())
MODELS: dict[str, DecodeShape] = {m.name: m for m in (DEEPSEEK_V3, QWEN3_235B_A22B, LONGCAT_FLASH)}

# Report Table 7 (µs per layer, ms, $ per million output tokens), printed beside our figures at its setting:
# ep, sequences per device, MTP acceptance, all-to-all GB/s, and the context our attention row is reconstructed at
REPORT_SETTING = (128, 96, 0.8, 40.0, 5000)
TABLE7: dict[str, dict[str, float]] = {
    "DeepSeek-V3": dict(attention_us=471, dispatch_us=275, moe_us=77, combine_us=551, tpot_ms=30,
                        usd_per_m_tokens=0.17),
    "Qwen3-235B-A22B": dict(attention_us=314, dispatch_us=157, moe_us=29, combine_us=315, tpot_ms=26.2,
                            usd_per_m_tokens=0.15),
    "LongCat-Flash": dict(attention_us=264, dispatch_us=236, moe_us=60, combine_us=472, tpot_ms=16,
                          usd_per_m_tokens=0.09),
}


# ---- scenario ----
@dataclass(frozen=True)
class Scenario:
    """Deployment and hardware assumptions; defaults are the report's (H800, §6.3.2)."""

    ep: int = 128
    batch_per_device: int = 96  # sequences
    mtp_acceptance: float = 0.8  # per draft token
    draft_tokens: int = 1
    context: int = 5000  # cached positions per sequence (not stated for Table 7; Table 6's average)
    a2a_bandwidth_gbps: float = 40.0  # DeepEP, GB/s per device
    dispatch_bytes: float = 1.0  # FP8
    combine_bytes: float = 2.0  # BF16
    attention_tflops: float = 660.0  # FlashMLA on H800
    gemm_tflops: float = 1979.0  # H800 dense FP8 peak (inferred, see module docstring)
    hbm_tbps: float = 3.35  # H800 SXM5
    weight_bytes: float = 1.0  # FP8 expert and dense-FFN weights
    kv_bytes: float = 2.0  # BF16 cache
    usd_per_gpu_hour: float = 2.0

    def __post_init__(self) -> None:
        for name in ("ep", "batch_per_device", "a2a_bandwidth_gbps", "dispatch_bytes", "combine_bytes",
                     "attention_tflops", "gemm_tflops", "hbm_tbps", "weight_bytes", "kv_bytes",
                     "usd_per_gpu_hour"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"Scenario.{name} must be > 0 and finite, got {getattr(self, name)!r}")
        if not 0 <= self.mtp_acceptance <= 1:
            raise ValueError(f"Scenario.mtp_acceptance must be in [0, 1], got {self.mtp_acceptance!r}")
        if self.draft_tokens < 0 or self.context < 0:
            raise ValueError("Scenario.draft_tokens and Scenario.context must be >= 0")

    def is_the_reports(self) -> bool:
        """Whether this is Table 7's setting, the one its figures can be set beside."""
        return (self.ep, self.batch_per_device, self.mtp_acceptance, self.a2a_bandwidth_gbps,
                self.context) == REPORT_SETTING

    @property
    def tokens_per_device(self) -> int:
        """Tokens in one forward: each sequence's last accepted token plus its draft tokens."""
        return self.batch_per_device * (1 + self.draft_tokens)

    @property
    def accepted_per_step(self) -> float:
        """Expected tokens emitted per forward with chained acceptance: 1 + a + a^2 + ... (1.8 for one draft)."""
        return sum(self.mtp_acceptance ** i for i in range(self.draft_tokens + 1))


# ---- per-layer component times (µs, per device) ----
@dataclass(frozen=True)
class LayerTimes:
    attention_qkv_us: float  # projections up to the attention kernel's inputs
    attention_core_out_us: float  # attention kernel + output projection
    dispatch_us: float
    moe_us: float
    combine_us: float
    dense_ffn_us: float  # one dense FFN; 0 when the model has none

    @property
    def attention_us(self) -> float:
        """One attention block."""
        return self.attention_qkv_us + self.attention_core_out_us


def _roofline_us(flops: float, tflops: float, nbytes: float, tbps: float) -> float:
    """Time of an op bounded by compute or by memory traffic, whichever is slower."""
    return max(flops / (tflops * 1e12), nbytes / (tbps * 1e12)) * 1e6


def _attention_us(shape: DecodeShape, sc: Scenario) -> tuple[float, float]:
    """(QKV projections, core attention + output projection) of one block, per device."""
    att, tokens, rate = shape.attention, sc.tokens_per_device, sc.attention_tflops * 1e12
    # Under TP the group serves tp x batch sequences and each device runs 1/tp of the heads: the per-device
    # FLOPs equal one device's batch with all heads; the cache heads split only while there are enough.
    core_flops = tokens * att.core_flops_per_key() * sc.context
    cache_bytes = (shape.attention_tp * sc.batch_per_device * sc.context
                   * math.ceil(att.cache_heads / shape.attention_tp) * att.cache_values_per_head * sc.kv_bytes)
    core = max(core_flops / rate, cache_bytes / (sc.hbm_tbps * 1e12)) * 1e6
    qkv = 2 * tokens * att.qkv_weights(shape.hidden_size) / rate * 1e6
    out = 2 * tokens * att.out_weights(shape.hidden_size) / rate * 1e6
    return qkv, core + out


def _a2a_us(shape: DecodeShape, sc: Scenario, bytes_per_value: float) -> float:
    """All-to-all volume: one hidden vector per (token, FFN expert) pair, at the DeepEP bandwidth; none on one
    device (ep=1), where every expert is local."""
    if sc.ep == 1:
        return 0.0
    volume = sc.tokens_per_device * shape.ffn_experts_per_token * shape.hidden_size * bytes_per_value
    return volume / (sc.a2a_bandwidth_gbps * 1e9) * 1e6


def _moe_us(shape: DecodeShape, sc: Scenario) -> float:
    """Expert GEMMs of the tokens a device receives (balanced routing) plus its shared experts."""
    expert = 3 * shape.hidden_size * shape.expert_ffn_hidden_size
    flops = sc.tokens_per_device * (shape.ffn_experts_per_token + shape.shared_experts) * 2 * expert
    resident = math.ceil(shape.n_routed_experts / sc.ep) + shape.shared_experts
    return _roofline_us(flops, sc.gemm_tflops, resident * expert * sc.weight_bytes, sc.hbm_tbps)


def _dense_ffn_us(shape: DecodeShape, sc: Scenario) -> float:
    """One dense SwiGLU; TP splits its weights, the per-device FLOPs stay those of the device's tokens."""
    weights = 3 * shape.hidden_size * shape.dense_ffn_hidden_size
    flops = sc.tokens_per_device * 2 * weights
    return _roofline_us(flops, sc.gemm_tflops, weights / shape.dense_ffn_tp * sc.weight_bytes, sc.hbm_tbps)


def layer_times(shape: DecodeShape, sc: Scenario) -> LayerTimes:
    """Component times of one layer of `shape` under `sc`."""
    qkv, core_out = _attention_us(shape, sc)
    return LayerTimes(attention_qkv_us=qkv, attention_core_out_us=core_out,
                      dispatch_us=_a2a_us(shape, sc, sc.dispatch_bytes), moe_us=_moe_us(shape, sc),
                      combine_us=_a2a_us(shape, sc, sc.combine_bytes), dense_ffn_us=_dense_ffn_us(shape, sc))


def moe_layer_us(shape: DecodeShape, t: LayerTimes) -> float:
    """Exposed time of one MoE layer under the shape's overlap strategy (see module docstring)."""
    if shape.overlap == "SBO":
        stage2 = max(t.dispatch_us, t.dense_ffn_us + t.attention_qkv_us)
        stage4 = max(t.combine_us, t.attention_core_out_us + t.dense_ffn_us)
        return t.attention_us + stage2 + t.moe_us + stage4
    attention = shape.attention_blocks_per_layer * t.attention_us
    return max(attention, t.dispatch_us + t.combine_us) + t.moe_us


def decode_row(shape: DecodeShape, sc: Scenario) -> dict[str, Any]:
    """One column of Table 7 for `shape`: component times, layer time, TPOT and price."""
    t = layer_times(shape, sc)
    dense_layer_us = shape.attention_blocks_per_layer * t.attention_us + t.dense_ffn_us
    step_us = ((shape.num_layers - shape.dense_layers) * moe_layer_us(shape, t)
               + shape.dense_layers * dense_layer_us)
    tpot_s = step_us / sc.accepted_per_step * 1e-6
    return {
        "model": shape.name, "mtp": "w/" if shape.native_mtp else "w/o", "layers": shape.num_layers,
        "batch_per_device": sc.batch_per_device, "context": sc.context, "overlap": shape.overlap,
        "attention_us": t.attention_us, "dispatch_us": t.dispatch_us, "moe_us": t.moe_us,
        "combine_us": t.combine_us, "layer_us": moe_layer_us(shape, t), "tpot_ms": tpot_s * 1e3,
        "usd_per_m_tokens": sc.usd_per_gpu_hour / 3600 * tpot_s / sc.batch_per_device * 1e6,
        "report": TABLE7.get(shape.name) if sc.is_the_reports() else None,
    }


def cost_table(models: Sequence[str | DecodeShape] = tuple(MODELS), ep: int = 128, batch_per_device: int = 96,
               mtp_acceptance: float = 0.8, a2a_bandwidth_gbps: float = 40.0, *, context: int = 5000,
               draft_tokens: int = 1, usd_per_gpu_hour: float = 2.0, **hardware: float) -> list[dict[str, Any]]:
    """Table 7 rows for `models` (names from MODELS or DecodeShapes). `hardware` takes any other Scenario field
    (attention_tflops, gemm_tflops, hbm_tbps, dispatch_bytes, combine_bytes, weight_bytes, kv_bytes)."""
    sc = Scenario(ep=ep, batch_per_device=batch_per_device, mtp_acceptance=mtp_acceptance,
                  a2a_bandwidth_gbps=a2a_bandwidth_gbps, context=context, draft_tokens=draft_tokens,
                  usd_per_gpu_hour=usd_per_gpu_hour, **hardware)
    shapes = [_resolve(m) for m in models]
    if repeated := sorted({s.name for s in shapes if [t.name for t in shapes].count(s.name) > 1}):
        raise ValueError(f"models: {', '.join(repeated)} given more than once")
    if too_short := [f"{s.name} {s.max_context}" for s in shapes if context > s.max_context]:
        raise ValueError(f"context {context} is longer than a model serves (positions: {', '.join(too_short)})")
    return [_finite_row(shape, sc) for shape in shapes]


def _finite_row(shape: DecodeShape, sc: Scenario) -> dict[str, Any]:
    """`decode_row`, refused where a setting far from any hardware (a bandwidth of 1e-320 GB/s, a batch of 10^400)
    overflows the floats."""
    beyond = (f"{shape.name}: the figures at this setting are beyond floating-point range; give values nearer real "
              "hardware")
    try:
        row = decode_row(shape, sc)
    except OverflowError:
        raise ValueError(beyond) from None
    if bad := [key for key, value in row.items() if isinstance(value, float) and not math.isfinite(value)]:
        raise ValueError(f"{beyond} ({bad[0]} is {row[bad[0]]})")
    return row


def _resolve(model: str | DecodeShape) -> DecodeShape:
    if isinstance(model, DecodeShape):
        return model
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)} or pass a DecodeShape")
    return MODELS[model]


# ---- presentation ----
_ROWS = (  # (label, key, format)
    ("MTP", "mtp", "{}"), ("layers", "layers", "{}"), ("batch per device", "batch_per_device", "{}"),
    ("attention (one block)", "attention_us", "{:.0f} us"), ("all-to-all dispatch", "dispatch_us", "{:.1f} us"),
    ("MoE", "moe_us", "{:.1f} us"), ("all-to-all combine", "combine_us", "{:.1f} us"),
    ("overlap strategy", "overlap", "{}"), ("time per MoE layer", "layer_us", "{:.0f} us"),
    ("TPOT", "tpot_ms", "{:.2f} ms"), ("$ / 1M output tokens", "usd_per_m_tokens", "{:.3f}"),
)
FOOTNOTE = (
    "(...) = report Table 7, shown at its setting only (EP128, 96 seq/device, 80% MTP acceptance, 40 GB/s,\n"
    "and our context 5000).\n"
    "Dispatch, combine, MoE, TPOT and $ are reconstructed; the attention row is not: the report gives neither\n"
    "context length nor FLOP convention,\n"
    "and no shared context reproduces both DeepSeek-V3's 471 us and LongCat's 264 us (ratio 0.56; half the heads\n"
    "gives 0.50). Ours: context {context}, FlashMLA FLOPs + projections at 660 TFLOPS, KV reads at 3.35 TB/s,\n"
    "H800 FP8 GEMMs at 1979 TFLOPS; TBO = max(attention, dispatch + combine) + MoE. See analysis/cost_model.py."
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """Our value, followed by the report's in parentheses where Table 7 has one."""
    ours = fmt.format(row[key])
    report = (row.get("report") or {}).get(key)
    return ours if report is None else f"{ours} ({report:g})"


def format_cost_table(rows: list[dict[str, Any]]) -> str:
    """Table 7 layout: one column per model, ours with the report's figure beside it, then the caveat."""
    header = [""] + [r["model"] for r in rows]
    body = [[label] + [_cell(r, key, fmt) for r in rows] for label, key, fmt in _ROWS]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [header] + body]
    return "\n".join(lines + ["", FOOTNOTE.format(context=rows[0]["context"])])


def cost_command(models: Sequence[str] = tuple(MODELS), *, ep: int = 128, batch_per_device: int = 96,
                 mtp_acceptance: float = 0.8, a2a_bandwidth_gbps: float = 40.0, context: int = 5000,
                 as_json: bool = False) -> str:
    """What `longcat cost` prints: the table, or the rows as one JSON list with `as_json`."""
    rows = cost_table(models, ep, batch_per_device, mtp_acceptance, a2a_bandwidth_gbps, context=context)
    return json.dumps(rows) if as_json else format_cost_table(rows)

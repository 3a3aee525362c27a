"""Weight quantization by module swap, with layer-wise mixed precision (report §6.2.3).

Formats:
  int8, fp8  (DeepSeek-V3 / LongCat FP8 style) a weight (O, I) is cut into 128x128 blocks; each block stores its
             values as int8 (scale = amax / 127) or float8_e4m3fn (scale = amax / 448) and one fp32 scale, so an
             outlier spoils only its own block.
  int4       (llama.cpp Q4_1 style) each row is cut into groups of GROUP input values (32 where I is not a
             multiple of GROUP); a group stores 4-bit codes q in 0..15, two per byte, and a bf16 scale and minimum,
             w = scale * q + min. The range is chosen per group by a small search (shrinking [min, max], a least-
             squares refit of scale and min each time) for the least squared error. 0.5625 bytes per weight.
  int4-mixed int4, with the units whose int4 outputs are furthest from the exact ones kept at int8.
Stacked expert weights (E, O, I) are quantized per expert. Activations stay in the model dtype, except in the
int8 and int4 decode kernels, which round them to int8 per block / group (kernels.py).

Which modules: every nn.Linear and every expert stack, except the router (fp32 by design, tiny) and `kv_b_proj`
(the absorbed attention reads its weight directly; it is small). Mixed precision: for int8/fp8/int4 (`choose_kept`),
calibration text runs through the model once; the units with the largest input activation amplitude and the
units with the largest block-quantization error are kept in the model dtype, the report's two criteria. For int4-mixed
(`choose_sensitive`), each unit's relative output error under int4 is measured on its calibration inputs (without
calibration text: its relative weight error), and the most sensitive units are kept at int8.

Shapes: O out features, I in features, E experts, nO = ceil(O/128), nI = ceil(I/128), nG = I / group.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts
from . import decode_ops, kernels
from .experts import HitExperts, PlainHitExperts
from .swap import swap_modules

log = logging.getLogger(__name__)

BLOCK = kernels.BLOCK
GROUP = 64  # int4 values per (scale, min) pair
BLOCK_FORMATS = {"int8": (torch.int8, 127.0), "fp8": (getattr(torch, "float8_e4m3fn", None), 448.0)}
FORMATS = (*BLOCK_FORMATS, "int4")
MIXED = {"int4-mixed": ("int4", "int8")}  # name -> (format, format of the most sensitive units)
CHOICES = (*FORMATS, *MIXED)  # what --quantize accepts
KEEP_SENSITIVE = 0.1  # int4-mixed: the fraction of units (most sensitive first) kept at int8
CLIP_SEARCH = (1.0, 0.95, 0.9, 0.85)  # int4: [min, max] shrink factors tried per group (docs/quantization.md)
NEVER = ("router.", "kv_b_proj")  # name fragments of modules that are never quantized


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if fmt in BLOCK_FORMATS and BLOCK_FORMATS[fmt][0] is None:
        raise ValueError(f"this torch ({torch.__version__}) has no float8_e4m3fn")
    return fmt


def parse_quantize(name: str) -> tuple[str, str | None]:
    """A --quantize value -> (format, format of the units kept by sensitivity, or None)."""
    if name in MIXED:
        return MIXED[name]
    if name not in FORMATS:
        raise ValueError(f"quantize must be one of {', '.join(CHOICES)}, got {name!r}")
    return check_format(name), None


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """(..., O, I) -> zero-padded (..., nO, 128, nI, 128) fp32 view of the blocks."""
    *lead, O, I = w.shape
    padded = F.pad(w.float(), (0, -I % BLOCK, 0, -O % BLOCK))
    return padded.view(*lead, padded.shape[-2] // BLOCK, BLOCK, padded.shape[-1] // BLOCK, BLOCK)


def quantize_blockwise(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., O, I) -> values (..., O, I) in the format's dtype, scales (..., nO, nI) fp32."""
    check_format(fmt)
    dtype, qmax = BLOCK_FORMATS[fmt]
    blocks = _blocks(w)  # (..., nO, 128, nI, 128)
    scales = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / qmax  # (..., nO, nI)
    scaled = blocks / scales[..., :, None, :, None]
    values = scaled.round().clamp(-qmax, qmax) if dtype == torch.int8 else scaled
    O, I = w.shape[-2:]
    values = values.flatten(-4, -3).flatten(-2, -1)[..., :O, :I]  # back to (..., O, I)
    return values.to(dtype).contiguous(), scales


dequantize_blockwise = kernels.dequantize  # the inverse of quantize_blockwise, up to rounding


def group_size(in_features: int) -> int | None:
    """The int4 group for rows of this length: GROUP, or 32, whichever divides it; None if neither does."""
    return next((g for g in (GROUP, 32) if in_features % g == 0), None)


def _codes(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Groups w (N, G) rounded to 16 levels on the range [lo, hi] (N,) -> codes (N, G) fp32 in 0..15."""
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    return (w - lo[:, None]).div_(scale[:, None]).round_().clamp_(0, 15)


def _refit(w: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares scale and min for codes q of groups w (N, G) -> scale, min (N,) fp32 and the squared error
    (N,) of that fit, in closed form from the sums."""
    n = w.shape[-1]
    qs, ws = q.sum(-1), w.sum(-1)
    var = (q * q).sum(-1) - qs * qs / n
    cov = (q * w).sum(-1) - qs * ws / n
    spread = (w * w).sum(-1) - ws * ws / n
    scale = torch.where(var > 0, cov / var.clamp(min=1e-12), torch.zeros_like(var))
    return scale, (ws - scale * qs) / n, spread - scale * cov


def quantize_groupwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (..., O, I) -> packed (..., O, I/2) uint8, scales and mins (..., O, nG) bf16, with w ~ scale * q + min.

    Per group, each range [f * min, f * max] of CLIP_SEARCH is rounded to codes and refit by least squares; the
    factor with the least squared error wins; its codes are refit once more with the bf16-rounded scale and min."""
    *lead, O, I = w.shape
    group = group_size(I)
    if group is None or I % group or group % 32:
        raise ValueError(f"int4 needs in_features a multiple of 32 and of the group; got {I} (group {group})")
    rows = w.detach().reshape(-1, I)
    packed, scales, mins = [], [], []
    for part in rows.split(max(1, 2**22 // I)):  # ~16 MB of fp32 at a time
        g = part.float().reshape(-1, group)  # (N, G)
        lo, hi = g.amin(-1), g.amax(-1)
        errors = torch.stack([_refit(g, _codes(g, lo * f, hi * f))[2] for f in CLIP_SEARCH])  # (F, N)
        f = torch.tensor(CLIP_SEARCH, device=g.device)[errors.argmin(0)]  # (N,) the best factor per group
        q = _codes(g, lo * f, hi * f)
        scale = _refit(g, q)[0].bfloat16()
        low = ((g.sum(-1) - scale.float() * q.sum(-1)) / group).bfloat16()  # the best min for the rounded scale
        packed.append(kernels.pack_int4(q.view(-1, I)))
        scales.append(scale.view(-1, I // group))
        mins.append(low.view(-1, I // group))
    return (torch.cat(packed).view(*lead, O, I // 2), torch.cat(scales).view(*lead, O, I // group),
            torch.cat(mins).view(*lead, O, I // group))


dequantize_groupwise = kernels.group_dequantize  # the inverse of quantize_groupwise, up to rounding

KEYS = {"int8": ("values", "scales"), "fp8": ("values", "scales"), "int4": ("packed", "scales", "mins")}


def quantize_weight(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """w (..., O, I) -> the format's tensors by name (KEYS[fmt])."""
    parts = quantize_groupwise(w) if fmt == "int4" else quantize_blockwise(w, fmt)
    return dict(zip(KEYS[fmt], parts))


def dequantize_weight(parts: dict[str, torch.Tensor], fmt: str, dtype: torch.dtype) -> torch.Tensor:
    args = [parts[k] for k in KEYS[fmt]]
    return dequantize_groupwise(*args, dtype) if fmt == "int4" else dequantize_blockwise(*args, dtype)


def quant_linear(x: torch.Tensor, parts: dict[str, torch.Tensor], fmt: str,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., I) -> (..., O) through a quantized weight."""
    args = [parts[k] for k in KEYS[fmt]]
    return kernels.group_linear(x, *args, bias) if fmt == "int4" else kernels.block_linear(x, *args, bias)


def relative_error(w: torch.Tensor, fmt: str) -> float:
    """||W - deq(q(W))|| / ||W||: the measured quantization error of one weight."""
    restored = dequantize_weight(quantize_weight(w, fmt), fmt, torch.float32)
    return float((w.float() - restored).norm() / w.float().norm().clamp(min=1e-12))


def storable(model: nn.Module, fmt: str) -> dict[str, nn.Module]:
    """The `candidates` that `fmt` can store: for int4, those whose rows it can group (`int4_ready`)."""
    return {n: m for n, m in candidates(model).items() if fmt != "int4" or int4_ready(m)}


def int4_ready(unit: nn.Module) -> bool:
    """Whether every weight of a unit has rows int4 can group (in_features a multiple of 32)."""
    return all(group_size(w.shape[-1]) for w in unit_weights(unit))


class QuantizedStorage(nn.Module):
    """A module whose buffers are a weight format's tensors (codes, scales, mins). A cast of the model (`.to(dtype)`,
    `.half()`, ...) leaves their dtypes as the format stores them and only moves them between devices: cast to bf16,
    fp8 codes and fp32 scales would become tensors the kernels refuse, and the scales would lose precision."""

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedStorage:
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


class QuantLinear(QuantizedStorage):
    """nn.Linear with quantized weight storage; `.weight` gives the dequantized matrix for readers."""

    def __init__(self, linear: nn.Linear, fmt: str) -> None:
        super().__init__()
        for key, t in quantize_weight(linear.weight.data, fmt).items():
            self.register_buffer(key, t)  # values (O, I), scales (nO, nI) | packed (O, I/2), scales, mins (O, nG)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        self.out_dtype, self.fmt = linear.weight.dtype, fmt
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        super()._apply(fn, recurse)
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype  # `.weight` in the model's dtype after a cast
        return self

    def parts(self) -> dict[str, torch.Tensor]:
        return {k: self._buffers[k] for k in KEYS[self.fmt]}  # not getattr: nn.Module's is slow, on every call

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_weight(self.parts(), self.fmt, self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.parts(), self.fmt, self.bias)

    def kernel_weight(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """The weight as the kernels take it (kernels.linear_weights); None with a bias, which they do not add.
        `dtype` (the activations') matters only to plain weights, which must match it (fused.py)."""
        return None if self.bias is not None else list(self.parts().values())


class QuantExperts(QuantizedStorage, HitExperts):
    """Stacked experts with quantized storage. Every hit expert runs in one kernel call per projection: the GEMV
    kernel for up to kernels.MAX_KERNEL_ROWS (int4: MAX_INT4_KERNEL_ROWS) rows per hit expert (decode, concurrent
    streams), the AMX tile GEMM for more in bf16; otherwise (fp32 prefill, no AMX) expert by expert, each weight
    dequantized in one compiled pass just before its GEMM."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, fmt: str) -> None:
        super().__init__()
        for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            for key, t in quantize_weight(w, fmt).items():
                self.register_buffer(f"{name}_{key}", t)  # (E, ...) the format's tensors, per expert
        self.fmt = fmt

    def parts(self, name: str, e: int | None = None) -> dict[str, torch.Tensor]:
        stacked = {k: getattr(self, f"{name}_{k}") for k in KEYS[self.fmt]}
        return stacked if e is None else {k: t[e] for k, t in stacked.items()}

    def project(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        return quant_linear(x, self.parts(name, e), self.fmt)

    def stacked(self, name: str) -> list[torch.Tensor]:
        return list(self.parts(name).values())

    def dequantized_project(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        """project through expert e's weight dequantized now, in x's dtype: for prefill-sized batches, whose rows
        then all take the same arithmetic, and whose fp32 copy of one expert stays in cache (dequantizing every hit
        expert at once wrote them all to memory: bench preset, int4, a 256-token prefill on a 2-core AVX2 CPU, 83
        tok/s against 101 this way)."""
        return F.linear(x, dequantize_weight(self.parts(name, e), self.fmt, x.dtype))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        fused = kernels.group_experts if self.fmt == "int4" else kernels.block_experts
        out = None
        if kernels.experts_kernel(x, counts, self.stacked("gate_up_proj")[0]):
            hidden = decode_ops.swiglu(fused(x, counts, *self.parts("gate_up_proj").values()))  # (R, F)
            out = fused(hidden, counts, *self.parts("down_proj").values())  # rows past sum(counts): 0
        # None: the tiles do not take F (expert_ffn_hidden_size not a multiple of 32) where they took D
        return self.each_hit(x, counts, self.dequantized_project) if out is None else out


# ---- choosing and swapping ----

def candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Quantizable units by module name: Linears (not router, not kv_b_proj, not a tied head) and expert stacks."""
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    out = {}
    for name, module in model.named_modules():
        if any(fragment in name for fragment in NEVER) or (tied and name == "lm_head"):
            continue
        if isinstance(module, (nn.Linear, Experts, PlainHitExperts)):
            out[name] = module
    return out


def unit_weights(module: nn.Module) -> list[torch.Tensor]:
    return [module.weight] if isinstance(module, nn.Linear) else [module.gate_up_proj, module.down_proj]


@dataclass
class MixedPrecision:
    """Calibration evidence per unit and the units kept in the model dtype."""

    activation_amax: dict[str, float]
    quant_error: dict[str, float]
    kept: list[str] = field(default_factory=list)


@torch.inference_mode()
def choose_kept(model: nn.Module, calibration: torch.Tensor, fmt: str = "int8", top: int = 2) -> MixedPrecision:
    """Run calibration ids (B, S) once; keep the `top` units by input amplitude and the `top` by block error, among
    the units `fmt` can store (the others stay in the model dtype or fall back to int8 anyway)."""
    units = storable(model, fmt)
    amax = {n: max(float(args[0].abs().max()) for args in calls)
            for n, calls in unit_inputs(model, units, calibration).items()}
    error = weight_errors(units, fmt)
    ranked = [sorted(metric, key=metric.get, reverse=True)[:top] for metric in (amax, error)]
    return MixedPrecision(amax, error, sorted(set(ranked[0]) | set(ranked[1])))


@torch.inference_mode()
def choose_sensitive(model: nn.Module, calibration: torch.Tensor | None, fmt: str = "int4",
                     fraction: float = KEEP_SENSITIVE) -> MixedPrecision:
    """The `fraction` of units (at least one) whose outputs `fmt` changes most, measured on calibration ids
    (B, S) as ||x W_q^T - x W^T|| / ||x W^T|| over each unit's own inputs (an expert stack: over its experts'
    routed rows); without calibration, by relative weight error. Returned in `quant_error`, largest first. Units
    `fmt` cannot store, and units whose inputs the calibration never shows (expert stacks, when the calibration is
    so short that its rows average kernels.MAX_DENSE_ROWS or fewer per hit expert: the MoE kernel takes them in
    one call), are not ranked."""
    units = storable(model, fmt)
    if calibration is None:
        error, amax = weight_errors(units, fmt), {}
    else:
        first = {n: calls[0] for n, calls in unit_inputs(model, units, calibration).items()}
        error = {n: output_error(units[n], args, fmt) for n, args in first.items()}
        amax = {n: float(first[n][0].abs().max()) for n in error}
    ranked = sorted(error, key=error.get, reverse=True)
    return MixedPrecision(amax, dict(sorted(error.items(), key=lambda kv: -kv[1])),
                          sorted(ranked[:max(1, round(fraction * len(ranked)))]))


def unit_inputs(model: nn.Module, units: dict[str, nn.Module], calibration: torch.Tensor) -> dict[str, list[tuple]]:
    """The positional inputs of every call of each unit in one forward over calibration ids (B, S), MTP head
    included; a unit the forward never calls is absent."""
    inputs: dict[str, list[tuple]] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: inputs.setdefault(n, []).append(args))
               for n, m in units.items()]
    try:
        model(calibration, compute_logits=True, with_mtp=model.config.num_nextn_predict_layers > 0)
    finally:
        for h in handles:
            h.remove()
    return inputs


def weight_errors(units: dict[str, nn.Module], fmt: str) -> dict[str, float]:
    """Per unit, the largest relative error `fmt` makes on its weights."""
    return {n: max(relative_error(w, fmt) for w in unit_weights(m)) for n, m in units.items()}


def output_error(unit: nn.Module, args: tuple, fmt: str) -> float:
    """Relative output error of a unit (Linear or expert stack) under `fmt`, on its recorded inputs."""
    twin = quantized(unit, fmt)
    exact, approx = unit(*args), twin(*args)
    return float((approx.float() - exact.float()).norm() / exact.float().norm().clamp(min=1e-12))


@dataclass
class QuantReport:
    fmt: str
    quantized: list[str]
    kept: list[str]
    bytes_before: int
    bytes_after: int
    int8_fallback: list[str] = field(default_factory=list)  # int4 units stored at int8 (rows int4 cannot group)

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.bytes_after / self.bytes_before


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once): the weights' memory footprint, with the
    copies made for decode (the absorbed MLA's w_uk / w_uv_t) and the RoPE frequencies."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str = "int8", keep: Iterable[str] = (),
                   keep_fmt: str | None = None) -> QuantReport:
    """Swap every candidate unit for its quantized twin, in place: units in `keep` in `keep_fmt` (None: left in
    the model dtype), the others in `fmt` (int4 units whose rows cannot be grouped: int8)."""
    check_format(fmt)
    keep, fallback = set(keep), []

    def twin(name: str, module: nn.Module) -> nn.Module | None:
        unit_fmt = (keep_fmt if name in keep else fmt) if name in units else None
        if unit_fmt == "int4" and not int4_ready(module):
            unit_fmt = "int8"
            fallback.append(name)
        return quantized(module, unit_fmt) if unit_fmt else None

    before, units = weight_bytes(model), candidates(model)
    done = swap_modules(model, twin)
    if fallback:
        log.warning("int4: %d of %d units store int8 instead: their input width is not a multiple of 32, which int4 "
                    "groups need (%s%s)", len(fallback), len(done), ", ".join(fallback[:3]),
                    ", ..." if len(fallback) > 3 else "")
    return QuantReport(fmt, [n for n in done if n not in keep], sorted(keep), before, weight_bytes(model), fallback)


def quantized(unit: nn.Module, fmt: str) -> nn.Module:
    """The quantized twin of a candidate unit: a Linear or a stack of experts."""
    if isinstance(unit, nn.Linear):
        return QuantLinear(unit, fmt)
    return QuantExperts(unit.gate_up_proj.data, unit.down_proj.data, fmt)

"""Block-wise weight quantization by module swap, with layer-wise mixed precision (report §9.4).

Format (DeepSeek-V3 / LongCat FP8 style): a weight (O, I) is cut into 128x128 blocks; each block stores its values
as int8 (scale = amax / 127) or float8_e4m3fn (scale = amax / 448) and one fp32 scale, so an outlier spoils only
its own block. Stacked expert weights (E, O, I) get per-expert blocks. Activations stay in the model dtype.

Which modules: every nn.Linear and every expert stack, except the router (fp32 by design, tiny) and `kv_b_proj`
(the absorbed attention reads its weight directly; it is small). Mixed precision (`choose_kept`): calibration
text runs through the model once; the units with the largest input activation amplitude and the units with the
largest block-quantization error are kept in the model dtype, the report's two criteria.

Shapes: O out features, I in features, E experts, nO = ceil(O/128), nI = ceil(I/128).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts
from . import kernels
from .experts import HitExperts, PlainHitExperts
from .swap import swap_modules

BLOCK = kernels.BLOCK
FORMATS = {"int8": (torch.int8, 127.0), "fp8": (getattr(torch, "float8_e4m3fn", None), 448.0)}
NEVER = ("router.", "kv_b_proj")  # name fragments of modules that are never quantized


def check_format(fmt: str) -> tuple[torch.dtype, float]:
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {sorted(FORMATS)}, got {fmt!r}")
    dtype, qmax = FORMATS[fmt]
    if dtype is None:
        raise ValueError(f"this torch ({torch.__version__}) has no float8_e4m3fn")
    return dtype, qmax


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """(..., O, I) -> zero-padded (..., nO, 128, nI, 128) fp32 view of the blocks."""
    *lead, O, I = w.shape
    padded = F.pad(w.float(), (0, -I % BLOCK, 0, -O % BLOCK))
    return padded.view(*lead, padded.shape[-2] // BLOCK, BLOCK, padded.shape[-1] // BLOCK, BLOCK)


def quantize_blockwise(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., O, I) -> values (..., O, I) in the format's dtype, scales (..., nO, nI) fp32."""
    dtype, qmax = check_format(fmt)
    blocks = _blocks(w)  # (..., nO, 128, nI, 128)
    scales = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / qmax  # (..., nO, nI)
    scaled = blocks / scales[..., :, None, :, None]
    values = scaled.round().clamp(-qmax, qmax) if dtype == torch.int8 else scaled
    O, I = w.shape[-2:]
    values = values.flatten(-4, -3).flatten(-2, -1)[..., :O, :I]  # back to (..., O, I)
    return values.to(dtype).contiguous(), scales


dequantize_blockwise = kernels.dequantize  # the inverse of quantize_blockwise, up to rounding


def relative_error(w: torch.Tensor, fmt: str) -> float:
    """||W - deq(q(W))|| / ||W||: the measured block-quantization error of one weight."""
    restored = dequantize_blockwise(*quantize_blockwise(w, fmt), torch.float32)
    return float((w.float() - restored).norm() / w.float().norm().clamp(min=1e-12))


class QuantLinear(nn.Module):
    """nn.Linear with block-quantized weight storage; `.weight` gives the dequantized matrix for readers."""

    def __init__(self, linear: nn.Linear, fmt: str) -> None:
        super().__init__()
        values, scales = quantize_blockwise(linear.weight.data, fmt)
        self.register_buffer("values", values)  # (O, I)
        self.register_buffer("scales", scales)  # (nO, nI)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        self.out_dtype, self.fmt = linear.weight.dtype, fmt
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_blockwise(self.values, self.scales, self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.block_linear(x, self.values, self.scales, self.bias)


class QuantExperts(HitExperts):
    """Stacked experts with block-quantized storage, run by the hit-experts loop."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, fmt: str) -> None:
        super().__init__()
        for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            values, scales = quantize_blockwise(w, fmt)
            self.register_buffer(f"{name}_values", values)  # (E, O, I)
            self.register_buffer(f"{name}_scales", scales)  # (E, nO, nI)
        self.fmt = fmt

    def project(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        return kernels.block_linear(x, getattr(self, f"{name}_values")[e], getattr(self, f"{name}_scales")[e])


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
    """Run calibration ids (B, S) once; keep the `top` units by input amplitude and the `top` by block error."""
    units = candidates(model)
    amax: dict[str, float] = {}

    def observe(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in units.items()]
    try:
        model(calibration, compute_logits=True, with_mtp=model.config.num_nextn_predict_layers > 0)
    finally:
        for h in handles:
            h.remove()
    error = {n: max(relative_error(w, fmt) for w in unit_weights(m)) for n, m in units.items()}
    ranked = [sorted(metric, key=metric.get, reverse=True)[:top] for metric in (amax, error)]
    return MixedPrecision(amax, error, sorted(set(ranked[0]) | set(ranked[1])))


@dataclass
class QuantReport:
    fmt: str
    quantized: list[str]
    kept: list[str]
    bytes_before: int
    bytes_after: int

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.bytes_after / self.bytes_before


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str = "int8", keep: Iterable[str] = ()) -> QuantReport:
    """Swap every candidate unit not in `keep` for its quantized twin, in place."""
    check_format(fmt)
    keep = set(keep)
    before = weight_bytes(model)
    chosen = set(candidates(model)) - keep
    done = swap_modules(model, lambda name, module: quantized(module, fmt) if name in chosen else None)
    return QuantReport(fmt, done, sorted(keep), before, weight_bytes(model))


def quantized(unit: nn.Module, fmt: str) -> nn.Module:
    """The block-quantized twin of a candidate unit: a Linear or a stack of experts."""
    if isinstance(unit, nn.Linear):
        return QuantLinear(unit, fmt)
    return QuantExperts(unit.gate_up_proj.data, unit.down_proj.data, fmt)

"""Small building blocks: RMSNorm, SwiGLU FFN and interleaved rotary embeddings.

Shapes: B batch, S sequence, D model dim, R rotary dim.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, RopeScaling


class KeepsFp32(nn.Module):
    """A module whose floating-point parameters and buffers stay at least fp32 through `.to(torch.bfloat16)`,
    `.half()` and the like (fp64 stays fp64): for the tensors that must not be rounded to the model's dtype."""

    def _apply(self, fn: Any, recurse: bool = True) -> KeepsFp32:
        super()._apply(fn, recurse)
        for t in [*self.parameters(), *self.buffers()]:
            if t.is_floating_point() and t.element_size() < 4:
                t.data = t.data.float()
        return self


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16 / fp16 / fp32, fp64 for fp64: the precision of the computations done "in fp32"."""
    return torch.promote_types(dtype, torch.float32)


def autocast_off(device_type: str) -> AbstractContextManager:
    """Autocast switched off on `device_type`, where it has autocast at all (not on the meta device)."""
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
        else nullcontext()


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (fp64 for fp64 inputs) and cast back before the weight, as the checkpoint was
    trained (HF/official)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(at_least_fp32(x.dtype))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU FFN `down(silu(gate(x)) * up(x))`, used for the dense sublayers and the MTP layer."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(KeepsFp32):
    """cos/sin tables for RoPE over the `qk_rope_head_dim` slice, computed in fp32 from explicit positions (the
    frequencies stay fp32 in a bf16 model: rounded, the angles at position 4000 are off by radians).

    With YaRN (`scaling.rope_type == "yarn"`) the frequencies are interpolated per dimension and cos/sin carry the
    attention factor, exactly as transformers' `_compute_yarn_parameters` (see docs/context_extension.md).
    """

    def __init__(self, dim: int, theta: float, scaling: RopeScaling) -> None:
        super().__init__()
        # in fp32 and in transformers' order, so that the angles are our oracle's to the bit: computed in fp64 and
        # rounded, some frequencies came out an ulp away, and a sharp YaRN model's logits 1e-3 apart
        powers = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (R/2,) theta^(2i/R)
        inv_freq = _yarn_inv_freq(powers, dim, theta, scaling) if scaling.rope_type == "yarn" else 1.0 / powers
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (R/2,)
        self.attention_scaling = scaling.attention_scaling

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RotaryEmbedding:
        return cls(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions[..., None].float() * self.inv_freq  # (B, S, R/2)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _yarn_inv_freq(powers: torch.Tensor, dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Blend extrapolated (unchanged) and interpolated (/ factor) frequencies along a linear ramp over the pair
    index: pairs that turn more than beta_fast times within the original length keep their frequency, pairs
    that turn fewer than beta_slow times are divided by factor."""
    def pair_index(rotations: float) -> float:  # the (fractional) pair completing `rotations` turns
        original = scaling.original_max_position_embeddings
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(scaling.beta_fast), pair_index(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    keep = 1 - ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (R/2,) 1 = keep
    return 1.0 / (scaling.factor * powers) * (1 - keep) + 1.0 / powers * keep


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3),... of the last dim (the checkpoint's layout).

    x: (B, S, ..., R); cos/sin: (B, S, R/2). The result is returned de-interleaved as [evens | odds], like
    transformers; dot products between rotated q and k are unchanged by that permutation.
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)

"""RMSNorm and RoPE as the model computes them, each in one compiled op (csrc/decode_ops.cpp), for the inference
twins (fused.py): at decode they are ~8 and ~12 small ops of a few microseconds each otherwise, 49 and 24 calls per
token on the bench preset. Each returns None where the kernel does not take the call, for the caller's own path.
"""
from __future__ import annotations

import torch

from . import extension


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """model/layers.py's RMSNorm (CPU, x and weight both fp32 or both bf16), up to the last bit: its sum of
    squares runs in another order."""
    if x.device.type != "cpu" or x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    ext = extension.compiled()
    return None if ext is None else ext.rms_norm(x.contiguous(), weight.contiguous(), eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """model/layers.py's apply_rope, bitwise: x (B, S, ..., R) (a strided view such as a split's is read in
    place), cos/sin (B, S, R/2) of x's dtype."""
    R = x.shape[-1]
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or cos.dtype != x.dtype
            or sin.dtype != x.dtype or x.dim() < 2 or x.stride(-1) != 1 or cos.shape[-1] * 2 != R):
        return None
    ext = extension.compiled()
    if ext is None:
        return None
    uniform = all(x.stride(i) == x.stride(i + 1) * x.shape[i + 1] for i in range(x.dim() - 2))  # rows evenly apart
    if not uniform:
        x = x.contiguous()
    return ext.rope(x, x.numel() // R, x.stride(-2), cos.contiguous(), sin.contiguous())

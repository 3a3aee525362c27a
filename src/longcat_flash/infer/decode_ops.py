"""RMSNorm, SwiGLU, RoPE and the absorbed MLA attention as the model computes them, each in one compiled op
(csrc/decode_ops.cpp), for the inference twins (fused.py, experts.py): at decode they are ~8, 3, ~12 and ~30 small
ops of a few microseconds each otherwise, 49, 12, 24 and 12 calls per token on the bench preset. Each returns None
where the kernel does not take the call, for the caller's own path; `swiglu` falls back by itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import extension


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """model/layers.py's RMSNorm (CPU, x and weight both fp32 or both bf16), up to the last bit: its sum of
    squares runs in another order."""
    if x.device.type != "cpu" or x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    ext = extension.compiled()
    return None if ext is None else ext.rms_norm(x.contiguous(), weight.contiguous(), eps)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h (..., 2F) = [gate | up] -> (..., F), as the model's MLPs compute it: one compiled op
    on CPU (its exp within ~2 fp32 ulp of torch's), else torch's three."""
    ext = extension.compiled() if h.device.type == "cpu" and h.dtype in (torch.float32, torch.bfloat16) else None
    if ext is not None:
        return ext.swiglu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """model/layers.py's apply_rope, bitwise: x (B, S, ..., R) (a strided view such as a split's is read in
    place), cos/sin (B, S, R/2) of x's dtype."""
    R = x.shape[-1]
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or cos.dtype != x.dtype
            or sin.dtype != x.dtype or x.dim() < 2 or cos.shape[-1] * 2 != R):
        return None
    ext = extension.compiled()
    return None if ext is None else ext.rope(x, cos.contiguous(), sin.contiguous())


def absorbed_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                       mask: torch.Tensor, w_uk: torch.Tensor, w_uv_t: torch.Tensor, scale: float,
                       read: torch.Tensor | None = None) -> torch.Tensor | None:
    """FusedMLA.attend_absorbed before o_proj, in fp32 (the same up to the order of fp32 sums): q_nope (B, S, H, N),
    q_rope (B, S, H, R), latent (B, L, C), k_rope (B, L, R) of one dtype, fp32 or bf16 (views such as a split's
    are read in place), mask (B, S, L), w_uk (H, N, C) and w_uv_t (H, C, V) fp32 -> (B, S, H*V) of q's dtype.
    With `read` (B, L) int64, latent (P, C) and k_rope (P, R) are the paged cache's pool rows and row (b, l) of the
    context is pool row read[b, l], read in place."""
    tensors = (q_nope, q_rope, latent, k_rope)
    if (any(t.device.type != "cpu" or t.dtype != q_nope.dtype for t in tensors)
            or q_nope.dtype not in (torch.float32, torch.bfloat16) or w_uk.dtype != torch.float32
            or w_uv_t.dtype != torch.float32 or mask.dtype != torch.bool):
        return None
    ext = extension.compiled()
    if ext is None:
        return None
    return ext.absorbed_attention(*tensors, mask.contiguous(), w_uk.contiguous(), w_uv_t.contiguous(), scale, read)

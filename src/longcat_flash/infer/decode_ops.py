"""RMSNorm, SwiGLU, RoPE and the absorbed MLA attention as the model computes them, each in one compiled op
(csrc/decode_ops.cpp), for the inference twins (fused.py, experts.py): at decode they are ~8, 3, ~12 and ~30 small
ops of a few microseconds each otherwise, 49, 12, 24 and 12 calls per token on the bench preset. Then whole
decode blocks (an attention block's two halves, an MLP, a whole layer, the MTP draft head) in one call each
(csrc/decode_blocks.cpp). Each returns None where the kernel does not take the call, for the caller's own path;
`swiglu` falls back by itself; `mla_project`, `mlp`, `decode_layer` and `mtp_head` are called only once
kernels.linear_weights (and, for a layer or the head, DecodePlans.plan_for) has said the kernels take their weights.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import extension


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """model/layers.py's RMSNorm (CPU, x and weight both fp32 or both bf16), up to the last bit: its sum of
    squares runs in another order."""
    if not extension.takes(x) or x.dtype != weight.dtype:
        return None
    ext = extension.compiled()
    return None if ext is None else ext.rms_norm(x.contiguous(), weight.contiguous(), eps)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h (..., 2F) = [gate | up] -> (..., F), as the model's MLPs compute it: one compiled op
    on CPU (its exp within ~2 fp32 ulp of torch's), else torch's three."""
    ext = extension.compiled() if extension.takes(h) else None
    if ext is not None:
        return ext.swiglu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """model/layers.py's apply_rope, bitwise: x (B, S, ..., R) (a strided view such as a split's is read in
    place), cos/sin (B, S, R/2) of x's dtype."""
    R = x.shape[-1]
    if (not extension.takes(x) or cos.dtype != x.dtype or sin.dtype != x.dtype or x.dim() < 2
            or cos.shape[-1] * 2 != R):
        return None
    ext = extension.compiled()
    return None if ext is None else ext.rope(x, cos.contiguous(), sin.contiguous())


def absorbed_weights(w_uk: torch.Tensor, w_uv_t: torch.Tensor) -> bool:
    """Whether the absorbed attention kernel reads these W_UK and W_UV^T: one dtype, fp32 or bf16."""
    return w_uk.dtype == w_uv_t.dtype and w_uk.dtype in extension.KERNEL_DTYPES


def _absorbed_inputs(tensors: tuple[torch.Tensor, ...], mask: torch.Tensor, w_uk: torch.Tensor,
                     w_uv_t: torch.Tensor) -> bool:
    """Whether the absorbed attention kernel takes these: q, context (and pool) tensors of one dtype, fp32 or bf16,
    on CPU; absorbed weights it reads; a bool mask."""
    dtype = tensors[0].dtype
    return (all(extension.takes(t) and t.dtype == dtype for t in tensors) and absorbed_weights(w_uk, w_uv_t)
            and mask.dtype == torch.bool)


def absorbed_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                       mask: torch.Tensor, w_uk: torch.Tensor, w_uv_t: torch.Tensor,
                       scale: float) -> torch.Tensor | None:
    """FusedMLA.attend_absorbed before o_proj, in fp32 (the same up to the order of fp32 sums): q_nope (B, S, H, N),
    q_rope (B, S, H, R), latent (B, L, C), k_rope (B, L, R) of one dtype, fp32 or bf16 (views such as a split's
    are read in place), mask (B, S, L), w_uk (H, N, C) and w_uv_t (H, C, V) fp32 or bf16 -> (B, S, H*V) of q's dtype."""
    tensors = (q_nope, q_rope, latent, k_rope)
    ext = extension.compiled() if _absorbed_inputs(tensors, mask, w_uk, w_uv_t) else None
    if ext is None:
        return None
    return ext.absorbed_attention(*tensors, mask.contiguous(), w_uk.contiguous(), w_uv_t.contiguous(), scale, None)


# ---- whole decode blocks (csrc/decode_blocks.cpp): the calls above and the GEMV kernel's, in the order the twins
# make them, without the Python between them. Linear weights as kernels.linear_weights gives them.

def mla_project(x: torch.Tensor, qkv_a: list[torch.Tensor], q_norm: nn.Module, q_b: list[torch.Tensor],
                kv_norm: nn.Module, rope: tuple[torch.Tensor, torch.Tensor], heads: int) -> tuple | None:
    """FusedMLA.project: x (B, S, D) -> q_nope (B, S, H, N), q_rope (B, S, H, R), latent (B, S, C), k_rope (B, S, R);
    q_norm and kv_norm RMSNorms and rope (cos, sin) in x's dtype, else None."""
    cos, sin = rope
    if x.dim() != 3 or any(t.dtype != x.dtype for t in (q_norm.weight, kv_norm.weight, cos, sin)):
        return None
    return tuple(extension.compiled().mla_project(x, qkv_a, q_norm.weight.contiguous(), q_norm.eps, q_b,
                                                  kv_norm.weight.contiguous(), kv_norm.eps, cos.contiguous(),
                                                  sin.contiguous(), heads))


def mla_attend(projected: tuple[torch.Tensor, ...], pool: torch.Tensor, write: torch.Tensor, read: torch.Tensor,
               mask: torch.Tensor, w_uk: torch.Tensor, w_uv_t: torch.Tensor, scale: float,
               o_proj: list[torch.Tensor]) -> torch.Tensor | None:
    """FusedMLA.attend over the paged cache: `projected` (q_nope, q_rope, latent, k_rope) stored into the pool's
    (P, C+R) rows `write` (B*S,), attention over rows `read` (B, L) where they lie, then o_proj (an empty list: the
    caller applies it, and gets (B, S, H*V)) -> (B, S, D); None where the attention kernel does not take these."""
    ext = extension.compiled() if _absorbed_inputs((*projected, pool), mask, w_uk, w_uv_t) else None
    if ext is None:
        return None
    return ext.mla_attend(*projected, pool, write, read, mask.contiguous(), w_uk.contiguous(), w_uv_t.contiguous(),
                          scale, o_proj)


def mlp(x: torch.Tensor, gate_up: list[torch.Tensor], down: list[torch.Tensor]) -> torch.Tensor:
    """FusedMLP: down(SwiGLU(gate_up(x))) for x (..., D)."""
    return extension.compiled().mlp(x, gate_up, down)


def layer_plan(tensors: dict[str, list[torch.Tensor]], numbers: dict[str, float]) -> Any:
    """A layer's weights and numbers by name (FusedScMoELayer.weight_inputs) as one object for decode_layer, made
    once: converting them on every call cost ~0.4 ms of a batch-1 int4 token. It keeps the tensors alive."""
    return extension.compiled().layer_plan(tensors, numbers)


def decode_layer(x: torch.Tensor, plan: Any, step: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """FusedScMoELayer at decode: x (B, S, D) -> out (B, S, D), the router's probs (T, E+Z) and ids (T, K); `plan`
    from layer_plan, `step` (cos, sin, mask, write, read, pool0, pool1) as fused.decode_step gives them
    (which also decides that the kernels take them)."""
    return tuple(extension.compiled().decode_layer(x, plan, *step))


def mtp_head(next_tokens: torch.Tensor, hidden: torch.Tensor, plan: Any, step: tuple[torch.Tensor, ...]
             ) -> torch.Tensor:
    """FusedMTPHead at decode: ids (B, S) of x_{t+1} and h_t (B, S, D) -> (B, S, D) for the lm_head; `plan` from
    layer_plan, `step` (cos, sin, mask, write, read, pool) as fused.decode_step gives it."""
    return extension.compiled().mtp_head(next_tokens, hidden, plan, *step)

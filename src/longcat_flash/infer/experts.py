"""Expert execution for CPU inference: one GEMM pair per expert the batch actually hit.

The model's `Experts` runs `F.grouped_mm`, whose CPU fallback loops over every expert, hit or not: at decode
(a handful of rows) that is 4 calls per expert for 5 useful ones. Here the loop visits only the experts with
rows, reading each hit expert's weights in place (no gather copy, so decode reads exactly the active bytes).
The counts come to the host once per layer, which is free on CPU.
Swapped in by module replacement (`use_hit_experts`); quant.py's QuantExperts reuses the loop for prefill-sized
batches (each weight dequantized just before its GEMM) and runs smaller ones in one kernel call over all hit
experts.

Shapes: R routed rows, D model dim, F expert hidden, e experts.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts
from . import decode_ops, kernels
from .swap import swap_modules


class HitExperts(nn.Module):
    """The loop over the hit experts; subclasses say how to apply one expert's projection and hand the kernels
    their stacked tensors (plain weights: PlainHitExperts, quantized: quant.QuantExperts)."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (R, D) rows grouped by expert, counts: (e,) -> (R, D); rows past sum(counts) (zero-expert slots
        sorted last) come out as zeros, as from `Experts`."""
        return self.each_hit(x, counts, self.project)

    def each_hit(self, x: torch.Tensor, counts: torch.Tensor, project: Callable[..., torch.Tensor]) -> torch.Tensor:
        """forward's loop over the hit experts, each projection as `project(rows, e, name)` computes it."""
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start:start + n] = self.apply_one(e, x[start:start + n], project)
                start += n
        out[start:].zero_()
        return out

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, n_ffn: int,
               identity: bool) -> torch.Tensor | None:
        """The MoE's whole routed part for tokens x (T, D) in one kernel call (kernels.moe_experts), or None where
        the kernel does not take it."""
        return kernels.moe_experts(x, ids, weights, n_ffn, identity, self.stacked("gate_up_proj"),
                                   self.stacked("down_proj"))

    def stacked(self, name: str) -> list[torch.Tensor]:
        """All experts' tensors for `gate_up_proj` or `down_proj`, as the kernels take them."""
        raise NotImplementedError

    def apply_one(self, e: int, x: torch.Tensor, project: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Expert `e` (SwiGLU) on rows x (n, D) -> (n, D), through `project` (default: self.project); FusedMoE calls
        it per hit expert too."""
        project = project or self.project
        return project(decode_ops.swiglu(project(x, e, "gate_up_proj")), e, "down_proj")  # via (n, F)

    def project(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        """x @ W_e^T for expert e's `gate_up_proj` (2F, D) or `down_proj` (D, F)."""
        raise NotImplementedError


class PlainHitExperts(HitExperts):
    """Same parameters and results as `Experts`, over the hit experts only: in one kernel call per projection on
    CPU where kernels.dense_experts takes it (decode rows; bf16 prefill on AMX), else expert by expert."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)  # (e, 2F, D)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)  # (e, D, F)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        hidden = kernels.dense_experts(x, counts, self.gate_up_proj)  # (R, 2F), or None: not the kernel's call
        out = None if hidden is None else kernels.dense_experts(decode_ops.swiglu(hidden), counts, self.down_proj)
        # None: not the kernel's call, or the tiles took D but not F (expert_ffn_hidden_size not a multiple of 32)
        return super().forward(x, counts) if out is None else out

    def stacked(self, name: str) -> list[torch.Tensor]:
        return [getattr(self, name)]

    def project(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        return F.linear(x, getattr(self, name)[e])


def use_hit_experts(model: nn.Module) -> list[str]:
    """Replace every `Experts` module in place by a PlainHitExperts sharing its weights; returns their names."""
    return swap_modules(model, lambda _, m: PlainHitExperts(m.gate_up_proj.data, m.down_proj.data)
                        if type(m) is Experts else None)

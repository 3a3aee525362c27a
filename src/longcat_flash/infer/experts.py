"""Expert execution for CPU inference: one GEMM pair per expert the batch actually hit.

The model's `Experts` runs `F.grouped_mm`, whose CPU fallback loops over every expert, hit or not: at decode
(a handful of rows) that is 4 calls per expert for 5 useful ones. Here the loop visits only the experts with
rows, reading each hit expert's weights in place (no gather copy, so decode reads exactly the active bytes,
peers.md §3.4). The counts come to the host once per layer, which is free on CPU.
Swapped in by module replacement (`use_loop_experts`); quant.py's QuantExperts reuses the loop.

Shapes: R routed rows, D model dim, F expert hidden, e experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts


class ExpertLoop(nn.Module):
    """The loop; subclasses say how to apply one expert's projection (plain or quantized weights)."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (R, D) rows grouped by expert, counts: (e,) -> (R, D); rows past sum(counts) (zero-expert slots
        sorted last) come out as zeros, as from `Experts`."""
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows = x[start:start + n]
                gate, up = self.project(rows, e, "gate_up_proj").chunk(2, dim=-1)  # (n, F) each
                out[start:start + n] = self.project(F.silu(gate) * up, e, "down_proj")
                start += n
        out[start:].zero_()
        return out

    def project(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        """x @ W_e^T for expert e's `gate_up_proj` (2F, D) or `down_proj` (D, F)."""
        raise NotImplementedError


class LoopExperts(ExpertLoop):
    """Same parameters and results as `Experts`, computed expert by expert over the hit ones only."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)  # (e, 2F, D)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)  # (e, D, F)

    def project(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        return F.linear(x, getattr(self, name)[e])


def use_loop_experts(model: nn.Module) -> int:
    """Replace every `Experts` module in place by a LoopExperts sharing its weights; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is Experts:
                setattr(module, name, LoopExperts(child.gate_up_proj.data, child.down_proj.data))
                swapped += 1
    return swapped

"""The compute-budget controller (report §2.1.1, docs/budget_pid.md): per layer, a PID on the selection biases of
the FFN experts that drives each expert's share of routing slots to K_e / (K·N), so that tokens use K_e FFN
experts on average. Zero-expert biases never move; they only have to absorb the slots the FFN experts give up.

The model only counts (RoutingInfo.tokens_per_expert); this controller is called explicitly in the train step
with the step's counts, so data-parallel training all-reduces the counts first and every rank applies the same
update. Its state (integral, previous error, step) is checkpointed; the biases are model buffers.

Shapes: L layers, E FFN experts, Z zero experts, K top-k.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..model import Router
from .config import BudgetConfig


class BudgetController:
    """Δb_i = μ_t (kp e_i + ki Σ e_i + kd (e_i - e_i,prev)),  e_i = K_e/(K N) - T_i/(K T_all),  for i < N
    (mode "pid"; mode "sign": Δb_i = μ_t sign(e_i), the fixed step the report compares against)."""

    def __init__(self, cfg: BudgetConfig, n_layers: int, n_ffn: int, top_k: int, target: float,
                 device: torch.device | str = "cpu") -> None:
        self.cfg, self.n_ffn = cfg, n_ffn
        self.target_share = target / (top_k * n_ffn)  # K_e / (K N): each FFN expert's share of all slots
        self.integral = torch.zeros(n_layers, n_ffn, device=device)  # (L, E) clamped running sum of errors
        self.prev_error = torch.zeros(n_layers, n_ffn, device=device)  # (L, E)
        self.steps = 0

    def rate(self) -> float:
        """μ_t: `rate`, multiplied by `decay_factor` every `decay_every` updates, floored at min_rate_ratio·rate."""
        cfg = self.cfg
        return cfg.rate * max(cfg.decay_factor ** (self.steps // cfg.decay_every), cfg.min_rate_ratio)

    def error(self, counts: torch.Tensor) -> torch.Tensor:
        """counts (L, E+Z) slots per expert -> e (L, E). T_i / (K T_all) is expert i's share of the K·T slots."""
        if counts.dim() != 2 or counts.shape[0] != self.integral.shape[0] or counts.shape[1] < self.n_ffn:
            raise ValueError(f"counts must be (layers={self.integral.shape[0]}, experts>={self.n_ffn}), "
                             f"got {tuple(counts.shape)}")
        counts = counts.to(torch.float64)
        share = counts[:, : self.n_ffn] / counts.sum(-1, keepdim=True).clamp(min=1)
        return (self.target_share - share).to(self.integral.dtype)

    def step(self, counts: torch.Tensor) -> torch.Tensor:
        """Advance the controller on one step's (global) counts; returns the bias change Δb (L, E)."""
        cfg, e = self.cfg, self.error(counts)
        limit = cfg.integral_limit
        self.integral = (self.integral + e).clamp(-limit, limit)
        derivative = e - self.prev_error if self.steps else torch.zeros_like(e)
        if cfg.mode == "sign":
            delta = self.rate() * torch.sign(e)
        else:
            delta = self.rate() * (cfg.kp * e + cfg.ki * self.integral + cfg.kd * derivative)
        self.prev_error, self.steps = e, self.steps + 1
        return delta

    @torch.no_grad()
    def update(self, routers: Sequence[Router], counts: torch.Tensor) -> torch.Tensor:
        """`step`, then add Δb to the FFN experts' biases of `routers` (one per layer); zero experts untouched."""
        if len(routers) != self.integral.shape[0]:
            raise ValueError(f"expected {self.integral.shape[0]} routers, got {len(routers)}")
        delta = self.step(counts)
        for router, d in zip(routers, delta):
            router.e_score_correction_bias[: self.n_ffn] += d.to(router.e_score_correction_bias)
        return delta

    def state_dict(self) -> dict[str, Any]:
        return {"integral": self.integral.clone(), "prev_error": self.prev_error.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["integral"].shape != self.integral.shape:
            raise ValueError(f"budget controller state is for shape {tuple(state['integral'].shape)} "
                             f"(layers, FFN experts), this model needs {tuple(self.integral.shape)}")
        device = self.integral.device
        self.integral, self.prev_error = state["integral"].to(device), state["prev_error"].to(device)
        self.steps = int(state["steps"])

"""Parameter groups, width hyperparameter transfer, initialisation and LR schedules.

Width transfer (report §5, Everett et al. "Adam LR full align" for standard parameterisation): tune on a proxy
of hidden size n_proxy, then with s = n_target / n_proxy

    parameter kind          init variance     Adam LR
    embedding               σ²                η            (also norms and biases: vector-like, width-free)
    hidden, unembedding     σ² / s            η / s

so at s = 1 every multiplier is exactly 1. Weight decay applies to matrices (hidden, unembedding) only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from .config import OptimConfig, ScalingConfig, ScheduleConfig

KINDS = ("embedding", "hidden", "unembedding", "vector")


@dataclass(frozen=True)
class WidthScale:
    """Multipliers for a model `s` times wider than the proxy its hyperparameters were tuned on."""

    s: float = 1.0

    def lr_mult(self, kind: str) -> float:
        return 1.0 / self.s if kind in ("hidden", "unembedding") else 1.0

    def var_mult(self, kind: str) -> float:
        return 1.0 / self.s if kind in ("hidden", "unembedding") else 1.0


def width_scale(proxy_width: int | None, target_width: int) -> WidthScale:
    if proxy_width is None:
        return WidthScale()
    if proxy_width <= 0 or target_width <= 0:
        raise ValueError(f"scaling.proxy_width and model.hidden_size must be > 0, got {proxy_width}, {target_width}")
    return WidthScale(target_width / proxy_width)


def param_kind(name: str, param: torch.Tensor) -> str:
    """embedding (token tables), unembedding (lm_head), vector (norm gains, biases), hidden (other matrices)."""
    if param.dim() < 2:
        return "vector"
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    return "unembedding" if name == "lm_head.weight" else "hidden"


# ---- variance alignment and initialisation (report §4) ----

def aligned_model_config(cfg: ModelConfig, mode: str) -> ModelConfig:
    """`scaling.variance_alignment`: keep the preset, or switch the MLA scales and the expert γ on or off.

    "on" sets γ = routed_scaling_factor = m, the expert granularity ffn_hidden_size / expert_ffn_hidden_size:
    splitting an FFN into m experts shrinks the MoE output variance by m twice (gating dilution and width), and
    γ = sqrt(m·m) = m restores it (report §4.2).
    """
    if mode == "preset":
        return cfg
    on = mode == "on"
    gamma = cfg.ffn_hidden_size / cfg.expert_ffn_hidden_size if on else 1.0
    return cfg.replace(mla_scale_q_lora=on, mla_scale_kv_lora=on, routed_scaling_factor=gamma)


@torch.no_grad()
def init_parameters(model: nn.Module, scaling: ScalingConfig) -> WidthScale:
    """normal(0, init_std) everywhere (norms 1, biases 0), then hidden/unembedding std scaled by sqrt(1/s).

    Scaling the drawn samples instead of drawing again keeps the RNG stream identical for every s.
    """
    cfg = model.config
    scale = width_scale(scaling.proxy_width, cfg.hidden_size)
    model.init_weights(cfg.initializer_range if scaling.init_std is None else scaling.init_std)
    for name, param in model.named_parameters():
        kind = param_kind(name, param)
        if kind != "vector" and scale.var_mult(kind) != 1.0:
            param.mul_(math.sqrt(scale.var_mult(kind)))
    return scale


# ---- optimizer ----

def param_groups(model: nn.Module, optim: OptimConfig, scale: WidthScale) -> list[dict[str, Any]]:
    """One AdamW group per parameter kind, each carrying its names (checkpoints map state by name)."""
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        kind = param_kind(name, param)
        group = groups.setdefault(kind, {
            "kind": kind, "params": [], "names": [], "lr_mult": scale.lr_mult(kind),
            "weight_decay": optim.weight_decay if kind in ("hidden", "unembedding") else 0.0})
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in KINDS if k in groups]


def build_optimizer(model: nn.Module, optim: OptimConfig, scale: WidthScale) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, optim, scale), lr=optim.lr, betas=optim.betas, eps=optim.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


class NamedOptimizer:
    """The optimizer's checkpoint state keyed by parameter name instead of position, so that a state can be
    edited by name (model growth) and a mismatch is reported by name."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        raw = self.optimizer.state_dict()
        state, groups = {}, []
        for group in raw["param_groups"]:
            groups.append({k: v for k, v in group.items() if k != "params"})
            state.update({name: raw["state"][i] for name, i in zip(group["names"], group["params"])
                          if i in raw["state"]})
        return {"groups": groups, "state": state}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Map the saved per-name state onto this optimizer's parameters; groups must hold the same names."""
        current = [g["names"] for g in self.optimizer.param_groups]
        if [sorted(names) for names in current] != [sorted(g["names"]) for g in saved["groups"]]:
            differing = {n for g in current for n in g} ^ {n for g in saved["groups"] for n in g["names"]}
            raise ValueError(f"optimizer state does not match the model's parameters; differing names: "
                             f"{sorted(differing)[:5] or 'none (same names, other grouping)'}")
        index, groups, state = 0, [], {}
        for names, group in zip(current, saved["groups"]):
            ids = list(range(index, index + len(names)))
            groups.append({**group, "names": names, "params": ids})
            state.update({i: saved["state"][n] for i, n in zip(ids, names) if n in saved["state"]})
            index += len(ids)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- LR schedule: a pure function of the step (its state is the step, checkpointed with the trainer) ----

def lr_factor(cfg: ScheduleConfig, step: int, max_steps: int) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based) of `max_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = max(cfg.warmup_steps, round(max_steps * (1 - cfg.decay_fraction)))  # wsd
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return 1.0 - (1 - cfg.min_lr_ratio) * progress

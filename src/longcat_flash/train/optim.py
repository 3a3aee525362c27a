"""Parameter groups, width hyperparameter transfer, initialisation and LR schedules.

Width transfer (report §3.1.1, Everett et al. "Adam LR full align" for standard parameterisation): tune on a proxy
of hidden size n_proxy, then with s = n_target / n_proxy

    parameter kind          init variance     Adam LR
    embedding               σ²                η            (also norms and biases: vector-like, width-free)
    hidden, unembedding     σ² / s            η / s

so at s = 1 every multiplier is exactly 1. Weight decay applies to matrices (hidden, unembedding) only.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..model.layers import RMSNorm
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
    """embedding (token tables), unembedding (lm_head), vector (norm gains, biases), hidden (other matrices). A
    lm_head tied to the embedding is one tensor, listed once under the embedding's name: the embedding's rules
    (no weight decay, lr and init not scaled by the width) are the ones it follows."""
    if param.dim() < 2:
        return "vector"
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    return "unembedding" if name == "lm_head.weight" else "hidden"


# ---- initialisation (report §2.3) ----

@torch.no_grad()
def init_parameters(model: nn.Module, scaling: ScalingConfig, seed: int = 0) -> WidthScale:
    """normal(0, init_std) for matrices and embeddings (hidden/unembedding std scaled by sqrt(1/s)), ones for
    norm gains, zeros for biases and router biases; buffers rebuilt on the model's device.

    Row i (dim 0) of parameter `name` is drawn from its own generator seeded by (seed, name, i), so the values do
    not depend on how a parameter is sharded: each rank fills only the rows it holds (FSDP and expert shards of a
    model built on the meta device) and gets what one process would. Scaling a drawn row, rather than drawing
    with another std, keeps the values' pattern identical for every width multiplier s.
    """
    cfg = model.config
    scale = width_scale(scaling.proxy_width, cfg.hidden_size)
    std = cfg.initializer_range if scaling.init_std is None else scaling.init_std
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            name = param_name(f"{module_name}.{leaf}")
            local, first_row = local_rows(param)
            if isinstance(module, RMSNorm):
                local.fill_(1.0)
            elif leaf == "bias":
                local.zero_()
            else:
                _seeded_rows(local, first_row, std * math.sqrt(scale.var_mult(param_kind(name, param))), seed, name)
    model.init_buffers()
    return scale


def _seeded_rows(rows: torch.Tensor, first: int, std: float, seed: int, name: str) -> None:
    """rows (n, ...) are rows first..first+n-1 of parameter `name`: each drawn from its own seeded generator."""
    if first + len(rows) > 1 << 22:
        raise ValueError(f"{name}: row-seeded initialisation supports up to 4M rows, got {first + len(rows)}")
    base = int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=5).digest(), "little")
    generator = torch.Generator(device=rows.device)
    for i, row in enumerate(rows):
        generator.manual_seed((base << 22) + first + i)  # < 2**62: rows < 4M per parameter
        row.normal_(0.0, std, generator=generator)


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of `param` this process holds and the global index of the first one. Sharded parameters
    (DTensors: FSDP and expert parallelism) hold a contiguous block of rows; anything else is whole."""
    if not isinstance(param, DTensor):
        return param, 0
    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise ValueError(f"parameter of shape {tuple(param.shape)} is sharded along a dimension other than 0 "
                         f"({param.placements}); initialisation by rows needs whole rows")
    return local, offset[0]


def param_name(name: str) -> str:
    """A parameter's name as checkpoints and the optimizer know it (activation-checkpoint wrappers removed)."""
    return name.replace("_checkpoint_wrapped_module.", "")


# ---- optimizer ----

def param_groups(model: nn.Module, optim: OptimConfig, scale: WidthScale) -> list[dict[str, Any]]:
    """One AdamW group per parameter kind."""
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        kind = param_kind(param_name(name), param)
        group = groups.setdefault(kind, {
            "kind": kind, "params": [], "lr_mult": scale.lr_mult(kind),
            "weight_decay": optim.weight_decay if kind in ("hidden", "unembedding") else 0.0})
        group["params"].append(param)
    return [groups[k] for k in KINDS if k in groups]


def build_optimizer(model: nn.Module, optim: OptimConfig, scale: WidthScale) -> torch.optim.AdamW:
    """AdamW over the parameter groups; the fused kernel on CUDA (one launch for all parameters)."""
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, optim, scale), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)  # groups of an optimizer not built by build_optimizer: 1


# ---- LR schedule: a pure function of the step (its state is the step, checkpointed with the trainer) ----

def decay_start(cfg: ScheduleConfig, max_steps: int) -> int:
    """WSD's first decaying step: the last decay_fraction of the run, after the warmup."""
    return max(cfg.warmup_steps, round(max_steps * (1 - cfg.decay_fraction)))


def lr_factor(cfg: ScheduleConfig, step: int, max_steps: int) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based) of `max_steps`: warmup reaches the peak at its
    last step, and a decay of n steps takes its k-th to progress k/n, so the run's last step (max_steps - 1) runs at
    min_lr_ratio (progress was k-1 of n: the last step stayed above it, and a one-step WSD decay at the peak)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    start = cfg.warmup_steps if cfg.kind == "cosine" else decay_start(cfg, max_steps)
    if step < start:  # wsd's stable phase
        return 1.0
    progress = min(1.0, (step - start + 1) / max(1, max_steps - start))
    if cfg.kind == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - (1 - cfg.min_lr_ratio) * progress

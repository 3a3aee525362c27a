"""Router-stability monitors (report §3.1.3), computed every `loss.monitor_every` steps.

R_g = ||∇_P (α-weighted balance term)|| / ||∇_P L_LM|| per layer, where P is the batch-averaged expert
probability vector. Every token's probabilities p_t enter the losses; writing p_t = P + (p_t - P) gives
∇_P L = Σ_t ∂L/∂p_t, so both gradients come from one `autograd.grad` each w.r.t. the router probabilities the
forward pass kept in the graph. They are not accumulated into .grad, draw no randomness and leave the graph
for the real backward. R_g well below ~0.1 means the balance loss only regularises and the LM loss still
drives specialisation. Mean pairwise cosine similarity of the router vectors rises when balancing dominates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import ModelOutput, Router
from .config import LossConfig
from .losses import balance_loss


def router_grad_ratio(out: ModelOutput, lm: torch.Tensor, cfg: LossConfig, n_ffn: int, target: float,
                      real: torch.Tensor | None = None) -> list[float]:
    """R_g per layer for one micro-batch (the balance term weighted as in the total loss: α / n_layers); real:
    (B, S) the tokens that are not padding, as the trained balance term counts them."""
    probs = [r.probs for r in out.routing]
    weight = cfg.balance_alpha / len(probs)
    flat = None if real is None else real.reshape(-1)
    balance = sum(balance_loss(r.probs, r.ids, n_ffn, cfg.balance_groups, target, real=flat) for r in out.routing)
    g_lm = torch.autograd.grad(lm, probs, retain_graph=True)  # (T, E+Z) per layer
    g_lb = torch.autograd.grad(weight * balance, probs, retain_graph=True)
    ratios = [(b.sum(0).norm() / a.sum(0).norm().clamp(min=1e-30)).item() for a, b in zip(g_lm, g_lb)]
    return ratios


@torch.no_grad()
def router_cosine(routers: list[Router]) -> float:
    """Mean pairwise cosine similarity of the router vectors (rows of each classifier), averaged over layers."""
    values = []
    for router in routers:
        weight = router.classifier.weight
        full = getattr(weight, "full_tensor", None)  # FSDP: gather the sharded rows (every rank calls this)
        w = F.normalize((weight if full is None else full()).float(), dim=-1)  # (E+Z, D)
        n = w.shape[0]
        sim = w @ w.T  # (E+Z, E+Z)
        values.append((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
    return torch.stack(values).mean().item()

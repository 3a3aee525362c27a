"""Data parallelism over the (dp, ep) mesh: gradient averaging, the sharded gradient norm, global router counts.

Every rank reads a different slice of the global batch and back-propagates the mean loss of its slice. Then:
  * dense parameters got only this rank's tokens: sum over the whole world, divide by the world size;
  * expert shards already got every ep rank's tokens through the combine's backward all-to-all, so they are
    summed over the dp group only (the ranks holding the same experts), and also divided by the world size;
with equal slices that is exactly the gradient of the global mean loss, as one process would compute it.

Why not DDP: its bucket hooks would all-reduce during backward, interleaved with the experts' backward
all-to-alls, and it needs the sharded expert parameters excluded by name. One coalesced all-reduce per group
after backward keeps the collective order obvious and costs little at this scale.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..model.moe import Experts


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) trainable parameters; the expert ones are those sharded by expert parallelism."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in expert_ids], [p for p in params if id(p) in expert_ids]


def _all_reduce_sum(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """In-place sum across `group`, one collective per dtype (flattened into one buffer)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):  # same order on every rank
        group_tensors = by_dtype[dtype]
        flat = torch.cat([t.reshape(-1) for t in group_tensors])
        dist.all_reduce(flat, group=group)
        for t, reduced in zip(group_tensors, flat.split([t.numel() for t in group_tensors])):
            t.copy_(reduced.view_as(t))


def reduce_gradients(model: nn.Module, mesh: DeviceMesh | None) -> None:
    """Turn each rank's gradients into those of the global mean loss (module docstring). Call after backward.

    Parameters without a gradient are skipped; the graph is the same on every rank, so all ranks skip alike.
    """
    if mesh is None:
        return
    dense, experts = split_parameters(model)
    dense_grads = [p.grad for p in dense if p.grad is not None]
    expert_grads = [p.grad for p in experts if p.grad is not None]
    _all_reduce_sum(dense_grads, group=None)  # the mesh spans the whole world
    _all_reduce_sum(expert_grads, group=mesh.get_group("dp"))
    for g in dense_grads + expert_grads:
        g.div_(mesh.size())


def clip_grad_norm_(model: nn.Module, max_norm: float, mesh: DeviceMesh | None) -> torch.Tensor:
    """Clip to the global gradient norm (as torch.nn.utils.clip_grad_norm_ on one process) and return it.

    Expert shards differ across the ep group, so their squared norm is summed over it; dense gradients are
    identical on every rank once reduced. Call after `reduce_gradients`.
    """
    if mesh is None or mesh.get_group("ep").size() == 1:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    dense, experts = split_parameters(model)
    dense_grads = [p.grad for p in dense if p.grad is not None]
    expert_grads = [p.grad for p in experts if p.grad is not None]
    device = dense_grads[0].device
    expert_sq = _squared_norm(expert_grads, device)
    dist.all_reduce(expert_sq, group=mesh.get_group("ep"))
    norm = (_squared_norm(dense_grads, device) + expert_sq).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in dense_grads + expert_grads:
        g.mul_(coef.to(g.dtype))
    return norm


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return sum((torch.linalg.vector_norm(g.float()).square() for g in grads), torch.zeros((), device=device))


def global_counts(counts: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Router selection counts (L, E+Z) summed over every rank, so the budget controller sees the global batch
    and every rank writes the same bias. One all-reduce for all layers."""
    if mesh is not None:
        counts = counts.clone()
        dist.all_reduce(counts)
    return counts


def average_metrics(metrics: dict[str, Any], mesh: DeviceMesh | None) -> dict[str, Any]:
    """Every float (and list of floats) averaged over the ranks, in one all-reduce; other values unchanged.

    Ranks hold equal slices of the global batch, so a mean of per-rank means is the global mean."""
    keys = [k for k, v in metrics.items() if _is_float(v) or (isinstance(v, list) and v and all(map(_is_float, v)))]
    if mesh is None or not keys:
        return metrics
    flat = torch.tensor([x for k in keys for x in (metrics[k] if isinstance(metrics[k], list) else [metrics[k]])],
                        dtype=torch.float64)
    dist.all_reduce(flat)
    values = iter((flat / mesh.size()).tolist())
    averaged = {k: [next(values) for _ in metrics[k]] if isinstance(metrics[k], list) else next(values) for k in keys}
    return {**metrics, **averaged}


def _is_float(value: Any) -> bool:
    return isinstance(value, float)

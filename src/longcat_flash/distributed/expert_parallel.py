"""Expert parallelism: experts sharded over an ep process group, tokens moved by all-to-all (report §2.2, §6.1.1).

Rank r of an ep group of size P holds experts [r*e, (r+1)*e), e = E / P. One dispatch, per MoE layer:

    ids (T, K) ──sort by expert, cut zero slots──► order (R_send,)     zero-expert slots never leave the rank:
    counts (E,) ──all_to_all (equal splits)──────► recv_counts (P, e)   their output weight * x is added locally
    [send per rank | recv per rank] .tolist()                          the one host sync of the layer
    x[order // K] ──all_to_all_single (uneven)───► rows, source-major: (src0: e0 e1 ..) (src1: e0 e1 ..) ..
    rows[perm] ────────────────────────────────────► expert-major, for the grouped GEMM
and the combine walks back: un-permute, all_to_all_single with the splits swapped, scatter into the K slots.
Both all-to-alls are torch's functional collectives: they return at once with a tensor still in flight, and
their autograd sends gradients back along the reverse route. With `overlap` the waits happen in `wait_dispatch`
/ `wait_combine`, which the ScMoE layer calls after its dense work (model/block.py); without it the dispatcher
blocks right after each launch, which is the baseline the benchmark compares against.

Every rank calls the same collectives in the same order whatever its tokens (zero rows still exchange splits):
no collective sits behind rank-dependent control flow.

Shapes: T tokens, K top-k, D model dim, E FFN experts, e local experts, P ep ranks, R rows.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, LocalDispatcher, MoE, group_by_expert, to_slots


@dataclass
class CommStats:
    """What the all-to-alls carried off this rank (rows to itself never touch a wire): rows and payload bytes of
    dispatch + combine, the tokens dispatched (for bytes per token), and the seconds spent blocked waiting for
    them: the communication the overlap did not hide."""

    tokens: int = 0
    rows_sent: int = 0
    bytes_sent: int = 0
    wait_s: float = 0.0

    def add(self, other: CommStats) -> None:
        self.tokens += other.tokens
        self.rows_sent += other.rows_sent
        self.bytes_sent += other.bytes_sent
        self.wait_s += other.wait_s


@dataclass
class _Route:
    """Where one dispatch sent its rows, so the combine can bring the outputs back."""

    order: torch.Tensor  # (R_send,) the FFN slots this rank sent, in send order
    T: int
    K: int
    send: list[int]  # (P,) rows to each ep rank
    recv: list[int]  # (P,) rows from each ep rank
    perm: torch.Tensor  # (R_recv,) source-major position of each expert-major row
    counts: torch.Tensor  # (e,) rows per local expert
    data: torch.Tensor  # the tensor in flight: received rows (R_recv, D), later returned outputs (R_send, D)


class AllToAllDispatcher:
    """The model's TokenDispatcher over an ep process group (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup, overlap: bool = True) -> None:
        self.group, self.size, self.rank = group, group.size(), group.rank()
        self.overlap = overlap
        self.stats = CommStats()

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, n_ffn: int) -> _Route:
        if n_ffn % self.size:
            raise ValueError(f"{n_ffn} experts cannot be split evenly over {self.size} expert-parallel ranks")
        T, K = ids.shape
        P, e = self.size, n_ffn // self.size
        order, counts = group_by_expert(ids, n_ffn)  # (T*K,), (E,)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # (P*e,) [source, local expert]
        send, recv = torch.stack([counts.view(P, e).sum(1), recv_counts.view(P, e).sum(1)]).tolist()  # host sync
        order = order[: sum(send)]  # (R_send,) zero slots cut off: they are never sent
        rows = self._launch(x[order // K], recv, send)  # (R_recv, D) source-major, in flight
        expert_of_row = torch.arange(e, device=ids.device).repeat(P).repeat_interleave(
            recv_counts, output_size=sum(recv))  # (R_recv,)
        perm = torch.argsort(expert_of_row, stable=True)
        self._count(T, sum(send) - send[self.rank], x)
        return _Route(order, T, K, send, recv, perm, recv_counts.view(P, e).sum(0), rows)

    def wait_dispatch(self, route: _Route) -> tuple[torch.Tensor, torch.Tensor]:
        """(R_recv + 1, D) rows expert-major, then one zero row past the last group end that the experts never
        compute: a rank that received no rows runs the same ops as the others (grouped_mm's backward rejects an
        empty input), so every rank's backward issues its collectives in the same order. (e,) counts."""
        self._wait(route.data)
        return F.pad(route.data[route.perm], (0, 0, 0, 1)), route.counts

    def combine(self, y: torch.Tensor, route: _Route) -> _Route:
        y = y[:-1]  # drop the padding row
        y_src = y.new_empty(y.shape).index_put((route.perm,), y)  # (R_recv, D) back to source-major
        route.data = self._launch(y_src, route.send, route.recv)  # (R_send, D) in send order, in flight
        self._count(0, sum(route.recv) - route.recv[self.rank], y)
        return route

    def wait_combine(self, route: _Route) -> torch.Tensor:
        self._wait(route.data)
        return to_slots(route.data, route.order, route.T, route.K)  # (T, K, D)

    def _launch(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        # the autograd variant: on torch 2.11 the plain one has no backward (from 2.12 on they are the same op)
        out = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, self.group)
        if not self.overlap:
            self._wait(out)  # block here: no compute hides this all-to-all
        return out

    def _wait(self, t: torch.Tensor) -> None:
        """Block until the all-to-all behind t has landed; later reads of t find it there."""
        if isinstance(t, funcol.AsyncCollectiveTensor):
            start = time.perf_counter()
            t.wait()
            self.stats.wait_s += time.perf_counter() - start

    def _count(self, tokens: int, rows_off_rank: int, x: torch.Tensor) -> None:
        self.stats.add(CommStats(tokens, rows_off_rank, rows_off_rank * x.shape[-1] * x.element_size()))


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def shard_experts(model: nn.Module, group: dist.ProcessGroup, overlap: bool = True,
                  wrap: Callable[[torch.Tensor], torch.Tensor] = lambda local: local) -> nn.Module:
    """Keep only this rank's E/size experts in every MoE layer and route tokens through an AllToAllDispatcher;
    `wrap` turns a rank's slice (e, ...) into what its Parameter holds (FSDP training: a DTensor, fsdp.py).

    Call it on identical full models on every rank of `group` (same seed, or each rank loaded the same
    checkpoint), before building the optimizer: the expert Parameters are replaced by their slices.
    """
    if prepared := sorted({type(moe.experts).__name__ for moe in moe_layers(model)
                           if not isinstance(moe.experts, Experts)}):
        raise ValueError(f"shard_experts shards a model as built (LongcatFlash.from_pretrained, Transformer): this "
                         f"one's experts are {', '.join(prepared)}, prepared for one device by infer's "
                         "load_for_inference / load_engine; shard the model first, then build the Engine on it")
    size, rank = group.size(), group.rank()
    for moe in moe_layers(model):
        if moe.n_ffn % size:
            raise ValueError(f"n_routed_experts={moe.n_ffn} is not divisible by the expert-parallel size {size}")
        e = moe.n_ffn // size
        for name, param in list(moe.experts.named_parameters()):
            local = param.detach()[rank * e:(rank + 1) * e].clone()  # (e, ...) of (E, ...)
            setattr(moe.experts, name, nn.Parameter(wrap(local), requires_grad=param.requires_grad))
        moe.dispatcher = AllToAllDispatcher(group, overlap)
    return model


def _dispatchers(model: nn.Module) -> list[AllToAllDispatcher]:
    return [m.dispatcher for m in moe_layers(model) if isinstance(m.dispatcher, AllToAllDispatcher)]


def comm_stats(model: nn.Module, reset: bool = False) -> CommStats:
    """This rank's all-to-all traffic summed over the MoE layers since the last reset."""
    total = CommStats()
    for d in _dispatchers(model):
        total.add(d.stats)
        if reset:
            d.stats = CommStats()
    return total


@contextmanager
def experts_gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model holds all E experts on every rank and dispatches locally: the official
    layout, for `save_pretrained` (call it on every rank: the gather is a collective). Restored on exit.
    """
    saved = []
    for moe in moe_layers(model):
        if not isinstance(moe.dispatcher, AllToAllDispatcher):
            continue
        group = moe.dispatcher.group
        params = dict(moe.experts.named_parameters())
        saved.append((moe, moe.dispatcher, params))
        for name, shard in params.items():
            full = shard.new_empty((shard.shape[0] * group.size(), *shard.shape[1:]))
            dist.all_gather_into_tensor(full, shard.detach().contiguous(), group=group)
            setattr(moe.experts, name, nn.Parameter(full, requires_grad=False))
        moe.dispatcher = LocalDispatcher()
    try:
        yield model
    finally:
        for moe, dispatcher, params in saved:
            for name, shard in params.items():
                setattr(moe.experts, name, shard)
            moe.dispatcher = dispatcher

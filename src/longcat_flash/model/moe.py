"""The MoE with zero-computation experts (report §2.1, docs/architecture.md §5).

Router: fp32 softmax over E FFN experts + Z zero experts; `e_score_correction_bias` is used for selection only,
gate weights are the unbiased probabilities times `routed_scaling_factor` (for zero experts too, as transformers).
Experts: stacked weights, tokens sorted by expert and one grouped GEMM; zero-expert slots never reach a GEMM,
they contribute `weight * x` ("identity") or nothing ("drop"). Combine is a sum over the fixed K slots, so it is
deterministic. The TokenDispatcher seam lets expert parallelism replace the local sort/unsort; the MoE runs in
three phases (begin / compute / finish) so that the ScMoE layer can compute while the dispatcher communicates.

Shapes: T tokens, D model dim, F expert hidden, E FFN experts, e local FFN experts, Z zero experts, K top-k,
R routed rows (token-slot pairs handed to the experts).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import KeepsFp32, at_least_fp32, autocast_off


@dataclass
class RoutingInfo:
    """What one MoE layer decided for a batch; read by losses, the budget controller and analysis. The counts
    are computed when first read: inference never reads them, and at decode they cost ~10 small ops a layer."""

    probs: torch.Tensor  # (T, E+Z) fp32 softmax, differentiable (balance loss)
    ids: torch.Tensor  # (T, K) selected experts; ids >= E are zero experts
    n_ffn: int  # E: the FFN experts; ids from E on are zero experts

    @functools.cached_property
    def tokens_per_expert(self) -> torch.Tensor:
        """(E+Z,) int64 selection counts (budget controller)."""
        return histogram(self.ids, self.probs.shape[-1])

    @functools.cached_property
    def ffn_experts_per_token(self) -> torch.Tensor:
        """(T,) int64 FFN experts each token used."""
        return (self.ids < self.n_ffn).sum(-1)


class Router(KeepsFp32):
    """Softmax router in fp32. The classifier weight and the correction bias stay fp32 whatever the model dtype:
    probabilities are ~1/(E+Z), the same order as the bias, so bf16 would flip top-k choices."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.scale, self.renormalize = cfg.moe_topk, cfg.routed_scaling_factor, cfg.norm_topk_prob
        dtype = at_least_fp32(torch.get_default_dtype())  # also under set_default_dtype(torch.bfloat16)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.n_experts_total, bias=cfg.router_bias, dtype=dtype)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts_total, dtype=dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, D) -> probs (T, E+Z) fp32, ids (T, K), weights (T, K) fp32 (fp64 in an fp64 model). Autocast is
        off here: it would run the classifier in bf16 whatever its operands (linear is on autocast's bf16 list)."""
        w, b = self.classifier.weight, self.classifier.bias
        dtype = at_least_fp32(torch.promote_types(x.dtype, w.dtype))
        with autocast_off(x.device.type):
            logits = F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))  # (T, E+Z)
        return self.route(logits)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routing of `forward` from the classifier's logits (T, E+Z), however they were computed."""
        probs = logits.softmax(dim=-1)  # (T, E+Z)
        with torch.no_grad():  # the bias only picks experts; it never shapes a gate value or a gradient
            ids = torch.topk(probs + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        weights = probs.gather(1, ids)  # (T, K)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return probs, ids, weights * self.scale


class Experts(nn.Module):
    """`n` SwiGLU experts with stacked weights; gate and up fused row-wise as [gate | up] (transformers' layout)."""

    def __init__(self, n: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * hidden, dim))  # (e, 2F, D)
        self.down_proj = nn.Parameter(torch.empty(n, dim, hidden))  # (e, D, F)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (R, D) rows grouped by expert, counts: (e,) rows per expert, sum(counts) <= R (see `expert_ffn`).

        Under expert parallelism the weights are shards of the full (E, ...) tensors (DTensors): their local
        rows are this rank's experts."""
        return expert_ffn(x, counts, local_part(self.gate_up_proj), local_part(self.down_proj))

    def forward_reference(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Plain loop over experts (host-synced), the twin `forward` is tested against."""
        out, start = torch.zeros_like(x), 0
        for e, n in enumerate(counts.tolist()):
            out[start:start + n] = self.apply_one(e, x[start:start + n])
            start += n
        return out

    def apply_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` on rows x (..., D)."""
        gate, up = (x @ self.gate_up_proj[e].T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down_proj[e].T


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of `tensor`: a sharded tensor's (DTensor's) local part, any other tensor itself.
    Duck-typed, so that the model needs no torch.distributed import."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def expert_ffn(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over rows grouped by expert: x (R, D), counts (e,), gate_up (e, 2F, D), down (e, D, F).

    One grouped GEMM per projection over all experts, with the group ends on the device (no host sync). Rows
    past the last group end (sum(counts) <= R: padding, or zero-expert slots sorted last) are never computed:
    what they hold in the output, and in x's gradient, is undefined, and whoever passed them masks it
    (LocalDispatcher). Under autocast on a GPU both GEMMs take bf16 operands (`_grouped_mm`).
    """
    ends = counts.cumsum(0).to(torch.int32)  # (e,)
    gate, up = _grouped_mm(x, gate_up.transpose(1, 2), ends).chunk(2, dim=-1)  # (R, F) each
    return _grouped_mm(F.silu(gate) * up, down.transpose(1, 2), ends)  # (R, D)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x: (R, I), w: (e, I, O), ends: (e,) int32 cumulative group ends -> (R, O).

    On a GPU under autocast both operands take the autocast dtype (bf16): the grouped GEMM is then one kernel, and
    fp32 operands would take its slow per-group fallback. On the CPU they keep x's dtype: the CPU grouped GEMM is
    a loop of per-expert GEMMs, and in bf16 each new row count builds a new oneDNN kernel; routing changes the row
    counts every step, which made the bf16 train step 2.3x slower than fp32 (measured, small preset)."""
    device = x.device.type
    autocasting = device != "cpu" and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocasting else x.dtype
    x, w = x.to(dtype), w.to(dtype)
    if x.is_meta:  # shapes only (torch's meta kernel takes bf16 alone)
        return x.new_empty(x.shape[0], w.shape[-1])
    if not _grouped_mm_takes(x, w):
        return _looped_mm(x, w, ends)
    out = F.grouped_mm(x, w, offs=ends)
    if out.requires_grad:
        out.register_hook(torch.Tensor.contiguous)  # grouped_mm's backward rejects expanded gradients
    return out


def _grouped_mm_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether F.grouped_mm runs these operands: fp32 / bf16 / fp16 with rows of a multiple of 16 bytes (so
    hidden sizes of a multiple of 4 in fp32, 8 in bf16), and only bf16 under torch.compile (its fake kernel takes
    bf16 alone)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False
    return all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], w.shape[-1]))


def _looped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`_grouped_mm` as one GEMM per group (reads the group ends to the host), for what F.grouped_mm does not
    take; rows past the last end come out zero."""
    bounds = [0, *ends.tolist()]
    pieces = [x[a:b] @ w[e] for e, (a, b) in enumerate(zip(bounds, bounds[1:]))]  # (rows of e, O) each
    return torch.cat([*pieces, x.new_zeros(x.shape[0] - bounds[-1], w.shape[-1])])  # (R, O)


class TokenDispatcher(Protocol):
    """Moves FFN-expert rows to the experts and back. Zero-expert slots are never dispatched.

    Each direction is a start and a wait, so that an expert-parallel dispatcher can keep its all-to-all in flight
    while the layer computes its dense path (block.py, report §6.1.1); a synchronous dispatcher does all the work
    in the start and its waits only hand the result over. Handles are opaque to the caller.
    """

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, n_ffn: int) -> Any:
        """Start sending the FFN slots of x (T, D) with ids (T, K) to their experts; returns a handle."""
        ...

    def wait_dispatch(self, handle: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The arrived rows (R, D) grouped by local expert, and counts (e,) per local expert."""
        ...

    def combine(self, y: torch.Tensor, handle: Any) -> Any:
        """Start sending expert outputs (R, D) back to their slots; returns a handle."""
        ...

    def wait_combine(self, handle: Any) -> torch.Tensor:
        """Per-slot outputs (T, K, D), 0 in zero-expert slots."""
        ...


def histogram(values: torch.Tensor, n: int, sorted_values: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) int64 occurrences of 0..n-1 in `values` (any shape; `sorted_values`: the same, already sorted).

    By sort and binary search rather than bincount: deterministic, and no host sync on a GPU (bincount reads
    the maximum back to size its output)."""
    if sorted_values is None:
        sorted_values = values.reshape(-1).sort().values
    edges = torch.searchsorted(sorted_values, torch.arange(n + 1, device=values.device, dtype=sorted_values.dtype))
    return edges.diff()


def group_by_expert(ids: torch.Tensor, n_ffn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (T, K) -> slot order (T*K,) and counts (E,): a stable sort of the flat slots by expert id, FFN slots
    first, grouped by expert; every zero expert shares key E, so zero slots sort last and a cut drops them."""
    key = ids.reshape(-1).clamp(max=n_ffn)  # (T*K,)
    order = torch.argsort(key, stable=True)
    return order, histogram(key, n_ffn, key[order])


def to_slots(y: torch.Tensor, order: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """Rows y (R, D) in `order` (the first R sorted slots, R <= T*K) -> (T, K, D), zero rows in the slots
    y does not cover (zero-expert slots)."""
    slots = y.new_zeros(T * K, y.shape[-1]).index_put((order[: y.shape[0]],), y)  # undo the sort
    return slots.view(T, K, -1)


class LocalDispatcher:
    """Single-process dispatch: sort the slots by expert, FFN slots first and zero slots last. Everything happens
    in the starts.

    On the CPU the FFN row count is read to the host (free there) and only the FFN rows are gathered. Elsewhere
    nothing is read back: all T*K rows go to the experts, whose grouped GEMMs stop at the last group end, so the
    zero slots are never computed and are masked out of the outputs and of the gradient instead (no host sync on
    a GPU). Measured on the CPU, the cut is ~10% faster per train step than masking (small preset)."""

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, n_ffn: int) -> Any:
        T, K = ids.shape
        order, counts = group_by_expert(ids, n_ffn)  # (T*K,) FFN slots grouped by expert, then zero slots
        if x.device.type == "cpu":
            order = order[: int(counts.sum())]  # (R,) FFN slots only
            return x[order // K], counts, (order, T, K, None)
        computed = (torch.arange(T * K, device=x.device) < counts.sum())[:, None]  # (T*K, 1)
        return torch.where(computed, x[order // K], 0.0), counts, (order, T, K, computed)

    def wait_dispatch(self, handle: Any) -> tuple[torch.Tensor, torch.Tensor]:
        rows, counts, _ = handle
        return rows, counts

    def combine(self, y: torch.Tensor, handle: Any) -> Any:
        order, T, K, computed = handle[2]
        return to_slots(y if computed is None else torch.where(computed, y, 0.0), order, T, K)

    def wait_combine(self, handle: Any) -> torch.Tensor:
        return handle


@dataclass
class InFlight:
    """An MoE call between its phases (see MoE.begin): what the router decided and the dispatcher's handle."""

    x: torch.Tensor  # (B, S, D) the input, for the output shape and the zero experts' weight * x
    probs: torch.Tensor  # (T, E+Z)
    ids: torch.Tensor  # (T, K)
    weights: torch.Tensor  # (T, K)
    handle: Any


class MoE(nn.Module):
    """Router + experts + zero experts. Named as the checkpoint: `mlp.router.classifier`, `mlp.experts`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_ffn, self.zero_type = cfg.n_routed_experts, cfg.zero_expert_type
        self.router = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size)
        self.dispatcher: TokenDispatcher = LocalDispatcher()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        """x: (B, S, D) -> (B, S, D) and the routing decisions."""
        return self.finish(self.compute(self.begin(x)))

    # Three phases, so the ScMoE layer can run its dense path while the dispatcher communicates (block.py).
    def begin(self, x: torch.Tensor) -> InFlight:
        """Route x (B, S, D) and start the dispatch."""
        x_TD = x.reshape(-1, x.shape[-1])  # (T, D)
        probs, ids, weights = self.router(x_TD)
        return InFlight(x, probs, ids, weights, self.dispatcher.dispatch(x_TD, ids, self.n_ffn))

    def compute(self, f: InFlight) -> InFlight:
        """Wait for the rows, run the experts, start the combine."""
        rows, counts = self.dispatcher.wait_dispatch(f.handle)
        f.handle = self.dispatcher.combine(self.experts(rows, counts), f.handle)
        return f

    def finish(self, f: InFlight) -> tuple[torch.Tensor, RoutingInfo]:
        """Wait for the expert outputs and sum the K slots: (B, S, D) and the routing decisions."""
        y_TKD = self.dispatcher.wait_combine(f.handle)
        x_TD = f.x.reshape(-1, f.x.shape[-1])
        return self.combine_slots(x_TD, y_TKD, f.ids, f.weights).view_as(f.x), self.routing_info(f.probs, f.ids)

    def combine_slots(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                      ) -> torch.Tensor:
        """Weighted sum over the K slots: FFN slots from y (T, K, D), zero slots as weight * x (T, D).

        One batched GEMV per token (fp32 accumulation inside the matmul), in a fixed slot order.
        """
        is_zero = ids >= self.n_ffn  # (T, K)
        ffn_weights = weights.masked_fill(is_zero, 0.0).to(y.dtype).unsqueeze(1)  # (T, 1, K)
        out = torch.bmm(ffn_weights, y).squeeze(1)  # (T, D)
        if self.zero_type == "identity":
            out = out + (weights * is_zero).sum(-1, keepdim=True).to(x.dtype) * x
        return out

    def routing_info(self, probs: torch.Tensor, ids: torch.Tensor) -> RoutingInfo:
        return RoutingInfo(probs=probs, ids=ids, n_ffn=self.n_ffn)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Token-by-slot loop (host-synced), the twin of `forward` for tests."""
        x_TD = x.reshape(-1, x.shape[-1])
        _, ids, weights = self.router(x_TD)
        out = torch.zeros_like(x_TD, dtype=torch.float32)
        for t in range(ids.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                if e < self.n_ffn:
                    y = self.experts.apply_one(e, x_TD[t])
                else:
                    y = x_TD[t] if self.zero_type == "identity" else torch.zeros_like(x_TD[t])
                out[t] += weights[t, k] * y.float()
        return out.to(x.dtype).view_as(x)

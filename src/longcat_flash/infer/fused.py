"""Inference twins of the model's modules: the same math in fewer, larger ops (decode is op-overhead-bound).

At batch 1 a decode step is ~130 GEMVs and, in the model's training-friendly form, ~2,000 small ops of a few
microseconds each. The twins, swapped in by `fuse_for_inference`, cut that down without touching model/:
  MLA    q_a_proj and kv_a_proj_with_mqa in one GEMV (SGLang's fused_qkv_a_proj_with_mqa, concatenated q first);
         RoPE on q and k in one compiled op each (decode_ops.rope) instead of ~12 small ones;
         the absorbed attention in one compiled op (decode_ops.absorbed_attention) instead of ~30;
         the mla scales folded into q_b_proj and kv_a_layernorm once (docs/architecture.md §6.1);
         W_UK and W_UV^T precomputed contiguous per head; without the kernel, absorbed attention as bmm with
         heads folded into rows, so no weight is copied per step (docs/architecture.md §6.3).
  MLP    gate_proj and up_proj in one GEMV, SwiGLU in one compiled op (decode_ops.swiglu).
  norms  RMSNorm in one compiled op (decode_ops.rms_norm; ~8 small ops otherwise, 49 norms per token on the bench
         preset), the same result up to the last bit (its sum of squares runs in another order).
  Linear the decode rows (up to kernels.MAX_DENSE_ROWS) through the GEMV kernel (kernels.dense_linear): oneDNN's
         bf16 GEMV reads a weight at ~60% of the memory's pace at batch 1, the kernel at about its pace.
  MoE    one GEMV/GEMM pair per hit expert (the model's grouped_mm CPU fallback visits all experts), combined by
         index_add without a (T*K, D) slot tensor; for a few tokens the routing goes to the host once and gate
         weights are scalars. On CPU the whole routed part for a few tokens is one kernel call, plain or
         quantized experts (grouping, both projections, SwiGLU, the weighted sum in fp32: kernels.moe_experts);
         prefill-sized batches run GEMMs per hit expert (quantized: dequantized once, or the AMX tile GEMM).
         The sum runs in expert order instead of slot order: equal up to rounding.
Each twin is tested against its model module (tests/test_infer_fused.py).

Shapes: B batch, S new tokens, L attended, D model, H heads, N/R/V head dims, C kv_lora_rank, Q q_lora_rank,
T tokens, K top-k, E FFN experts.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..model.attention import LATENT_NORM_EPS, MLA
from ..model.block import ScMoELayer
from ..model.layers import MLP, RMSNorm, apply_rope
from ..model.moe import MoE, RoutingInfo, group_by_expert
from ..model.mtp import MTPHead
from . import decode_ops, kernels
from .cache import BatchView
from .experts import use_hit_experts
from .swap import swap_generation, swap_modules

SMALL_BATCH_TOKENS = 16  # up to this many tokens the MoE routes on the host
MAX_PLANS = 64  # row counts a decode layer keeps a plan for (each holds only references to its weights)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """apply_rope in one compiled op where the kernel takes the call (bitwise the same: tests/test_infer_fused.py)."""
    y = decode_ops.rope(x, *rope)
    return apply_rope(x, *rope) if y is None else y


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return lin


class FusedMLA(MLA):
    """MLA with fused projections, folded scales and copy-free absorbed attention; naive path unchanged.

    Built as an MLA of the same config (on the meta device, so nothing is allocated), so it has every attribute
    an MLA has; then `mla`'s weights replace the meta ones, q_a_proj and kv_a_proj_with_mqa fused into one."""

    def __init__(self, mla: MLA, cfg: ModelConfig) -> None:
        with torch.device("meta"):
            super().__init__(cfg)
        del self.q_a_proj, self.kv_a_proj_with_mqa  # fused into qkv_a_proj below
        self.q_lora_rank = cfg.q_lora_rank
        H, N, V, C = self.n_heads, self.nope_dim, self.v_dim, self.kv_lora_rank
        with torch.no_grad():
            a, kv = mla.q_a_proj, mla.kv_a_proj_with_mqa
            bias = None if a.bias is None else torch.cat([a.bias, kv.bias])
            self.qkv_a_proj = _linear(torch.cat([a.weight, kv.weight]), bias)  # (Q + C + R, D)
            self.q_a_layernorm = mla.q_a_layernorm
            self.q_b_proj = _linear(mla.q_b_proj.weight * mla.q_scale)
            self.kv_a_layernorm = RMSNorm(C, LATENT_NORM_EPS).to(mla.kv_a_layernorm.weight)
            self.kv_a_layernorm.weight.copy_(mla.kv_a_layernorm.weight * mla.kv_scale)
            self.kv_b_proj, self.o_proj = mla.kv_b_proj, mla.o_proj
            w = mla.kv_b_proj.weight.view(H, N + V, C)  # in its own dtype: the kernel reads bf16 as it is
            self.register_buffer("w_uk", w[:, :N].contiguous(), persistent=False)  # (H, N, C)
            self.register_buffer("w_uv_t", w[:, N:].transpose(1, 2).contiguous(), persistent=False)  # (H, C, V)
        self.q_scale = self.kv_scale = 1.0  # folded into q_b_proj and kv_a_layernorm above

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> Any:
        weights = kernels.linear_weights(x, self.qkv_a_proj, self.q_b_proj)
        if weights is not None and (out := decode_ops.mla_project(x, weights[0], self.q_a_layernorm, weights[1],
                                                                  self.kv_a_layernorm, rope, self.n_heads)):
            return out
        B, S, _ = x.shape
        # (B, S, Q), (B, S, C+R)
        q_a, kv = self.qkv_a_proj(x).split([self.q_lora_rank, self.kv_lora_rank + self.rope_dim], dim=-1)
        q = self.q_b_proj(self.q_a_layernorm(q_a)).view(B, S, self.n_heads, -1)  # (B, S, H, N+R)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)  # (B, S, H, N), (B, S, H, R)
        latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)  # (B, S, C), (B, S, R)
        latent = self.kv_a_layernorm(latent)  # (B, S, C), scale folded in
        return q_nope, rotate(q_rope, rope), latent, rotate(k_rope, rope)

    def attend(self, projected: Any, cache: Any = None, block: int = 0, mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """MLA.attend; absorbed over the paged cache, the context is read in place by the kernel instead of first
        gathered into a copy (at 3000 tokens of context that copy was ~2 ms of a 26 ms int4 token)."""
        if not isinstance(cache, BatchView) or not cache.absorb or mask is not None:
            return super().attend(projected, cache, block, mask)
        q_nope, q_rope, latent, k_rope = projected
        o_proj = kernels.linear_weights(latent, self.o_proj)  # latent (B, S, C): o_proj's rows and dtype
        out = decode_ops.mla_attend(projected, *cache.pool_rows(block), cache.mask, self.w_uk, self.w_uv_t,
                                    self.softmax_scale, o_proj[0] if o_proj else [])
        if out is not None:
            return out if o_proj else self.o_proj(out)
        cache.store(block, latent, k_rope)
        return self.attend_absorbed(q_nope, q_rope, *cache.gather(block, q_nope.dtype), cache.mask)

    def attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                        k_rope: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """On the CPU in fp32 throughout (fp32 bmms are several times faster there than bf16 ones), in one compiled
        op where the kernel takes the call. Elsewhere the model's own path: einsums in the activation dtype, softmax
        in fp32 (a GPU's bf16 tensor cores, and no fp32 copy of the weights and the context per call)."""
        out = decode_ops.absorbed_attention(q_nope, q_rope, latent, k_rope, mask, self.w_uk, self.w_uv_t,
                                            self.softmax_scale)
        if out is not None:
            return self.o_proj(out)
        if not q_nope.is_cpu:
            return super().attend_absorbed(q_nope, q_rope, latent, k_rope, mask)
        B, S, H, N = q_nope.shape
        L, C, dtype = latent.shape[1], self.kv_lora_rank, q_nope.dtype
        latent, k_rope = latent.float(), k_rope.float()
        q_nope = q_nope.float().permute(2, 0, 1, 3).reshape(H, B * S, N)  # heads as the batch of the bmm
        q_latent = torch.bmm(q_nope, self.w_uk.float())  # (H, B*S, C); fp32 bmms: several times faster on CPU
        q_latent = q_latent.view(H, B, S, C).transpose(0, 1).reshape(B, H * S, C)  # rows (h, s) per sequence
        q_rope = q_rope.float().transpose(1, 2).reshape(B, H * S, self.rope_dim)  # (B, H*S, R)
        # rope part + latent part of every (head, query) row's score against the L cached tokens: (B, H*S, L)
        scores = torch.baddbmm(torch.bmm(q_rope, k_rope.transpose(1, 2)), q_latent, latent.transpose(1, 2))
        scores = (scores * self.softmax_scale).view(B, H, S, L).masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).view(B, H * S, L)
        out_latent = torch.bmm(probs, latent).view(B, H, S, C).transpose(0, 1).reshape(H, B * S, C)  # (H, B*S, C)
        out = torch.bmm(out_latent, self.w_uv_t.float())  # (H, B*S, V)
        out = out.view(H, B, S, self.v_dim).permute(1, 2, 0, 3).reshape(B, S, H * self.v_dim)  # (B, S, H*V)
        return self.o_proj(out.to(dtype))


class FusedMLP(nn.Module):
    """SwiGLU with gate and up in one GEMV: rows [gate | up]."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        with torch.no_grad():
            self.gate_up_proj = _linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = kernels.linear_weights(x, self.gate_up_proj, self.down_proj)
        if weights is not None:
            return decode_ops.mlp(x, *weights)
        return self.down_proj(decode_ops.swiglu(self.gate_up_proj(x)))


class FusedRMSNorm(RMSNorm):
    """RMSNorm through the compiled kernel where it takes the call (CPU, x in the weight's dtype)."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = decode_ops.rms_norm(x, self.weight, self.eps)
        return super().forward(x) if y is None else y


class FusedLinear(nn.Linear):
    """nn.Linear (the same parameters) whose decode rows go through the GEMV kernel (kernels.dense_linear)."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.dense_linear(x, self.weight, self.bias)

    def kernel_weight(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """The weight as the kernels take it for x of `dtype` (kernels.linear_weights); None with a bias or a weight
        of another dtype."""
        w = self.weight
        return [w] if self.bias is None and w.dtype is dtype and w.is_contiguous() else None


class FusedMoE(nn.Module):
    """The model's router and experts (kept as `moe`), run expert by expert with index_add combines.

    Few tokens (plain experts): routing decisions go to the host once and each hit expert's output is added with
    its gate weight as a scalar. Otherwise: a stable sort of the slots by expert, one gather of the FFN slots' rows,
    the experts module on them (grouped), one index_add; no (T*K, D) slot tensor is built. Zero experts: one
    scaled copy of x. Before either, the experts try the whole routed part in one kernel call (`routed`).
    """

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        return self.finish(self.compute(self.begin(x)))

    # The ScMoE layer's three phases; all the work happens in compute (nothing to overlap on one device).
    def begin(self, x: torch.Tensor) -> Any:
        router, x_TD = self.moe.router, x.reshape(-1, x.shape[-1])
        return x, *router.route(kernels.row_exact_linear(x_TD.float(), router.classifier.weight,
                                                         router.classifier.bias))  # logits (T, E+Z)

    def compute(self, f: Any) -> Any:
        x, probs, ids, weights = f
        x_TD = x.reshape(-1, x.shape[-1])
        out = self.moe.experts.routed(x_TD, ids, weights, self.moe.n_ffn, self.moe.zero_type == "identity")
        if out is None:  # not the kernel's call
            few = x_TD.shape[0] <= SMALL_BATCH_TOKENS
            out = (self._few if few else self._many)(x_TD, ids, weights)
        return x, probs, ids, out

    def finish(self, f: Any) -> tuple[torch.Tensor, RoutingInfo]:
        x, probs, ids, out = f
        return out.view_as(x), self.moe.routing_info(probs, ids)

    def _zero_part(self, x: torch.Tensor, zero_weight: torch.Tensor) -> torch.Tensor:
        """What the zero experts contribute: weight * x ("identity") or nothing ("drop"); (T, D)."""
        return x * zero_weight.to(x.dtype)[:, None] if self.moe.zero_type == "identity" else torch.zeros_like(x)

    def _few(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, D), T small: group the slots on the host; the groups go back to x's device as index tensors."""
        E = self.moe.n_ffn
        groups: dict[int, list[tuple[int, float]]] = {}
        zero = [0.0] * x.shape[0]
        for t, (row_ids, row_w) in enumerate(zip(ids.tolist(), weights.tolist())):
            for e, w in zip(row_ids, row_w):
                if e < E:
                    groups.setdefault(e, []).append((t, w))
                else:
                    zero[t] += w
        out = self._zero_part(x, torch.tensor(zero, device=x.device))
        for e in sorted(groups):
            rows, gate_w = zip(*groups[e])
            if len(rows) == 1:
                out[rows[0]].add_(self.moe.experts.apply_one(e, x[rows[0]][None])[0], alpha=gate_w[0])
            else:
                index = torch.tensor(rows, device=x.device)
                y = self.moe.experts.apply_one(e, x[index]) * torch.tensor(gate_w, dtype=x.dtype,
                                                                            device=x.device)[:, None]
                out.index_add_(0, index, y)
        return out

    def _many(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, D): sort the T*K slots by expert (zero experts last); the experts module runs the grouped rows
        (the plain one expert by expert, a quantized one in one kernel call per projection)."""
        E, K = self.moe.n_ffn, ids.shape[1]
        is_zero = ids >= E  # (T, K)
        out = self._zero_part(x, (weights * is_zero).sum(-1))
        order, counts = group_by_expert(ids, E)  # (T*K,) slots by expert, zero slots last; (E,)
        slots = order[: int(counts.sum())]  # the FFN slots, in expert order
        tokens, gate_w = slots // K, weights.reshape(-1)[slots].to(x.dtype)  # (R,) each: the slot's token and gate
        return out.index_add_(0, tokens, self.moe.experts(x[tokens], counts) * gate_w[:, None])


class DecodePlans:
    """For a twin that runs its decode as one compiled call on a plan of its weights (decode_ops.layer_plan): a plan
    kept for each (dtype, device, row count) seen (a server's batch changes as requests come and go; building one
    took ~130 us a layer, 9% of a batch-1 int4 token) until a module is swapped (swap_generation), the twin cast
    or loaded. The twin says which weights the plan holds (`weight_inputs`, None: the kernels do not take them)."""

    def adopt(self, module: nn.Module) -> None:
        """Start as a twin of `module` holding its children (already twins) and no plan yet."""
        nn.Module.__init__(self)
        for name, child in module.named_children():
            setattr(self, name, child)
        self.reset_plans()

    def reset_plans(self) -> None:
        self._plans: dict[tuple, Any] = {}  # the plan, or None: not the kernel's call
        self._plans_generation = swap_generation()

    def plan_for(self, x: torch.Tensor) -> Any:
        """The plan for rows like x (..., D), or None."""
        if self._plans_generation != swap_generation():
            self.reset_plans()
        key = (x.dtype, x.device, x.numel() // x.shape[-1])
        if key not in self._plans:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            inputs = self.weight_inputs(x)
            self._plans[key] = None if inputs is None else decode_ops.layer_plan(*inputs)
        return self._plans[key]

    def weight_inputs(self, x: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], dict[str, float]] | None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_plans": {}}  # a copy (or a pickle) makes its own plans

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._plans = {}  # .to(), .float() and the like replace the tensors the kept plans hold
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._plans = {}  # a load with assign=True replaces them too
        super()._load_from_state_dict(*args, **kwargs)


def decode_step(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: Any, mask: torch.Tensor | None,
                blocks: list[int]) -> tuple[torch.Tensor, ...] | None:
    """The step tensors of a compiled decode call over attention blocks `blocks`: (cos, sin, mask, write, read,
    *pools), each pool the block's; None where it does not take the call: not an absorbed decode over the paged
    cache, x not contiguous, a RoPE table or pool of another dtype than x's. The blocks store and read the same rows,
    each in its own pool."""
    if mask is not None or not isinstance(cache, BatchView) or not cache.absorb or not x.is_contiguous():
        return None
    _, write, read = cache.pool_rows(blocks[0])
    pools = [cache.pool_rows(b)[0] for b in blocks]
    cos, sin = rope[0].contiguous(), rope[1].contiguous()
    if any(t.dtype != x.dtype for t in (cos, sin, *pools)):
        return None
    return cos, sin, cache.mask, write, read, *pools


def attention_inputs(i: int, attn: FusedMLA, norm: nn.Module, linears: list[list[torch.Tensor]]
                     ) -> tuple[dict[str, list[torch.Tensor]], dict[str, float]]:
    """Attention block i of a decode plan, as csrc/decode_blocks.cpp's `attention` reads it: its input norm, its
    projections' kernel weights (qkv_a, q_b, o_proj), latent norms, absorbed weights and numbers."""
    a = f"attn{i}."
    t = {f"input_norm{i}": [norm.weight], a + "qkv_a": linears[0], a + "q_b": linears[1], a + "o_proj": linears[2],
         a + "q_norm": [attn.q_a_layernorm.weight], a + "kv_norm": [attn.kv_a_layernorm.weight],
         a + "w_uk": [attn.w_uk], a + "w_uv_t": [attn.w_uv_t]}
    f = {f"input_eps{i}": norm.eps, a + "q_eps": attn.q_a_layernorm.eps, a + "kv_eps": attn.kv_a_layernorm.eps,
         a + "scale": attn.softmax_scale, "heads": attn.n_heads}
    return t, f


def plan_dtypes_agree(x: torch.Tensor, attn: list[FusedMLA], norms: list[nn.Module]) -> bool:
    """The decode blocks' norms (and the attention blocks' latent norms) in x's dtype, absorbed weights the
    attention kernel reads."""
    same_dtype = (*norms, *(n for a in attn for n in (a.q_a_layernorm, a.kv_a_layernorm)))
    return (all(m.weight.dtype == x.dtype for m in same_dtype)
            and all(decode_ops.absorbed_weights(a.w_uk, a.w_uv_t) for a in attn))


class FusedScMoELayer(DecodePlans, ScMoELayer):
    """ScMoELayer (its children, already twins) whose decode runs as one compiled call (decode_ops.decode_layer):
    the same kernels in the layer's order, without the ~25 Python-level calls between them (bench preset, batch 1,
    int4: 10.5 against 11.4 ms a token). Anything decode_step or weight_inputs does not take runs the layer's
    forward."""

    def __init__(self, layer: ScMoELayer) -> None:
        self.adopt(layer)
        self.index = layer.index

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: Any = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingInfo]:
        step = decode_step(x, rope, cache, mask, [2 * self.index, 2 * self.index + 1])
        plan = None if step is None else self.plan_for(x)
        if plan is None:
            return super().forward(x, rope, cache, mask)
        out, probs, ids = decode_ops.decode_layer(x, plan, step)
        return out, self.mlp.moe.routing_info(probs, ids)

    def weight_inputs(self, x: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], dict[str, float]] | None:
        """The layer's weights and numbers by name for rows like x, as csrc/decode_blocks.cpp's decode_layer reads
        them; None where it does not take them: a child that is not a twin, a weight the GEMV kernels do not take,
        a norm of another dtype than x's."""
        attn, mlps, moe = self.self_attn, self.mlps, self.mlp
        if (not isinstance(moe, FusedMoE) or not all(isinstance(m, FusedMLP) for m in mlps)
                or not all(isinstance(a, FusedMLA) for a in attn)):
            return None
        linears = kernels.linear_weights(x, *(lin for a in attn for lin in (a.qkv_a_proj, a.q_b_proj, a.o_proj)),
                                         *(lin for m in mlps for lin in (m.gate_up_proj, m.down_proj)))
        experts, router = moe.moe.experts, moe.moe.router
        if linears is None or not hasattr(experts, "stacked") or router.classifier.weight.dtype != torch.float32:
            return None
        gate_up, down = experts.stacked("gate_up_proj"), experts.stacked("down_proj")
        expert_rows = kernels.moe_row_limit(x, gate_up, down)
        if expert_rows is None or x.numel() // x.shape[-1] > expert_rows:  # then no hit expert can get more rows
            return None
        norms = [*self.input_layernorm, *self.post_attention_layernorm]
        if not plan_dtypes_agree(x, list(attn), norms):
            return None
        t: dict[str, list[torch.Tensor]] = {
            "post_norm0": [norms[2].weight], "post_norm1": [norms[3].weight],
            "router": [router.classifier.weight], "correction": [router.e_score_correction_bias],
            "router_bias": [] if router.classifier.bias is None else [router.classifier.bias.float()],
            "experts.gate_up": gate_up, "experts.down": down,
            "mlp0.gate_up": linears[6], "mlp0.down": linears[7], "mlp1.gate_up": linears[8], "mlp1.down": linears[9]}
        f: dict[str, float] = {
            "post_eps0": norms[2].eps, "post_eps1": norms[3].eps, "top_k": router.top_k, "router_scale": router.scale,
            "renormalize": float(router.renormalize), "n_ffn": moe.moe.n_ffn, "expert_rows": expert_rows,
            "identity": float(moe.moe.zero_type == "identity")}
        for i, a in enumerate(attn):
            block_t, block_f = attention_inputs(i, a, norms[i], linears[3 * i:3 * i + 3])
            t.update(block_t)
            f.update(block_f)
        return t, f


class FusedMTPHead(DecodePlans, MTPHead):
    """MTPHead (its children, already twins) whose decode, the speculative draft, runs as one compiled call
    (decode_ops.mtp_head) instead of ~12 Python-level ones. Anything decode_step or weight_inputs does not take
    runs the head's forward."""

    def __init__(self, head: MTPHead) -> None:
        self.adopt(head)
        self.block = head.block

    def forward(self, next_tokens: torch.Tensor, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: Any = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        step = decode_step(hidden, rope, cache, mask, [self.block])
        plan = None if step is None else self.plan_for(hidden)
        if plan is None:
            return super().forward(next_tokens, hidden, rope, cache, mask)
        return decode_ops.mtp_head(next_tokens, hidden, plan, step)

    def weight_inputs(self, x: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], dict[str, float]] | None:
        """The head's weights and numbers by name for rows like x, as csrc/decode_blocks.cpp's mtp_head reads
        them; None where it does not take them (as FusedScMoELayer.weight_inputs)."""
        attn, mlp = self.self_attn, self.mlp
        if not isinstance(attn, FusedMLA) or not isinstance(mlp, FusedMLP):
            return None
        linears = kernels.linear_weights(x, self.eh_proj, attn.qkv_a_proj, attn.q_b_proj, attn.o_proj,
                                         mlp.gate_up_proj, mlp.down_proj)
        norms = [self.enorm, self.hnorm, self.input_layernorm, self.post_attention_layernorm, self.norm]
        if linears is None or self.embed_tokens.weight.dtype != x.dtype or not plan_dtypes_agree(x, [attn], norms):
            return None
        t, f = attention_inputs(0, attn, self.input_layernorm, linears[1:4])
        t.update({"embed": [self.embed_tokens.weight], "enorm": [self.enorm.weight], "hnorm": [self.hnorm.weight],
                  "eh_proj": linears[0], "post_norm0": [self.post_attention_layernorm.weight],
                  "mlp0.gate_up": linears[4], "mlp0.down": linears[5], "norm": [self.norm.weight]})
        f.update({"enorm_eps": self.enorm.eps, "hnorm_eps": self.hnorm.eps,
                  "post_eps0": self.post_attention_layernorm.eps, "norm_eps": self.norm.eps})
        return t, f


def fuse_for_inference(model: nn.Module, moe: bool = True) -> int:
    """Swap MLA, MLP, MoE (unless `moe` is False), RMSNorm, Linear and ScMoE layer modules for their twins, in place;
    returns how many. Call before quantizing (which replaces the Linear twins it quantizes; quantized experts need
    the MoE twin). The MoE twin reads the routing to the host and loops over the hit experts: cheap on a CPU, while
    on a GPU each read is a sync and each expert a few small kernels, where the model's MoE runs one grouped GEMM
    per projection with no host round trip (infer/loader.py keeps it there for unquantized weights)."""
    twins = {MLA: functools.partial(FusedMLA, cfg=model.config), MLP: FusedMLP, **({MoE: FusedMoE} if moe else {})}
    hit = use_hit_experts(model) if moe else []  # first, inside the MoEs: FusedMoE runs `experts.apply_one`
    fused = swap_modules(model, lambda _, m: twins[type(m)](m) if type(m) in twins else None)
    leaves = {RMSNorm: FusedRMSNorm, nn.Linear: FusedLinear}  # the twins' own too
    rest = swap_modules(model, lambda _, m: leaves[type(m)](m) if type(m) in leaves else None)
    blocks = {ScMoELayer: FusedScMoELayer, MTPHead: FusedMTPHead}  # last: their children are twins by now
    whole = swap_modules(model, lambda _, m: blocks[type(m)](m) if type(m) in blocks else None)
    return len(hit) + len(fused) + len(rest) + len(whole)

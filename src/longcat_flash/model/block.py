"""The shortcut-connected MoE (ScMoE) layer: two attention blocks, two dense FFNs and one MoE on a shortcut.

        x ──► norm_a0 ──► MLA_0 ──(+)──► x1
                                          │
                                  norm_f0 ├──► s ─────────────► MoE(s) ───────────────┐  (dispatch/combine
                                          │                                            │   can hide behind
        x1 ──────────────────── FFN_0(s) (+)──► x2                                     │   everything on the
        x2 ──► norm_a1 ──► MLA_1 ──────(+)──► x3                                       │   left: report §2.2)
        x3 ──► norm_f1 ──► FFN_1 ──────(+)──────────────────────────────────────────(+)──► out

    out = x3 + FFN_1(norm_f1(x3)) + MoE(s),  s = norm_f0(x1)   (docs/architecture.md §4)

The forward runs in the order of the report's single-batch overlap (§6.1.1), so an asynchronous dispatcher
(distributed/expert_parallel.py) hides its all-to-alls behind the dense path; with the local dispatcher the
order changes nothing, since the pieces are independent until the final sum:
    stage 1  MLA_0                                   alone: everything else reads its output
    stage 2  route, start dispatch  ||  FFN_0, MLA_1's QKV projections
    stage 3  expert GEMMs, start combine
    stage 4  combine in flight      ||  MLA_1's core attention and output projection, FFN_1

Shapes: B batch, S sequence, D model dim.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA, LatentCache
from .layers import MLP, RMSNorm
from .moe import MoE, RoutingInfo


class ScMoELayer(nn.Module):
    """One LongCat-Flash layer. Attention blocks 2*i and 2*i+1 of the model live here."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.input_layernorm = nn.ModuleList([RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) for _ in range(2)])
        self.self_attn = nn.ModuleList([MLA(cfg) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
                                                       for _ in range(2)])
        self.mlps = nn.ModuleList([MLP(cfg.hidden_size, cfg.ffn_hidden_size) for _ in range(2)])
        self.mlp = MoE(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LatentCache | None = None, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RoutingInfo]:
        """x: (B, S, D) -> (B, S, D) and this layer's routing. Stages as in the module docstring; `mask`
        (B, S, S): the attention mask of packed documents (None: causal)."""
        attn0, attn1 = self.self_attn
        x1 = x + attn0(self.input_layernorm[0](x), rope, cache, block=2 * self.index, mask=mask)
        s = self.post_attention_layernorm[0](x1)  # the shortcut: MoE and FFN_0 share it
        moe = self.mlp.begin(s)
        x2 = x1 + self.mlps[0](s)
        projected = attn1.project(self.input_layernorm[1](x2), rope)
        moe = self.mlp.compute(moe)
        x3 = x2 + attn1.attend(projected, cache, block=2 * self.index + 1, mask=mask)
        out = x3 + self.mlps[1](self.post_attention_layernorm[1](x3))
        moe_out, routing = self.mlp.finish(moe)
        return out + moe_out, routing

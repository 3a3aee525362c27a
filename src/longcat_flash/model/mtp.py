"""The single dense MTP head (report §2.4, §6.1.2, docs/architecture.md §8): predicts token t+2 from token t+1 and h_t.

    z = eh_proj([enorm(embed(x_{t+1})) | hnorm(h_t)])       embedding first, hidden second
    z = z + MLA(input_layernorm(z));  z = z + MLP(post_attention_layernorm(z))
    return norm(z)                                            -> the trunk's lm_head

h_t is the trunk's final hidden state after `model.norm`. Checkpoint quirks (`enorm.m`, `hnorm.m`,
`transformer_layer.mlp`) are mapped in checkpoint/hf.py, not here.

Shapes: B batch, S sequence, D model dim.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA, LatentCache
from .layers import MLP, RMSNorm


class MTPHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.block = cfg.num_attention_blocks  # its attention block index, after the trunk's
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)  # its own copy, as in the checkpoint
        self.enorm, self.hnorm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = MLP(d, cfg.ffn_hidden_size)
        self.norm = RMSNorm(d, eps)

    def forward(self, next_tokens: torch.Tensor, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LatentCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """next_tokens: (B, S) ids of x_{t+1}; hidden: (B, S, D) normed h_t -> (B, S, D) for the lm_head.
        mask: (B, S, S) attention mask of packed documents (None: causal)."""
        z = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(next_tokens)), self.hnorm(hidden)], dim=-1))
        z = z + self.self_attn(self.input_layernorm(z), rope, cache, block=self.block, mask=mask)
        z = z + self.mlp(self.post_attention_layernorm(z))
        return self.norm(z)

"""Multi-head Latent Attention (MLA) with LongCat-Flash's variance-alignment scales.

Two ways to attend, same math (docs/architecture.md §6):
  naive     expand the latent with kv_b_proj into per-head K and V, then ordinary attention (training, prefill)
  absorbed  fold kv_b_proj into the query and output sides and attend over the latent directly (decode)

Shapes: B batch, S query length, L attended (cached) length, D model dim, H heads, C kv_lora_rank,
R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, Q q_lora_rank.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, apply_rope

# transformers builds q_a_layernorm / kv_a_layernorm without passing rms_norm_eps, so they use 1e-6.
LATENT_NORM_EPS = 1e-6

Projected = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # q_nope, q_rope, latent, k_rope


class LatentCache(Protocol):
    """What the attention needs from a KV cache; implemented outside the model (infer/cache.py).

    `absorb` is the batch's choice of attention path: True attends over the latent (absorbed), False expands it
    (naive). It travels with the cache view of one forward because the caller picks it per batch (the absorbed
    path is cheaper for a few new tokens per row, the naive one for long prefill chunks)."""

    absorb: bool

    def update(self, block: int, latent: torch.Tensor, k_rope: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this step's latent (B, S, C) and rotated rope key (B, S, R) for attention block `block`.

        Returns everything each sequence may attend to: latent (B, L, C), k_rope (B, L, R) and a boolean
        mask (B, S, L), True where query s may attend to cached slot l (causal and within the sequence); or None
        for plain causal attention over the same S tokens (every row a first chunk; naive path only).
        """
        ...


class MLA(nn.Module):
    """One MLA block. Module names follow the official checkpoint (`self_attn.{j}.q_a_proj`, ...)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_lora_rank = cfg.num_attention_heads, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope_dim,
                                            bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_scale, self.kv_scale = cfg.q_lora_scale, cfg.kv_lora_scale
        self.softmax_scale = cfg.softmax_scale  # 1/sqrt(qk_head_dim) (x YaRN mscale^2); unchanged by absorption

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LatentCache | None = None, block: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, D) -> (B, S, D). Without a cache: causal self-attention over x itself, or, with `mask`
        (B, S, S) True where query s may attend to key l, attention under that mask (packed documents)."""
        return self.attend(self.project(x, rope), cache, block, mask)

    # Two halves, so the ScMoE layer can place them on either side of the MoE GEMMs (report §6.1.1, block.py).
    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> Projected:
        """The QKV projections: q_nope (B, S, H, N), q_rope (B, S, H, R), latent (B, S, C), k_rope (B, S, R)."""
        return (*self.queries(x, rope), *self.latents(x, rope))

    def attend(self, projected: Projected, cache: LatentCache | None = None, block: int = 0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Core attention and output projection over `project`'s tensors -> (B, S, D); `mask` as in forward."""
        q_nope, q_rope, latent, k_rope = projected
        if cache is None:
            return self.attend_naive(q_nope, q_rope, latent, k_rope, mask)
        if mask is not None:
            raise ValueError("a document mask is for uncached forwards (training); a cache brings its own mask")
        latent, k_rope, mask = cache.update(block, latent, k_rope)
        attend = self.attend_absorbed if cache.absorb else self.attend_naive
        return attend(q_nope, q_rope, latent, k_rope, mask)

    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank query, scaled by sqrt(D/Q) on both parts (report §2.3.1): (B, S, H, N), (B, S, H, R)."""
        B, S, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, S, self.n_heads, -1)  # (B, S, H, N+R)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope * self.q_scale, apply_rope(q_rope * self.q_scale, *rope)

    def latents(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached quantities: normalised latent scaled by sqrt(D/C) (B, S, C) and rotated k_rope (B, S, R)."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent) * self.kv_scale, apply_rope(k_rope, *rope)

    def attend_naive(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                     k_rope: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Expand the latent into per-head K/V and run SDPA; `mask=None` means causal over the same tokens."""
        B, S, H, _ = q_nope.shape
        L = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, L, H, self.nope_dim + self.v_dim)  # (B, L, H, N+V)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, S, N+R)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, L, H, self.rope_dim)], dim=-1).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None]  # (B, 1, S, L)
        # V zero-padded to the QK head dim: CPU SDPA's flash kernel needs equal dims (else the ~3x slower math
        # path); the padded output columns are zeros and sliced off (docs/architecture.md §6.2: HF pads the same way).
        pad = self.nope_dim + self.rope_dim - self.v_dim
        v = F.pad(v, (0, pad)) if pad > 0 else v  # (B, L, H, max(N+R, V))
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=attn_mask,
                                             is_causal=mask is None and S > 1, scale=self.softmax_scale)
        out = out[..., : self.v_dim]  # (B, H, S, V)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * self.v_dim))  # (B, S, H*V) -> (B, S, D)

    def attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                        k_rope: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend over the latent: W_UK folded into the query, W_UV applied after (docs/architecture.md §6.3)."""
        B, S, H, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)  # (H, N+V, C)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # (H, N, C), (H, V, C)
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_uk.to(q_nope.dtype))  # (B, S, H, C)
        scores = (torch.einsum("bshc,blc->bhsl", q_latent, latent)
                  + torch.einsum("bshr,blr->bhsl", q_rope, k_rope)).float() * self.softmax_scale  # (B, H, S, L)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).nan_to_num(0.0).to(latent.dtype)  # rows with no slot (padding) give 0
        out_latent = torch.einsum("bhsl,blc->bshc", probs, latent)  # (B, S, H, C)
        out = torch.einsum("bshc,hvc->bshv", out_latent, w_uv.to(out_latent.dtype))  # (B, S, H, V)
        return self.o_proj(out.reshape(B, S, H * self.v_dim))

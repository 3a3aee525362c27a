"""The whole model: embed -> ScMoE layers -> norm -> lm_head, plus the optional MTP head.

Module names mirror the official checkpoint (`model.embed_tokens`, `model.layers.{i}...`, `model.norm`,
`lm_head`, `model.mtp...`), so loading is a near-direct copy (checkpoint/hf.py). The forward returns tensors
in a ModelOutput, never a loss: losses live in train/losses.py.

Shapes: B batch, S sequence, D model dim, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .attention import LatentCache
from .block import ScMoELayer
from .layers import RMSNorm, RotaryEmbedding
from .moe import Experts, Router, RoutingInfo
from .mtp import MTPHead


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, S, V); None when compute_logits=False
    hidden: torch.Tensor  # (B, S, D) last layer output before the final norm (hidden z-loss)
    final_hidden: torch.Tensor  # (B, S, D) after the final norm: what lm_head and the MTP head read
    routing: list[RoutingInfo] = field(default_factory=list)  # one per layer
    mtp_logits: torch.Tensor | None = None  # (B, S-1, V): position t predicts token t+2
    mtp_hidden: torch.Tensor | None = None  # (B, S-1, D) what the lm_head reads for mtp_logits


def document_starts(documents: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (B, S) True where a document starts: a document is a run of equal ids, so an id
    seen again after another one ([0, 0, 1, 1, 0, 0]) starts a third document, not the first one's continuation."""
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return starts


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (B, S) each token's position inside its document."""
    B, S = documents.shape
    index = torch.arange(S, device=documents.device).expand(B, S)
    return index - torch.where(document_starts(documents), index, 0).cummax(dim=1).values


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (B, S, S) True where query s may attend to key l: causal, same document."""
    S = documents.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=documents.device).tril()
    runs = document_starts(documents).cumsum(dim=1)  # (B, S) each token's document, numbered along the row
    return (runs[:, :, None] == runs[:, None, :]) & causal


class Backbone(nn.Module):
    """Everything under the checkpoint's `model.` prefix."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([ScMoELayer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding.from_config(cfg)
        self.mtp = MTPHead(cfg) if cfg.num_nextn_predict_layers else None


class Transformer(nn.Module):
    """LongCat-Flash for causal LM. Single device; caches and expert dispatch plug in through seams."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> Transformer:
        """nn.Module.to_empty gives each parameter its own storage, which would untie a tied lm_head: re-tie it.
        It leaves every tensor uninitialised: the rotary table, computed from the config, is rebuilt here; the
        weights and the router biases are `init_weights`' (or a checkpoint's)."""
        super().to_empty(device=device, recurse=recurse)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rotary()
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, *, compute_logits: bool = True,
                with_mtp: bool = False, documents: torch.Tensor | None = None) -> ModelOutput:
        """input_ids: (B, S) integer ids. positions: (B, S), default 0..S-1 in every row; pass them (and a cache)
        for incremental decoding.

        with_mtp: also run the MTP head over the sequence (training): position t reads token t+1 and h_t.
        compute_logits=False skips the lm_head (for the trunk and the MTP head): the caller applies it itself,
        e.g. chunk by chunk (train/losses.py).
        documents: (B, S) ids of the packed documents each token belongs to (a document is a run of equal ids):
        attention stays inside a document (trunk and MTP head) and positions restart at 0 in each, so every
        document is computed as if alone (SFT packing). None: one causal sequence per row, the plain path.
        """
        _check_inputs(input_ids, positions, documents, with_mtp)
        B, S = input_ids.shape
        mask = None
        if documents is not None:
            if positions is not None or cache is not None:
                raise ValueError("documents set the positions and the mask themselves; pass neither positions "
                                 "nor a cache with them")
            positions, mask = document_positions(documents), document_mask(documents)
        if positions is None:
            positions = torch.arange(S, device=input_ids.device).expand(B, S)
        try:
            x = self.model.embed_tokens(input_ids)  # (B, S, D)
        except IndexError:  # the CPU's "index out of range in self", said of the input (no sync to check first)
            raise ValueError(f"input_ids hold ids outside the vocabulary (0 to {self.config.vocab_size - 1})") from None
        rope = self.model.rotary(positions, x.dtype)
        routing = []
        for layer in self.model.layers:
            x, info = layer(x, rope, cache, mask)
            routing.append(info)
        final = self.model.norm(x)
        out = ModelOutput(logits=self.lm_head(final) if compute_logits else None, hidden=x,
                          final_hidden=final, routing=routing)
        if with_mtp:
            if self.model.mtp is None:
                raise ValueError("with_mtp=True needs a config with num_nextn_predict_layers=1")
            mtp_rope = tuple(t[:, :-1] for t in rope)
            mtp_mask = None if mask is None else mask[:, :-1, :-1]  # (B, S-1, S-1)
            out.mtp_hidden = self.model.mtp(input_ids[:, 1:], final[:, :-1], mtp_rope, mask=mtp_mask)
            out.mtp_logits = self.lm_head(out.mtp_hidden) if compute_logits else None
        return out

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """normal(0, std) for matrices and embeddings, ones for norms, zeros for biases and the router bias."""
        std = self.config.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, 0.0, std)
                nn.init.normal_(module.down_proj, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Zero router biases and a fresh rotary table on the model's device."""
        for router in self.routers():
            router.e_score_correction_bias.zero_()
        self.init_rotary()

    def init_rotary(self) -> None:
        """The rotary table computed afresh on the model's device (a non-persistent buffer: in no checkpoint)."""
        self.model.rotary = RotaryEmbedding.from_config(self.config).to(self.lm_head.weight.device)

    def routers(self) -> list[Router]:
        """The trunk's routers in layer order (the budget controller writes their biases)."""
        return [layer.mlp.router for layer in self.model.layers]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_inputs(input_ids: torch.Tensor, positions: torch.Tensor | None, documents: torch.Tensor | None,
                  with_mtp: bool) -> None:
    """Shapes only (no device sync): a 1-D `positions` broadcast one position per row, silently wrong when B == S,
    and float ids or an empty batch failed deep inside attention."""
    if (input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool
            or input_ids.numel() == 0):
        raise ValueError(f"input_ids must be integer token ids of shape (batch, tokens), both at least 1, got "
                         f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
    for name, t in (("positions", positions), ("documents", documents)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)} (one per token), got "
                             f"{tuple(t.shape)}")
    if with_mtp and input_ids.shape[1] < 2:
        raise ValueError("with_mtp needs at least 2 tokens per row (the MTP head reads token t+1)")

"""Training losses, pure functions of the model's outputs (report §2.1.2, §3.1.3; the MTP head §2.4, §6.1.2).

    loss = lm + mtp_weight * mtp + z_weight * z + balance_alpha * balance

Each term is returned unweighted (so metrics stay comparable when a weight changes); `training_losses` applies
the weights. Shapes: B batch, S sequence, V vocabulary, D model dim, T tokens, E FFN experts, Z zero experts,
K top-k, G number of FFN expert groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data import IGNORE, PADDING
from ..model import ModelOutput
from ..model.moe import histogram
from .config import LossConfig


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy in fp32: logits (B, S, V), targets (B, S) -> scalar, the mean over the targets
    that are not IGNORE (SFT trains on assistant tokens only), or their sum divided by `tokens` (see
    `training_losses`)."""
    if tokens is None:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum") / tokens


def chunked_lm_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int,
                    tokens: torch.Tensor | None = None) -> torch.Tensor:
    """`lm_loss(head(hidden), targets)` without the whole (tokens, V) logits at once: hidden (B, S, D), targets
    (B, S). Each chunk of `chunk` tokens computes its logits, its cross-entropy sum, and frees them; backward
    recomputes them chunk by chunk (activation checkpointing), so at most (chunk, V) logits live at a time.
    Equal to the unchunked loss up to the summation order."""
    h, t = hidden.flatten(0, 1), targets.flatten()  # (N, D), (N,)
    if chunk <= 0 or h.shape[0] <= chunk:
        return lm_loss(head(h)[None], t[None], tokens)
    total = sum(checkpoint(_cross_entropy_sum, h[i:i + chunk], t[i:i + chunk], head, use_reentrant=False)
                for i in range(0, h.shape[0], chunk))
    return total / ((t != IGNORE).sum() if tokens is None else tokens)


def _cross_entropy_sum(h: torch.Tensor, t: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum", ignore_index=IGNORE)


def mtp_targets(targets: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S-1) targets of the MTP head: position t predicts token t+2, which is targets[:, t+1] (targets (B, S)
    are the inputs shifted by one). With packed documents (B, S) the prediction counts only when t and t+1 are in
    the same document (targets[:, t+1] already never crosses one)."""
    if documents is None:
        return targets[:, 1:]
    return targets[:, 1:].masked_fill(documents[:, 1:] != documents[:, :-1], IGNORE)


def mtp_loss(mtp_logits: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None = None,
             tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Next-next-token cross-entropy of mtp_logits (B, S-1, V) against `mtp_targets(targets, documents)`."""
    return lm_loss(mtp_logits, mtp_targets(targets, documents), tokens)


def target_counts(targets: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
    """(2,) how many LM and MTP targets count (are not IGNORE) in targets (B, S) of packed `documents`."""
    return torch.stack([(targets != IGNORE).sum(), (mtp_targets(targets, documents) != IGNORE).sum()])


def hidden_z_loss(hidden: torch.Tensor, real: torch.Tensor | None = None, count: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Report eq. 10 without λ: mean over tokens of (log Σ_i exp|z_t,i|)², z = last hidden before the final norm;
    real (B, S): the tokens that count (not a packed window's padding), None: all; count: their sum's divisor
    instead of their number (as `tokens` is the LM loss's: see `training_losses`).

    It penalises massive activations; a tiny λ keeps the hidden norm stable without hurting the LM loss.
    """
    lse = torch.logsumexp(hidden.float().abs(), dim=-1)  # (B, S)
    if real is None:
        return lse.pow(2).mean()
    return (lse.pow(2) * real).sum() / (real.sum().clamp(min=1) if count is None else count)


def real_tokens(documents: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) True but at a packed window's padding (document id PADDING); None (all real) without documents."""
    return None if documents is None else documents != PADDING


def layer_counts(out: ModelOutput, real: torch.Tensor | None = None) -> torch.Tensor:
    """(L, E+Z) selections of each expert in each layer, of the real (B, S) tokens only: the budget controller's
    and the balance loss's counts."""
    flat = None if real is None else real.reshape(-1)
    return torch.stack([routed_counts(r.ids, r.probs.shape[-1], flat) for r in out.routing])


def routed_counts(ids: torch.Tensor, n: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) selections of each expert in ids (T, K), of the real (T,) tokens only (a packed window's padding is
    routed too, all one id onto the same experts: counted, it moved the budget controller and the balance)."""
    if real is None:
        return histogram(ids, n)
    return histogram(ids.masked_fill(~real[:, None], n), n + 1)[:n]  # padding into a bin of its own, dropped


def balance_loss(probs: torch.Tensor, ids: torch.Tensor, n_ffn: int, groups: int, target: float,
                 selections: torch.Tensor | None = None, real: torch.Tensor | None = None,
                 count: torch.Tensor | None = None) -> torch.Tensor:
    """Device-level load balance with the zero experts as group D+1 (report §2.1.2), without α, for one layer.

        L = Σ_j f_j P_j,  P_j = (1/T) Σ_t Σ_{i in group j} p_t,i
        f_j = D / (K_e T) · #selections in group j   (FFN groups j <= D)
        f_{D+1} = 1 / ((K - K_e) T) · #selections of zero experts

    probs (T, E+Z) fp32 router softmax, ids (T, K). Selections are counted per slot, so every f_j is 1 when
    the FFN groups share K_e slots per token evenly and the zero experts take the other K - K_e; the
    minimum of L then sits at that split (f carries no gradient: it comes from the top-k choice).

    selections: (E+Z,) selections per expert over the whole batch when it is split over data-parallel ranks;
    f then counts the global batch and P this rank's tokens, so the mean over ranks of L, and of its
    gradient, is the one-process value (docs/expert_parallel.md). None: count `ids`.
    real: (T,) the tokens that count (not padding; `selections` then counts them alone too), None: all;
    count: P's T instead of their number: the mean over the ranks of theirs, so that P is the global batch's.
    """
    K = ids.shape[1]
    n_zero = probs.shape[-1] - n_ffn
    n_groups = groups + (1 if n_zero else 0)
    tokens = ids.shape[0] if real is None else real.sum().clamp(min=1) if count is None else count  # P's T
    if real is not None:
        probs = probs * real[:, None]
    if selections is None:
        selections = routed_counts(ids, probs.shape[-1], real)
        counted = tokens  # f's T
    else:
        counted = selections.sum() / K  # f's T: the tokens of the global batch
    counts = torch.cat([selections[:n_ffn].view(groups, -1).sum(-1), selections[n_ffn:].sum().view(1)])[:n_groups]
    scale = torch.full((n_groups,), groups / target, dtype=probs.dtype, device=probs.device)
    if n_zero:
        scale[groups] = 1.0 / (K - target)
    f = counts.to(probs.dtype) * scale / counted  # (G+1,)
    p_expert = probs.sum(0) / tokens  # (E+Z,)
    p = p_expert[:n_ffn].view(groups, -1).sum(-1)  # (G,)
    if n_zero:
        p = torch.cat([p, p_expert[n_ffn:].sum().view(1)])
    return (f * p).sum()


@dataclass
class LossTerms:
    """Scalars for one micro-batch; `total` is what is differentiated, the rest are unweighted terms."""

    total: torch.Tensor
    lm: torch.Tensor
    z: torch.Tensor
    balance: torch.Tensor  # mean over layers
    mtp: torch.Tensor | None  # None while the MTP head is not trained


def training_losses(out: ModelOutput, targets: torch.Tensor, cfg: LossConfig, n_ffn: int, target: float,
                    selections: torch.Tensor | None = None, head: nn.Module | None = None,
                    documents: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                    real: torch.Tensor | None = None, real_counts: torch.Tensor | None = None) -> LossTerms:
    """All terms for one forward pass; MTP only when the model was run with `with_mtp=True`.

    selections: (L, E+Z) router counts of the global batch under data parallelism (see `balance_loss`).
    head: the lm_head, for a forward run with compute_logits=False: the LM and MTP cross-entropies then apply it
    in chunks of `cfg.logits_chunk` tokens (`chunked_lm_loss`).
    documents: (B, S) document ids of packed inputs (the forward's); the MTP prediction at t (from token t+1)
    then counts only when t and t+1 are in the same document. IGNORE targets count in neither loss.
    tokens: (2,) the LM and MTP divisors instead of this micro-batch's own target counts: with targets that vary
    in number between micro-batches and ranks (SFT), the mean number per micro-batch over the whole step, so
    that the terms averaged over micro-batches and ranks are the means over every target of the step.
    real: (B, S) the tokens that are not a packed window's padding (`real_tokens`): the z-loss and the balance
    loss count them alone (`selections` then counts them alone too). real_counts: (2,) their divisors, means over
    the ranks: the number per micro-batch over the whole step (the z-loss's, as `tokens`) and this micro-batch's
    (the balance's P), so that neither moves with how the padding falls between micro-batches and ranks."""
    lm_tokens, mtp_tokens = (None, None) if tokens is None else tokens
    if out.logits is None:
        lm = chunked_lm_loss(out.final_hidden, head, targets, cfg.logits_chunk, lm_tokens)
    else:
        lm = lm_loss(out.logits, targets, lm_tokens)
    z_count, p_count = (None, None) if real_counts is None else real_counts
    z = hidden_z_loss(out.hidden, real, z_count)
    flat = None if real is None else real.reshape(-1)  # (T,) as the routing's tokens
    balance = torch.stack([balance_loss(r.probs, r.ids, n_ffn, cfg.balance_groups, target,
                                        None if selections is None else selections[i], flat, p_count)
                           for i, r in enumerate(out.routing)]).mean()
    total = lm + cfg.z_weight * z + cfg.balance_alpha * balance
    mtp = None
    if out.mtp_logits is not None:
        mtp = mtp_loss(out.mtp_logits, targets, documents, mtp_tokens)
    elif out.mtp_hidden is not None:
        mtp = chunked_lm_loss(out.mtp_hidden, head, mtp_targets(targets, documents), cfg.logits_chunk, mtp_tokens)
    if mtp is not None:
        total = total + cfg.mtp_weight * mtp
    return LossTerms(total=total, lm=lm, z=z, balance=balance, mtp=mtp)

"""MTP speculative decoding: the MTP head drafts k tokens, one trunk forward verifies them (report §6.1.2, docs/mtp.md).

Round for one sequence whose last token x_T (position T) is pending and whose drafts d_1..d_k are ready:
  verify   the trunk runs [x_T, d_1..d_k] at positions T..T+k in one forward -> target distributions p_0..p_k
  accept   draft d_i survives with probability min(1, p(d_i) / q(d_i)) (always, when greedy and d_i is the argmax);
           the first rejection is replaced by a draw from norm(max(0, p - q)); if all k survive, a bonus token is
           drawn from p_k. The emitted tokens then follow the target distribution exactly (Leviathan et al. 2023).
  rollback the cache is truncated after the last accepted position.
  extend   the MTP head runs over the accepted positions with the true trunk hiddens, which rewrites its own cache
           entries exactly, and its last output drafts d'_1;
  chain    d'_2..d'_k feed the MTP head its own output hidden in place of the trunk's (not yet computed) one.
Greedy drafting + greedy acceptance reproduce plain greedy decoding token for token.

Shapes: B rows, S tokens per row, D model dim, V vocabulary, k drafts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import PagedLatentCache, padded_batch
from .sampling import SamplingParams, argmax, draw, probabilities


@dataclass
class Draft:
    tokens: list[int]  # d_1..d_k
    probs: torch.Tensor  # (k, V) the distributions they were drawn from; (0,) when greedy: verify reads none then


@dataclass
class DraftStats:
    """Running totals over verification rounds. A round that ends its request (max_new_tokens, EOS, a stop token)
    counts only the drafts and tokens up to that end: the rest were verified but never used."""

    rounds: int = 0  # verification forwards (per sequence)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens the rounds added to outputs: accepted drafts + the corrected or bonus token

    def __sub__(self, before: DraftStats) -> DraftStats:
        return DraftStats(self.rounds - before.rounds, self.drafted - before.drafted,
                          self.accepted - before.accepted, self.emitted - before.emitted)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts / proposed drafts; None before any draft."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens emitted per verification forward; None before any round."""
        return self.emitted / self.rounds if self.rounds else None


def verify(target_logits: torch.Tensor, draft: Draft, params: SamplingParams,
           generator: torch.Generator) -> list[int]:
    """target_logits (k+1, V) at positions T..T+k -> the emitted tokens: accepted drafts + one more token."""
    if params.greedy:
        target = argmax(target_logits).tolist()
        out = []
        for d, t in zip(draft.tokens, target):
            if d != t:
                return out + [t]
            out.append(d)
        return out + [target[-1]]
    p = probabilities(target_logits, params)  # (k+1, V)
    out = []
    for i, d in enumerate(draft.tokens):
        q_d = float(draft.probs[i, d])
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * q_d < float(p[i, d]):  # u < p/q, without dividing by 0
            out.append(d)
            continue
        residual = (p[i] - draft.probs[i]).clamp(min=0.0)
        return out + [draw(residual if residual.sum() > 0 else p[i], generator)]
    return out + [draw(p[-1], generator)]


class MTPDrafter:
    """Runs the MTP head for a batch of rows over the shared paged cache (its block is the last one)."""

    def __init__(self, model: torch.nn.Module, cache: PagedLatentCache, k: int) -> None:
        if model.model.mtp is None:
            raise ValueError("speculative decoding needs a model with an MTP head (num_nextn_predict_layers=1)")
        if k < 1:
            raise ValueError(f"speculative draft length must be >= 1, got {k}")
        self.model, self.cache, self.k = model, cache, k

    def _mtp(self, seqs: list[int], ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor
             ) -> torch.Tensor:
        """One MTP forward: host ids (B, S) of x_{t+1} and positions (B, S) t (-1 = padding), hidden (B, S, D) h_t
        on the model's device."""
        view = self.cache.view(seqs, positions)
        ids, positions = (t.to(hidden.device, non_blocking=True) for t in (ids, positions.clamp(min=0)))
        rope = self.model.model.rotary(positions, hidden.dtype)
        return self.model.model.mtp(ids, hidden, rope, view)  # (B, S, D) normed, what lm_head reads

    def extend(self, seqs: list[int], next_ids: list[list[int]], hidden: torch.Tensor, starts: list[int]
               ) -> torch.Tensor:
        """The MTP head over rows of varying length, (re)writing its cache entries there -> each row's last output
        (B, D), which predicts the row's first draft.

        Row b covers positions starts[b] .. starts[b]+n_b-1 with tokens next_ids[b] (x_{t+1}, length n_b) and the
        trunk's final hiddens hidden[b, :n_b].
        """
        ids, positions = padded_batch(next_ids, starts)  # (B, S) each, on the host
        last = [len(row) - 1 for row in next_ids]
        return self._mtp(seqs, ids, hidden[:, :ids.shape[1]], positions)[list(range(len(seqs))), last]  # (B, D)

    def chain(self, seqs: list[int], z: torch.Tensor, positions: list[int], params: list[SamplingParams],
              generators: list[torch.Generator]) -> list[Draft]:
        """k drafts per row from `extend`'s output z (B, D) at each row's last position: d_1 from z, then each
        next one from the head run on its own previous output."""
        B, pos = len(seqs), list(positions)
        tokens: list[list[int]] = [[] for _ in range(B)]
        probs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        for step in range(self.k):
            logits = self.model.lm_head(z)  # (B, V)
            for b in range(B):
                if params[b].greedy:
                    tokens[b].append(int(argmax(logits[b])))
                    continue
                q = probabilities(logits[b], params[b])
                tokens[b].append(draw(q, generators[b]))
                probs[b].append(q)
            if step + 1 < self.k:
                pos = [p + 1 for p in pos]
                step_ids, step_pos = padded_batch([[row[-1]] for row in tokens], pos)  # (B, 1) each
                z = self._mtp(seqs, step_ids, z[:, None], step_pos)[:, 0]
        return [Draft(t, torch.stack(p) if p else torch.empty(0)) for t, p in zip(tokens, probs)]

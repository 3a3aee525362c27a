"""Copy windows: runs of random tokens given twice, mixed into the training windows (`data.copy_fraction`).

A model that calls tools copies names and values from its prompt into its reply. The small presets, trained on a
few million tokens of text, never learn to copy from their context (docs/in_context_copying.md); windows made only of copies
teach it, because the second copy of a random run can be predicted only by finding the first (the pattern that
induction heads implement). Each copy window is derived from its index and the run's seed, so the mix is as
resumable and as data-parallel as the windows it is mixed into.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .batches import IGNORE, PackedBatch, TokenDataset, array_digest

RUN_LENGTHS = (8, 64)  # the shortest and longest run, in tokens


def as_packed(batch: torch.Tensor | PackedBatch) -> PackedBatch:
    """Plain token windows as packed ones: one document per window, every next token trained."""
    if isinstance(batch, PackedBatch):
        return batch
    return PackedBatch(batch, batch.clone(), torch.zeros_like(batch))


class CopyMix:
    """`base`'s windows (a TokenDataset or a ConversationDataset) plus as many copy windows as make `fraction` of
    all of them, behind the same interface (len, batch, seq_len, split), so ResumableSampler shuffles both together
    and each batch holds about that share.

    A copy window is one document: runs of RUN_LENGTHS tokens drawn from `token_ids`, each followed by itself; only
    the second copies are trained on (their first token is unpredictable too, and is not). One document per window
    keeps the forward on its plain causal path."""

    def __init__(self, base: TokenDataset, fraction: float, token_ids: np.ndarray, seed: int) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"copy fraction must be in (0, 1), got {fraction!r}")
        if len(token_ids) < 2:
            raise ValueError(f"copy windows need at least 2 ordinary token ids to draw from, got {len(token_ids)}")
        self.base, self.token_ids, self.seed = base, np.asarray(token_ids, dtype=np.int64), seed
        self.seq_len, self.split = base.seq_len, base.split
        self.num_copies = max(1, round(len(base) * fraction / (1 - fraction)))

    def __len__(self) -> int:
        return len(self.base) + self.num_copies

    @property
    def digest(self) -> str:
        """The base's, and what the copy windows are drawn from (they follow from it and the seed)."""
        return array_digest(np.frombuffer(self.base.digest.encode(), np.uint8), self.token_ids,
                            np.array([self.seed, self.num_copies]))

    @property
    def report(self) -> str:
        base = getattr(self.base, "report", f"{len(self.base)} windows of {self.seq_len + 1} tokens")
        return (f"{base}; plus {self.num_copies} copy windows ({self.num_copies / len(self):.0%} of the "
                f"{self.split} split: runs of {RUN_LENGTHS[0]}-{RUN_LENGTHS[1]} random tokens given twice)")

    def batch(self, indices: Sequence[int] | np.ndarray) -> PackedBatch:
        idx = np.asarray(indices, dtype=np.int64)
        is_copy = idx >= len(self.base)
        shape = (len(idx), self.seq_len + 1)
        tokens, labels = torch.empty(shape, dtype=torch.int64), torch.empty(shape, dtype=torch.int64)
        documents = torch.zeros(shape, dtype=torch.int64)  # a copy window is one document
        if not is_copy.all():
            base = as_packed(self.base.batch(idx[~is_copy]))
            rows = torch.from_numpy(~is_copy)
            tokens[rows], labels[rows], documents[rows] = base.tokens, base.labels, base.documents
        for row in np.flatnonzero(is_copy):
            tokens[row], labels[row] = self.copy_window(int(idx[row]) - len(self.base))
        return PackedBatch(tokens, labels, documents)

    def copy_window(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy window i: tokens and labels (IGNORE but on the second copies), each (seq_len + 1,)."""
        rng = np.random.default_rng([self.seed, i])
        width = self.seq_len + 1
        tokens = np.empty(width, dtype=np.int64)
        labels = np.full(width, IGNORE, dtype=np.int64)
        start = 0
        while start < width:
            run = rng.choice(self.token_ids, int(rng.integers(RUN_LENGTHS[0], RUN_LENGTHS[1] + 1)))
            pair = np.concatenate([run, run])[: width - start]
            end = start + len(pair)
            tokens[start:end] = pair
            second = start + len(run) + 1  # the second copy's first token cannot be predicted
            labels[second:end] = tokens[second:end]
            start = end
        return torch.from_numpy(tokens), torch.from_numpy(labels)


def ordinary_ids(vocab_size: int, reserved: Sequence[int]) -> np.ndarray:
    """The ids copy runs are drawn from: every id but the special and added tokens (`reserved`)."""
    return np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.asarray(list(reserved), dtype=np.int64))

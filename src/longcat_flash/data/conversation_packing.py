"""SFT windows: checked and tokenized conversations (conversations.py) packed first-fit into windows of
seq_len + 1 tokens, several conversations each with their own document ids, so that no token attends across
conversations; over-long ones truncated or skipped and counted; the train and held-out splits (docs/sft.md).
"""
from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from . import conversation_cache
from .batches import IGNORE, PADDING, PackedBatch, array_digest
from .conversation_files import row_files
from .conversation_tokens import ChatTokenizer, tokenize
from .conversations import iter_conversations

PACK_LOOKBACK = 64  # open windows a conversation may go into (first fit among the newest ones)


@dataclass
class PackStats:
    conversations: int = 0
    truncated: int = 0  # over-long, kept cut to their window
    skipped: int = 0  # over-long, with overlong=skip
    untrained: int = 0  # dropped: no trained token within the window (not counted as truncated)
    emptied: int = 0  # of those, the over-long ones: the cut left nothing to train on
    tokens: int = 0  # conversation tokens packed
    trained_tokens: int = 0

    def describe(self, split: str, windows: int, window: int) -> str:
        fill = self.tokens / max(1, windows * window)
        text = (f"sft {split}: {self.conversations} conversation{'s' * (self.conversations != 1)} -> {windows} "
                f"window{'s' * (windows != 1)} of {window} tokens "
                f"({fill:.0%} filled, {self.trained_tokens} trained tokens)")
        if self.truncated or self.skipped or self.emptied:
            text += (f"; over-long (> {window} tokens): {self.truncated} truncated, {self.skipped} skipped"
                     f"{f', {self.emptied} dropped with no assistant token left' if self.emptied else ''}")
        if untrained := self.untrained - self.emptied:  # none from conversation files (such rows are refused)
            text += f"; {untrained} without an assistant token, dropped"
        return text


class ConversationDataset:
    """Packed windows of seq_len + 1 tokens: whole conversations, each a document of its own, then padding.

    `batch(indices)` gives a PackedBatch; with ResumableSampler and validation_batches it behaves like a
    TokenDataset (same interface), so the training loop, its resume and its data parallelism are unchanged."""

    def __init__(self, tokens: np.ndarray, trained: np.ndarray, documents: np.ndarray, lengths: np.ndarray,
                 split: str, report: str) -> None:
        self.tokens, self.trained, self.documents = tokens, trained, documents  # (N, S+1) each
        self.lengths = lengths  # (N,) each window's tokens before its padding
        self.split, self.report = split, report
        self.seq_len = tokens.shape[1] - 1

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def digest(self) -> str:
        return array_digest(self.tokens, self.trained, self.documents)

    def batch(self, indices: Sequence[int] | np.ndarray) -> PackedBatch:
        idx = np.asarray(indices, dtype=np.int64)
        tokens = self.tokens[idx].astype(np.int64)
        padding = np.arange(tokens.shape[1]) >= self.lengths[idx, None]  # (B, S+1)
        return PackedBatch(torch.from_numpy(tokens),
                           torch.from_numpy(np.where(self.trained[idx], tokens, IGNORE)),
                           torch.from_numpy(np.where(padding, PADDING, self.documents[idx].astype(np.int64))))


def has_target(trained: np.ndarray) -> bool:
    """Whether a conversation's mask (within its window) trains any token: the first token is never a target."""
    return bool(trained[1:].any())


def fits(encoded: tuple[np.ndarray, np.ndarray], seq_len: int, overlong: Literal["truncate", "skip"]) -> bool:
    """Whether `pack` keeps a tokenized conversation: not skipped as over-long, a trained token left in its window."""
    ids, trained = encoded
    window = seq_len + 1
    return (len(ids) <= window or overlong == "truncate") and has_target(trained[:window])


def pack(encoded: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, split: str,
         overlong: Literal["truncate", "skip"] = "truncate") -> ConversationDataset:
    """First-fit packing (in the given order, among the newest PACK_LOOKBACK windows) of tokenized
    conversations into windows of seq_len + 1 tokens; over-long ones truncated or skipped, and counted."""
    window = seq_len + 1
    stats = PackStats()
    bins: list[list[int]] = []  # conversation indices per window
    room: list[int] = []
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    for ids, trained in encoded:
        stats.conversations += 1
        cut = len(ids) > window
        if cut and overlong == "skip":
            stats.skipped += 1
            continue
        ids, trained = ids[:window], trained[:window]
        if not has_target(trained):
            stats.untrained += 1  # counted once: dropped, not also truncated
            stats.emptied += cut
            continue
        stats.truncated += cut
        kept.append((ids, trained))
        first = len(bins) - PACK_LOOKBACK
        target = next((b for b in range(max(0, first), len(bins)) if room[b] >= len(ids)), None)
        if target is None:
            bins.append([])
            room.append(window)
            target = len(bins) - 1
        bins[target].append(len(kept) - 1)
        room[target] -= len(ids)
    if not bins:
        raise ValueError(f"sft {split}: no conversation fits ({stats.conversations} read, "
                         f"{stats.skipped} skipped as longer than {window} tokens, "
                         f"{stats.untrained} without an assistant token within their first {window}, "
                         f"{stats.emptied} of them longer, cut to it); raise "
                         f"data.seq_len (up to the model's max_position_embeddings; past it, extend the model's "
                         f"context first: docs/context_extension.md) or use shorter conversations (fewer tools)"
                         f"{', or sft.overlong=truncate' if overlong == 'skip' else ''}")
    tokens = np.full((len(bins), window), pad_id, dtype=np.int32)
    trained_out = np.zeros((len(bins), window), dtype=bool)
    documents = np.zeros((len(bins), window), dtype=np.int32)
    lengths = np.zeros(len(bins), dtype=np.int64)
    for row, members in enumerate(bins):
        at = 0
        for doc, k in enumerate(members):
            ids, trained = kept[k]
            tokens[row, at:at + len(ids)], trained_out[row, at:at + len(ids)] = ids, trained
            documents[row, at:at + len(ids)] = doc
            at += len(ids)
        documents[row, at:] = len(members)  # the padding is a document of its own, never trained (PADDING in batches)
        lengths[row] = at
    stats.tokens = int(sum(len(ids) for ids, _ in kept))
    stats.trained_tokens = int(trained_out[:, 1:].sum())
    return ConversationDataset(tokens, trained_out, documents, lengths, split,
                               stats.describe(split, len(bins), window))


def tokenized(tokenizer: ChatTokenizer, data: str | Path, ignore: Sequence[str], ends: Sequence[str], window: int,
              progress: bool | None, cache_dir: Path | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each conversation of `data` rendered and tokenized as it is read, the parsed row dropped (they held ~10x
    the file in memory); with `cache_dir`, once for given files and settings (data/conversation_cache.py).
    `progress`: a bar; False: a line as it starts and one as it ends (50k conversations took three silent
    minutes); None: silent."""
    cached, files = None, row_files(data)
    readable = all(file.is_file() for file in files)  # else reading them says what is wrong, and nothing before
    if cache_dir is not None and readable:
        cached = conversation_cache.cache_path(cache_dir, files, tokenizer, ignore, ends, window)
        if (encoded := conversation_cache.load(cached)) is not None:
            return encoded
    start = time.monotonic()
    if progress is False and readable:
        print(f"rendering and tokenizing the conversations of {data}", flush=True)
    rows = tqdm(iter_conversations(data, ignore), desc=f"tokenizing {Path(data).name}", unit=" conversations",
                disable=progress is not True)
    encoded = [tokenize(tokenizer, conversation, ends, window) for conversation in rows]
    if not encoded:
        raise ValueError(f"{data}: no conversations in it")
    if progress is False:
        print(f"tokenized {len(encoded)} conversations of {data} in {time.monotonic() - start:.0f} s", flush=True)
    if cached is not None:
        conversation_cache.save(cached, encoded)
    return encoded


def _identity(file: Path) -> tuple[int, int]:
    """A file's device and inode: the same file under any name (a link, hard or symbolic, or a path with `..`)."""
    stat = os.stat(file)
    return stat.st_dev, stat.st_ino


def conversation_datasets(tokenizer: ChatTokenizer, data: str | Path, val_data: str | Path | None,
                          val_fraction: float, seq_len: int, seed: int,
                          overlong: Literal["truncate", "skip"] = "truncate", ignore: Sequence[str] = (),
                          ends: Sequence[str] = (), progress: bool | None = None,
                          cache_dir: Path | None = None) -> tuple[ConversationDataset, ConversationDataset]:
    """The train and validation windows: conversations in a seeded order, each split packed on its own; `ends` as
    in `tokenize`, `progress` and `cache_dir` as in `tokenized`. Without a separate val_data the validation share
    is the first conversations of that order; when `pack` would keep none of them (over-long, or nothing to
    train), the last of them gives its place to the first conversation it keeps, so whether a run starts does not
    hang on the seed (and runs that started keep their split)."""
    if val_data is not None:
        trained = {_identity(file) for file in row_files(data)}
        if shared := [file for file in row_files(val_data) if _identity(file) in trained]:
            raise ValueError(f"sft.val_data: {shared[0]} is among the files of sft.data too: its conversations "
                             "would be trained on and then held out; give held-out files that sft.data does not name")
    encoded = tokenized(tokenizer, data, ignore, ends, seq_len + 1, progress, cache_dir)
    order = np.random.default_rng([seed, 1]).permutation(len(encoded))
    encoded = [encoded[i] for i in order]
    if val_data is not None:
        val_encoded = tokenized(tokenizer, val_data, ignore, ends, seq_len + 1, progress, cache_dir)
    else:
        n_val = max(1, round(len(encoded) * val_fraction))
        if n_val >= len(encoded):
            raise ValueError(f"{data}: {len(encoded)} conversation(s) leave none for training after holding "
                             f"out data.val_fraction={val_fraction}; add conversations or pass sft.val_data")
        held = set(range(n_val))
        if not any(fits(encoded[i], seq_len, overlong) for i in held):  # the held-out split would be empty
            first = next((i for i, e in enumerate(encoded) if fits(e, seq_len, overlong)), n_val - 1)
            held = set(range(n_val - 1)) | {first}
        val_encoded = [e for i, e in enumerate(encoded) if i in held]
        encoded = [e for i, e in enumerate(encoded) if i not in held]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return (pack(encoded, seq_len, pad, "train", overlong), pack(val_encoded, seq_len, pad, "val", overlong))

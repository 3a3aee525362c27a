"""Batches: fixed-length windows over a token shard, and a resumable, data-parallel sampler over them.

Determinism is stateless: the order of epoch e is a permutation drawn from a numpy Generator seeded with
(seed, e), so a sampler's whole state is (epoch, position). Resuming from that state replays exactly the batches an
uninterrupted run would have drawn, at any data-parallel world size.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .shards import ShardMeta

IGNORE = -100  # a target that is not trained on (F.cross_entropy's default ignore_index)
PADDING = -1  # the document id of a packed window's padding: in no document, never trained, not counted as routed


@dataclass
class PackedBatch:
    """Windows holding several documents each (SFT packing, data/conversation_packing.py): tokens, the target-or-IGNORE
    labels and the document id of every position (PADDING after the last document), all (B, S+1) int64."""

    tokens: torch.Tensor
    labels: torch.Tensor
    documents: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def chunk(self, n: int) -> list[PackedBatch]:
        return [PackedBatch(*parts) for parts in zip(*(t.chunk(n) for t in self._tensors()))]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return PackedBatch(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(*(t.pin_memory() for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tokens, self.labels, self.documents


def split_windows(batch: torch.Tensor | PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs (B, S), targets (B, S), documents (B, S) or None) of (B, S+1) windows.

    Plain token windows train on every next token. Packed windows train on their labels, never across a
    document boundary, and give the forward the inputs' document ids (the attention mask, the positions); when
    every window is one document, None, so the forward takes its plain causal path (same result, faster)."""
    if isinstance(batch, torch.Tensor):
        return batch[:, :-1], batch[:, 1:], None
    docs = batch.documents
    targets = batch.labels[:, 1:].masked_fill(docs[:, 1:] != docs[:, :-1], IGNORE)
    inputs_docs = docs[:, :-1]  # (B, S)
    one_each = bool((inputs_docs == inputs_docs[:, :1]).all())
    return batch.tokens[:, :-1], targets, None if one_each else inputs_docs


def array_digest(*arrays: np.ndarray, most: int = 1 << 24) -> str:
    """sha256 of the arrays' shapes and contents, a resumed run's check that it trains on the same data. Of an
    array over `most` elements, `most` spread evenly are read: a corpus of billions of tokens is not read whole."""
    h = hashlib.sha256()
    for array in arrays:
        flat = np.asarray(array).reshape(-1)
        h.update(repr(array.shape).encode())
        h.update(np.ascontiguousarray(flat[:: max(1, len(flat) // most)][:most]).tobytes())
    return h.hexdigest()[:32]


class TokenDataset:
    """Windows of `seq_len + 1` tokens over one split of a flat token array (inputs = w[:-1], targets = w[1:]).

    Window i starts at token i * seq_len, so consecutive windows share one token and every token is a target
    exactly once. The validation split is the last `val_fraction` of the tokens; no window crosses the boundary.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, split: Literal["train", "val"] = "train",
                 val_fraction: float = 0.01) -> None:
        if not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        boundary = len(tokens) - int(round(len(tokens) * val_fraction))
        self.tokens = tokens[:boundary] if split == "train" else tokens[boundary:]
        self.seq_len, self.split = seq_len, split
        if len(self) == 0:
            raise ValueError(f"the {split} split has {len(self.tokens)} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1}; give more text or lower data.seq_len"
                             + (f", or raise data.val_fraction={val_fraction}" if split == "val" else ""))

    @classmethod
    def from_shard(cls, bin_path: str | Path, seq_len: int, split: Literal["train", "val"] = "train",
                   val_fraction: float = 0.01) -> TokenDataset:
        """Memory-map a shard written by `build_token_shard` (nothing is read until a batch needs it)."""
        bin_path = Path(bin_path)
        if not bin_path.is_file():
            raise FileNotFoundError(f"token shard not found: {bin_path}")
        tokens = np.memmap(bin_path, dtype=ShardMeta.read(bin_path).dtype, mode="r")
        return cls(tokens, seq_len, split, val_fraction)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    @functools.cached_property
    def digest(self) -> str:
        return array_digest(self.tokens)

    def batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Windows `indices` as a (B, seq_len + 1) int64 tensor."""
        windows = [self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1] for i in indices]
        return torch.from_numpy(np.stack(windows).astype(np.int64))  # (B, seq_len + 1)


def _local_slice(global_batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's rows of a global batch: contiguous blocks, so concatenating ranks restores the batch."""
    if global_batch_size <= 0 or global_batch_size % world_size:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"world_size={world_size}")
    local = global_batch_size // world_size
    return slice(rank * local, (rank + 1) * local)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class ResumableSampler:
    """Shuffled training batches from an explicit seed, resumable bit-for-bit from `state_dict()`.

    Every rank draws the same global batch and keeps its slice, so the data seen per step does not depend on the
    world size, and a checkpoint taken at one world size resumes at another. A batch that runs past the end of an
    epoch continues into the next epoch's order; no window is dropped.
    """

    def __init__(self, dataset: TokenDataset, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        _check_rank(rank, world_size)
        self.dataset, self.seed, self.rank, self.world_size = dataset, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])  # fresh per epoch: no RNG state to save
            self._order = (epoch, rng.permutation(len(self.dataset)))
        return self._order[1]

    def next_indices(self, global_batch_size: int) -> np.ndarray:
        """The next global batch's window indices, advancing the state (every rank calls this identically)."""
        rows = _local_slice(global_batch_size, self.rank, self.world_size)
        picked, need = [], global_batch_size
        while need:
            order = self._epoch_order(self.epoch)
            take = min(need, len(order) - self.position)
            picked.append(order[self.position: self.position + take])
            self.position, need = self.position + take, need - take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(picked)[rows]

    def next_batch(self, global_batch_size: int) -> torch.Tensor:
        """This rank's (global_batch_size // world_size, seq_len + 1) slice of the next global batch."""
        return self.dataset.batch(self.next_indices(global_batch_size))

    def state_dict(self) -> dict[str, int | str]:
        """Position in the global order, and what it is a position in; independent of rank and world size."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_sequences": len(self.dataset),
                "data_digest": self.dataset.digest}

    def load_state_dict(self, state: dict[str, int | str], same_data: bool = True) -> str:
        """Continue from `state`. The data must be what it was (`same_data`), or the resume would not be bit for bit;
        with same_data=False (--accept-changed-data) it may differ: as many windows as before, the sampler goes on at
        the same place in the epoch's order; another number (another order), at the next epoch's start. Returns what
        changed ("" if nothing)."""
        if state.get("seed") != self.seed:
            raise ValueError(f"the data order's seed was {state.get('seed')!r}, now {self.seed}: resume with the same "
                             "seed, or start a new run")
        count, digest = state.get("num_sequences"), state.get("data_digest", self.dataset.digest)  # old: no digest
        changed = (f"the training windows were {count}, now {len(self.dataset)}" if count != len(self.dataset) else
                   "the training windows' tokens differ" if digest != self.dataset.digest else "")
        if changed and same_data:
            raise ValueError(f"the training data differs from the data this run was checkpointed on ({changed}): "
                             f"resume with the same data and settings; or, to go on with the data as it is now "
                             f"(files added, removed or edited, or a newer longcat-flash that tokenizes them "
                             f"differently), pass --accept-changed-data")
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position < count:
            raise ValueError(f"sampler state position={position} is outside [0, {count})")
        self.epoch, self.position = (epoch, position) if count == len(self.dataset) else (epoch + 1, 0)
        return changed


def validation_batches(dataset: TokenDataset, global_batch_size: int, *, max_batches: int | None = None,
                       rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    """The fixed validation set: windows in order, whole global batches only, each rank its slice; a set smaller
    than one global batch is repeated to fill one (a small data set's default split still validates).

    The same call always yields the same batches, so validation losses are comparable across steps and runs.
    """
    _check_rank(rank, world_size)
    if len(dataset) == 0:
        raise ValueError(f"the {dataset.split} split has no windows; hold out more (data.val_fraction, or more rows "
                         "in sft.val_data)")
    rows = _local_slice(global_batch_size, rank, world_size)
    n_batches = max(1, len(dataset) // global_batch_size)
    n_batches = n_batches if max_batches is None else min(n_batches, max_batches)
    starts = range(0, n_batches * global_batch_size, global_batch_size)
    return (dataset.batch(np.arange(start, start + global_batch_size)[rows] % len(dataset)) for start in starts)

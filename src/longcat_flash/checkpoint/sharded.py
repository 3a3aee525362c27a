"""Sharded tensor state (model weights, Adam moments) through torch.distributed.checkpoint, stored as safetensors.

Every rank writes the pieces it holds, in parallel, into its own `shard-XXXXX-model-00001-of-00001.safetensors`;
each piece's offset in the full tensor is in that file's safetensors metadata (DCP's Hugging Face storage,
docs/checkpoint.md). Reading rebuilds the global layout from those headers alone, and each rank reads exactly
the slices its own shards need: another world size or (dp, ep) layout reshards on load, and no rank ever holds
a full expert stack or the full optimizer state. Nothing is pickled in either direction: a state handed to
`save` must hold tensors only (the JSON-able rest goes to checkpoint/training.py's files).

Under a process group every rank calls `save` and `load` (collectives); in one process they work alone.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException


def save(directory: Path, state: dict[str, Any]) -> None:
    """Write `state` (nested dicts of tensors and DTensors) into `directory`, every rank its own file. A rank that
    cannot write (a full disk) makes every rank raise one OSError naming it: DCP gathers the failures."""
    _check_tensors_only(state, "")
    try:
        with _alone_is_fine():
            dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True),
                     no_dist=not dist.is_initialized())
    except CheckpointException as err:  # a BaseException, holding (exception, traceback) per failed rank
        failures = sorted(err.failures.items())
        for _, (failure, _) in failures:  # Ctrl-C, SIGTERM's SystemExit: the stop goes on as it was raised
            if not isinstance(failure, Exception):
                raise failure from None
        rank, (failure, _) = failures[0]
        raise OSError(f"rank {rank} could not write its shard: {failure}") from None


def load(directory: Path, state: dict[str, Any]) -> None:
    """Fill `state` (the same structure, already allocated and sharded as this process wants it) in place."""
    with _alone_is_fine():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=not dist.is_initialized())


def shapes(directory: Path) -> dict[str, torch.Size]:
    """The full shape of every stored tensor by flat key ("model.<name>", "optimizer.<name>.exp_avg", ...),
    from the files' headers alone."""
    metadata = HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata
    return {key: meta.size for key, meta in metadata.items()}


def read_full(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor whole, by flat key ("model.model.layers.0...."), in one process (model growth, tests)."""
    metadata = HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in metadata.items()}
    with _alone_is_fine():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=True)
    return state


@contextmanager
def _alone_is_fine() -> Iterator[None]:
    """DCP warns on every call made without a process group; in one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _check_tensors_only(state: Any, where: str) -> None:
    if isinstance(state, dict):
        for key, value in state.items():
            _check_tensors_only(value, f"{where}.{key}" if where else str(key))
    elif not isinstance(state, torch.Tensor):
        raise TypeError(f"sharded state {where!r} is a {type(state).__name__}; only tensors are stored here")

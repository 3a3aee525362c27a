"""Multi-process training: process groups and meshes, FSDP2, expert parallelism with all-to-all dispatch (layer 2).

Imports model/, config and device; the model never imports this package (it sees the dispatcher seam only).
FSDP and the dispatcher are imported on first use: torch.distributed.fsdp takes a second to import, and the commands
that never shard (generate, chat, serve: each of its processes) need only env's process-group helpers.
"""
from importlib import import_module

from .env import (average, barrier, build_mesh, check_same_settings, check_shared_directory, global_counts, init,
                  is_main, launched, main_first, parallel_degrees, print0, raise_if_any, rank, teardown, world_size)

_LAZY = {
    **dict.fromkeys(["AllToAllDispatcher", "CommStats", "comm_stats", "experts_gathered", "shard_experts"],
                    "expert_parallel"),
    **dict.fromkeys(["average_expert_gradients", "check_shardable", "clip_grad_norm_", "distribute_experts",
                     "parallelize", "side_backward", "state_bytes"], "fsdp"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "average", "barrier", "build_mesh", "check_same_settings", "check_shared_directory", "global_counts", "init",
    "is_main", "launched",
    "main_first", "parallel_degrees", "print0", "raise_if_any", "rank", "teardown", "world_size", *_LAZY,
]

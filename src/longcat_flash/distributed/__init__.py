"""Multi-process training: process groups and meshes, FSDP2, expert parallelism with all-to-all dispatch (layer 2).

Imports model/, config and device; the model never imports this package (it sees the dispatcher seam only).
"""
from .env import (average, barrier, build_mesh, check_shared_directory, global_counts, init, is_main, launched,
                  main_first, print0, raise_if_any, rank, teardown, world_size)
from .expert_parallel import AllToAllDispatcher, CommStats, comm_stats, experts_gathered, shard_experts
from .fsdp import (average_expert_gradients, clip_grad_norm_, distribute_experts, parallelize, side_backward,
                   state_bytes)

__all__ = [
    "average", "barrier", "build_mesh", "check_shared_directory", "global_counts", "init", "is_main", "launched",
    "main_first", "print0", "raise_if_any", "rank", "teardown", "world_size",
    "AllToAllDispatcher", "CommStats", "comm_stats", "experts_gathered", "shard_experts",
    "average_expert_gradients", "clip_grad_norm_", "distribute_experts", "parallelize", "side_backward",
    "state_bytes",
]

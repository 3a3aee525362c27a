"""Multi-process training and inference: process groups, expert parallelism, data parallelism (layer 2).

Imports model/ and config only; the model never imports this package (it sees the dispatcher seam only).
"""
from .data_parallel import average_metrics, clip_grad_norm_, global_counts, reduce_gradients, split_parameters
from .env import build_mesh, init, is_main, launched, main_first, print0, rank, teardown, world_size
from .expert_parallel import (AllToAllDispatcher, CommStats, FullExperts, comm_stats, experts_gathered,
                              parallelize, set_overlap, shard_experts)

__all__ = [
    "average_metrics", "clip_grad_norm_", "global_counts", "reduce_gradients", "split_parameters",
    "build_mesh", "init", "is_main", "launched", "main_first", "print0", "rank", "teardown", "world_size",
    "AllToAllDispatcher", "CommStats", "FullExperts", "comm_stats", "experts_gathered", "parallelize",
    "set_overlap", "shard_experts",
]

"""A run's memory, bounded from its config before anything is built: a model or batch that cannot fit is refused
in one line. Building one ran out of memory, hung constructing 10^20 layers on the meta device, or failed deep in
torch ("Overflow when unpacking long long").

The bound counts only what certainly lives at once, so it never refuses a run that fits: the embedding tables and
the routed experts' weights in fp32 with their gradients and AdamW's two moments (sharded over the ranks under
FSDP), and one fp32 hidden state of a micro-batch on each rank; on a GPU, a rank's share of them against its
memory, on CPUs, the share of the ranks on this host (torchrun's LOCAL_WORLD_SIZE) against the host's.
"""
from __future__ import annotations

import os

import torch

from ..device import memory_bytes
from .config import TrainConfig

TRAIN_BYTES_PER_PARAMETER = 16  # fp32 weight and gradient, AdamW's two moments


def check_fits(cfg: TrainConfig, device: torch.device, world: int) -> None:
    """Refuse a run whose model state and one micro-batch's hidden state exceed the memory they live in: each GPU's
    (a rank's share), or the host's (the share of the ranks it runs)."""
    params = cfg.model.dominant_parameters
    state = params * TRAIN_BYTES_PER_PARAMETER
    rows = max(1, cfg.data.batch_size // (world * cfg.data.grad_accum))  # a rank's micro-batch
    hidden = rows * (cfg.data.seq_len + 1) * cfg.model.hidden_size * 4
    per_gpu = device.type == "cuda"
    here = 1 if per_gpu else int(os.environ.get("LOCAL_WORLD_SIZE", world))  # ranks sharing this memory
    need = state * here // world + here * hidden
    have = memory_bytes(device)
    if need > have:
        where = f"each of the {world} GPUs has" if per_gpu else "this machine has"
        raise ValueError(f"this run cannot fit in memory: {params:.3g} parameters (the embeddings and experts "
                         f"alone) need {state / 2**30:.3g} GiB for fp32 weights, gradients and AdamW's moments"
                         f"{f' (the share of {here} of its {world} ranks here)' if world > 1 else ''}, and "
                         f"one hidden state of a micro-batch ({rows} x {cfg.data.seq_len + 1} tokens x "
                         f"{cfg.model.hidden_size}) {hidden / 2**30:.3g} GiB; {where} {have / 2**30:.3g} GiB: "
                         "choose a smaller model or data.batch_size (or raise data.grad_accum)")

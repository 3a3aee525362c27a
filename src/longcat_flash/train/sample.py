"""A small sampling loop for the end-of-training sample: full recompute per token, no KV cache.

The inference engine (infer/) is the fast path; the trainer may not import it, and a few dozen tokens from a
small model do not need it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..model import Transformer


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             generator: torch.Generator | None = None, eos_id: int | None = None,
             max_context: int | None = None) -> list[int]:
    """Continue `prompt` (token ids) by up to `max_new_tokens`; greedy when temperature == 0.

    Stops at `eos_id`; attends to at most `max_context` trailing tokens (default: the model's maximum).
    Runs on the model's device (`generator` must live there too). Under a process group every rank calls it
    (the sharded model's forward is collective) and rank 0's token is broadcast, so all ranks stay in step.
    """
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    context = max_context or model.config.max_position_embeddings
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids[-context:]], device=device)).logits[0, -1].float()  # (V,)
        if temperature == 0:
            choice = logits.argmax().view(1)
        else:
            choice = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)
        if dist.is_initialized():
            dist.broadcast(choice, src=0)
        token = int(choice)
        ids.append(token)
        if token == eos_id:
            break
    model.train(was_training)
    return ids[len(prompt):]

"""A small sampling loop for the end-of-training sample: full recompute per token, no KV cache.

The inference engine (infer/) is the fast path; the trainer may not import it, and a few dozen tokens from a
small model do not need it.
"""
from __future__ import annotations

import torch

from ..model import Transformer


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             generator: torch.Generator | None = None, eos_id: int | None = None,
             max_context: int | None = None) -> list[int]:
    """Continue `prompt` (token ids) by up to `max_new_tokens`; greedy when temperature == 0.

    Stops at `eos_id`; attends to at most `max_context` trailing tokens (default: the model's maximum).
    """
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    context = max_context or model.config.max_position_embeddings
    was_training = model.training
    model.eval()
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids[-context:]])).logits[0, -1].float()  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        ids.append(token)
        if token == eos_id:
            break
    model.train(was_training)
    return ids[len(prompt):]

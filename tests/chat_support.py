"""A tiny checkpoint that writes chosen text: tool calls end to end without a trained model.

Every weight but the embeddings, the LM head and the norms is zero, so the final hidden state of a position is
its own token's embedding, scaled; the LM head then maps that token to a chosen next one. The model is a lookup
table from the last token to the next, and greedy (or any) sampling follows it: after a prompt ending with a
context's last token it writes the continuation, then eos.
"""
from __future__ import annotations

from pathlib import Path

import torch

from longcat_flash.checkpoint.fresh import random_model
from longcat_flash.presets import tiny
from longcat_flash.tokenizer import STDLIB_MIN_VOCAB, Tokenizer, train_tokenizer

LOGIT = 50.0  # times sqrt(hidden) after the final norm: every other token has probability ~0


def spell(pieces: dict[str, int], text: str, chain: list[int], table: dict[int, int], eos: int) -> list[int] | None:
    """`chain` extended by ids that spell `text` then eos, each id's successor agreeing with `table` (a lookup
    table gives a token one successor, so no id may repeat in a chain), longest pieces first; None if none."""
    prev = chain[-1]
    if not text:
        return [*chain, eos] if table.get(prev, eos) == eos else None
    for end in range(len(text), 0, -1):
        token = pieces.get(text[:end])
        if token is not None and token not in chain and table.get(prev, token) == token:
            found = spell(pieces, text[end:], [*chain, token], table, eos)
            if found is not None:
                return found
    return None


def next_token_table(tokenizer: Tokenizer, scripts: dict[str, str]) -> dict[int, int]:
    """{token: next token} for each (context, continuation): the context's last token starts the chain."""
    pieces = {tokenizer.decode([i], skip_special_tokens=False): i for i in range(tokenizer.vocab_size)}
    table: dict[int, int] = {}
    for context, continuation in scripts.items():
        start = tokenizer.encode(context, allow_special=True)[-1]
        chain = spell(pieces, continuation, [start], table, tokenizer.eos_id)
        if chain is None:
            raise ValueError(f"no spelling of {continuation!r} after {context!r} fits one lookup table")
        table.update(zip(chain, chain[1:]))
    return table


def scripted_checkpoint(out: Path, scripts: dict[str, str]) -> Path:
    """Write the checkpoint (tiny preset, float32) with its tokenizer to `out`; the tokenizer is trained on the
    scripts, so their JSON gets the merged tokens a chain needs."""
    tokenizer = train_tokenizer([*scripts, *scripts.values()] * 20, STDLIB_MIN_VOCAB)
    tokenizer.model_max_length = tiny().max_position_embeddings
    table = next_token_table(tokenizer, scripts)
    model = random_model(tiny().replace(vocab_size=tokenizer.vocab_size))
    if len(table) > model.config.hidden_size:
        raise ValueError(f"{len(table)} successors do not fit {model.config.hidden_size} hidden dimensions")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if "norm" in name else 0.0)
        embed, head = model.get_parameter("model.embed_tokens.weight"), model.get_parameter("lm_head.weight")
        for slot, (src, dst) in enumerate(table.items()):
            embed[src, slot] = 1.0
            head[dst, slot] = LOGIT
    model.save_pretrained(out)
    tokenizer.save(out)
    return out

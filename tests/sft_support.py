"""Helpers shared by the SFT tests: short conversations (plain answers and tool calls) and tiny checkpoints."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from longcat_flash.checkpoint.fresh import init_checkpoint, random_model
from longcat_flash.presets import tiny
from longcat_flash.tokenizer import SPECIAL_TOKENS, Tokenizer
from longcat_flash.tokenizer.bpe import _stdlib_sample

ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}


def conversation(rng: random.Random) -> dict[str, Any]:
    """A plain question and answer, a two-round chat, or a tool call with its result and the answer."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    kind = rng.choice(["plain", "rounds", "tool"])
    if kind == "plain":
        return {"messages": [{"role": "user", "content": f"{a} plus {b}?"},
                             {"role": "assistant", "content": f"{a + b}."}]}
    if kind == "rounds":
        return {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": f"Say {a}."}]},
                             {"role": "assistant", "content": f"{a}"},
                             {"role": "user", "content": f"Now {b}."},
                             {"role": "assistant", "content": f"{b}"}]}
    call = {"id": f"call_{a}{b}", "type": "function",
            "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}
    return {"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": call["id"], "content": str(a + b)},
                         {"role": "assistant", "content": f"It is {a + b}."}],
            "tools": [ADD_TOOL]}


def write_conversations(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(n)))
    return path


def tiny_checkpoint(out: Path) -> Path:
    """`longcat init --preset tiny --dtype float32`: random weights, a tokenizer with the tool-call tags."""
    import torch

    return init_checkpoint(tiny(), out, dtype=torch.float32)


def tagless_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE with pad/bos/eos only: the tool-call tags are several tokens each (an older tokenizer)."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_stdlib_sample(), trainer=trainer)
    return Tokenizer(backend)


def tagless_checkpoint(out: Path) -> Path:
    """A tiny float32 checkpoint whose vocabulary is exactly its tag-less tokenizer's."""
    tokenizer = tagless_tokenizer()
    random_model(tiny().replace(vocab_size=tokenizer.vocab_size)).save_pretrained(out)
    tokenizer.save(out)
    return out

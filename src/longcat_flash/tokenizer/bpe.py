"""Training a byte-level BPE (`tokenizers`' trainer) into a `Tokenizer` with our special-token ids, and the
stdlib-trained one that checkpoints needing a tokenizer now (tests, `longcat init`, benchmarks) use."""
from __future__ import annotations

import json
import re
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .tokenizer import DEFAULT_MODEL_MAX_LENGTH, SPECIAL_TOKENS, TOOL_CALL_TOKENS, Tokenizer

TRAINED_VOCAB_MIN = 256 + len(SPECIAL_TOKENS) + len(TOOL_CALL_TOKENS)  # the smallest vocabulary train_tokenizer makes
# A handful of large, plain-text-heavy stdlib modules: enough merges for a useful tokenizer in ~1 s.
STDLIB_SAMPLE_FILES = ("argparse.py", "typing.py", "inspect.py", "subprocess.py", "dataclasses.py", "functools.py",
                       "textwrap.py", "collections/__init__.py", "json/decoder.py", "email/message.py")
STDLIB_MIN_VOCAB = 512  # 256 bytes + 3 special tokens leave few merges below this


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS, *,
                    min_frequency: int = 2, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE; `special_tokens[:3]` become pad, bos, eos with ids 0, 1, 2, the rest follow, then
    the TOOL_CALL_TOKENS (unless listed already).

    The vocabulary can come out smaller than `vocab_size` when the texts run out of pairs to merge.
    """
    special_tokens = _validate_special_tokens(special_tokens)
    tool_tokens = [t for t in TOOL_CALL_TOKENS if t not in special_tokens]
    minimum = 256 + len(special_tokens) + len(tool_tokens)  # every byte must be a token, or round-tripping breaks
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an integer >= {minimum} (256 bytes + {len(special_tokens)} "
                         f"special tokens + {len(tool_tokens)} tool-call tags), got {vocab_size!r}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[*special_tokens, *tool_tokens], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator((_LONG_RUN.sub(_cut_run, text) for text in texts), trainer=trainer)
    backend = _unmark_special(backend, tool_tokens)
    pad, bos, eos = special_tokens[:3]
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad)


# BPE training time grows with the square of a word's length: one 300 KB run of "x" (or of blanks) in a corpus took
# minutes, in native code no signal interrupts. For training only, a run of non-blanks is cut into words of 256
# characters and a run of blanks shortened to 255 (no merge that long is ever learned); encoding is unaffected.
_LONG_RUN = re.compile(r"(\S{256})|\s{256,}")


def _cut_run(run: re.Match) -> str:
    return run.group(1) + "\n" if run.group(1) else run.group(0)[:255]


def _unmark_special(backend: tokenizers.Tokenizer, tokens: Sequence[str]) -> tokenizers.Tokenizer:
    """The same tokenizer with `tokens` as plain added tokens: the trainer can only add special ones, which
    `decode(skip_special_tokens=True)` would drop from generated text."""
    state = json.loads(backend.to_str())
    for added in state["added_tokens"]:
        if added["content"] in tokens:
            added["special"] = False
    return tokenizers.Tokenizer.from_str(json.dumps(state))


def stdlib_tokenizer(vocab_size: int, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> Tokenizer:
    """A byte-level BPE of at least STDLIB_MIN_VOCAB ids trained in ~1 s on a few stdlib modules: a tokenizer
    for checkpoints that need one now and no corpus (`longcat init`, tests, benchmarks)."""
    tokenizer = train_tokenizer(_stdlib_sample(), max(vocab_size, STDLIB_MIN_VOCAB))
    tokenizer.model_max_length = model_max_length
    return tokenizer


def _stdlib_sample() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8") for name in STDLIB_SAMPLE_FILES if (root / name).is_file()]
    if not texts:
        raise FileNotFoundError(f"none of {STDLIB_SAMPLE_FILES} found under {root}")
    return texts


def _validate_special_tokens(special_tokens: Sequence[str]) -> tuple[str, ...]:
    tokens = tuple(special_tokens)
    if len(tokens) < 3 or not all(isinstance(t, str) and t for t in tokens):
        raise ValueError(f"special_tokens must hold at least 3 non-empty strings (pad, bos, eos first), "
                         f"got {special_tokens!r}")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"special_tokens must be unique, got {special_tokens!r}")
    return tokens

"""A fresh checkpoint in seconds: random weights for a preset plus a byte-level BPE trained on a few stdlib files.

`longcat init` writes one, so tests, benchmarks and the server run with no download and no training. The directory
is a normal checkpoint (config.json, safetensors in the official layout, tokenizer.json, tokenizer_config.json).
The model keeps the preset's vocabulary unless the tokenizer needs more ids (the tiny preset's 256 cannot hold 256
bytes + 3 special tokens); unused ids are harmless, as in released models that pad their vocabularies.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from ..config import ModelConfig
from ..tokenizer import Tokenizer, train_tokenizer
from .hf import LongcatFlash

# A handful of large, plain-text-heavy stdlib modules: enough merges for a useful tokenizer in ~1 s.
TOKENIZER_SOURCES = ("argparse.py", "typing.py", "inspect.py", "subprocess.py", "dataclasses.py", "functools.py",
                     "textwrap.py", "collections/__init__.py", "json/decoder.py", "email/message.py")
MIN_VOCAB = 512


def stdlib_sample() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8") for name in TOKENIZER_SOURCES if (root / name).is_file()]
    if not texts:
        raise FileNotFoundError(f"none of {TOKENIZER_SOURCES} found under {root}")
    return texts


def fresh_tokenizer(cfg: ModelConfig) -> Tokenizer:
    tokenizer = train_tokenizer(stdlib_sample(), max(cfg.vocab_size, MIN_VOCAB))
    tokenizer.model_max_length = cfg.max_position_embeddings
    return tokenizer


def init_checkpoint(cfg: ModelConfig, out: str | Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                    std: float | None = None) -> Path:
    """Write random weights (normal(0, std or initializer_range)) and a fresh tokenizer to `out`."""
    out = Path(out)
    tokenizer = fresh_tokenizer(cfg)
    if tokenizer.vocab_size > cfg.vocab_size:
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = LongcatFlash(cfg)
    if std is not None:
        model.init_weights(std)
    model.to(dtype).save_pretrained(out)
    tokenizer.save(out)
    return out

"""A fresh checkpoint in seconds: random weights for a preset plus a byte-level BPE trained on a few stdlib files
(`tokenizer.stdlib_tokenizer`).

`longcat init` writes one, so tests, benchmarks and the server run with no download and no training. The directory
is a normal checkpoint (config.json, safetensors in the official layout, tokenizer.json, tokenizer_config.json).
The model keeps the preset's vocabulary unless the tokenizer needs more ids (a vocabulary under 512 cannot hold 256
bytes, 3 special tokens and useful merges); unused ids are harmless, as in released models that pad their
vocabularies.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..device import host_memory_bytes
from ..tokenizer import stdlib_tokenizer
from .hf import LongcatFlash

DIRECT_MAX_PARAMS = 2 * 10**9  # above this, build on meta and initialise once on the device (random_model)


def random_model(cfg: ModelConfig, *, seed: int = 0, std: float | None = None,
                 device: torch.device = torch.device("cpu")) -> LongcatFlash:
    """Random weights, normal(0, std or initializer_range), created on `device` (never a CPU copy first).

    Up to DIRECT_MAX_PARAMS the model is constructed on the device, exactly as on the CPU before, so a seed gives
    the weights it always gave there. Above, constructing would initialise every weight twice (the modules'
    defaults, then init_weights): the model is laid out on meta, allocated on the device and initialised once.
    """
    if not -(2**63) <= seed < 2**64:  # torch.manual_seed's range: past it, "Overflow when unpacking long long"
        raise ValueError(f"--seed must be an integer in [-2^63, 2^64), got {seed}")
    _check_fits(cfg.dominant_parameters, device, "at least ")  # before the meta build, which could take hours
    with torch.device("meta"):
        model = LongcatFlash(cfg)
    _check_fits(model.num_parameters(), device)
    with torch.random.fork_rng():  # the caller's generators as they were: seeding is this model's alone
        torch.manual_seed(seed)  # after the meta build, which draws nothing, so it cannot shift the stream
        if model.num_parameters() > DIRECT_MAX_PARAMS:
            model.to_empty(device=device)
            model.init_weights(std)
            return model
        with torch.device(device):
            model = LongcatFlash(cfg)
        if std is not None:
            model.init_weights(std)
        return model


def _check_fits(parameters: int, device: torch.device, bound: str = "") -> None:
    """A CPU model is built in fp32 (and cast when saved): refuse one the host's memory cannot hold."""
    need, have = parameters * 4, host_memory_bytes()
    if torch.device(device).type == "cpu" and need > have:
        raise ValueError(f"a model of {bound}{parameters / 1e9:.1f}B parameters needs {need / 2**30:.0f} GiB in fp32; "
                         f"this machine has {have / 2**30:.0f} GiB")


def init_checkpoint(cfg: ModelConfig, out: str | Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                    std: float | None = None, device: torch.device = torch.device("cpu")) -> Path:
    """Write random weights (see `random_model`, built on `device`) and a fresh tokenizer to `out`."""
    out = Path(out)
    tokenizer = stdlib_tokenizer(cfg.vocab_size, cfg.max_position_embeddings)
    if tokenizer.vocab_size > cfg.vocab_size:
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    random_model(cfg, seed=seed, std=std, device=device).to(dtype).save_pretrained(out)  # copied out per tensor
    tokenizer.save(out)
    return out

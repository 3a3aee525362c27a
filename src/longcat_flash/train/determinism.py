"""Seeds, deterministic-algorithm flags, and RNG capture/restore for bitwise-identical runs and resumes.

The data order never depends on these global generators (the sampler derives each epoch's permutation from
(seed, epoch)), and sampling at the end uses an explicit generator; the global states are still captured in every
checkpoint so that anything drawing from them (initialisation, a future dropout) resumes exactly.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NoDeterministicKernel(ValueError):
    """An op this run needs has no deterministic kernel on its device, and the run asked for deterministic ones."""


def set_deterministic(enabled: bool, device: torch.device | None = None) -> None:
    """Deterministic kernels everywhere, strictly: an op without one is an error (`no_deterministic_kernel_named`
    words it), not a silent fallback. Not torch's warn-only mode on a GPU either: there, SDPA's flash and
    memory-efficient backward keep their non-deterministic kernels and only warn."""
    if enabled and device is not None and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


@contextmanager
def no_deterministic_kernel_named() -> Iterator[None]:
    """Turn torch's error for an op without a deterministic kernel into one line naming the op and the way out."""
    try:
        yield
    except RuntimeError as err:
        if "does not have a deterministic implementation" not in str(err):
            raise
        op = str(err).split(" does not have", 1)[0].strip()
        raise NoDeterministicKernel(f"{op} has no deterministic kernel on this device, and the run asks for "
                                    "deterministic ones: --set deterministic=false runs it (the run is then no "
                                    "longer bitwise reproducible)") from None


@contextmanager
def global_state_restored() -> Iterator[None]:
    """Run a block that seeds the global generators and sets the deterministic flags (a training run), then put
    both back as they were: `train()` called from a user's script leaves that script's generators and flags as it
    found them (HF's Trainer too sets full determinism only when asked)."""
    rng = RNGState().state_dict()
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        RNGState().load_state_dict(rng)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2:]


class RNGState:
    """Checkpoint adapter for the global Python, NumPy and torch generators, and the generator of this process's
    own GPU when it runs on one (never the other GPUs': that would create a CUDA context on each of them)."""

    def state_dict(self) -> dict[str, Any]:
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (keys.tolist(), pos, has_gauss, gauss),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, keys, gauss = state["python"]
        random.setstate((version, tuple(keys), gauss))
        keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

"""What the commands share: the --device flag and the --out check."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..device import DEVICE_CHOICES


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (auto: CUDA when available, the local "
                                                     "rank's GPU under torchrun; else the CPU)")


def new_or_directory(out: str | Path | None) -> None:
    """An --out that names a file would fail deep inside with an OS error, and an empty one would write into the
    working directory; say so up front."""
    if out is not None and not str(out).strip():
        raise ValueError("--out is empty; name a directory")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")

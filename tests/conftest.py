"""Shared fixtures: tiny configs built in the test, float32, fixed seeds."""
from __future__ import annotations

import os

import pytest
import torch

from longcat_flash.cli import commands
from longcat_flash.presets import tiny


def pytest_configure(config) -> None:
    """Under pytest-xdist (the README's `-n 2`) each worker computes on one thread, and so do the commands it
    launches: two workers' OpenMP pools on 2 cores would each spin while the other runs (in-process training tests
    took 8x their time)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_speaker_to_wait_for(monkeypatch) -> None:
    """A rank played in this process (RANK set) has no torchrun that could cut off another rank's error line: its
    wait for that line (commands.QUIET_RANK_WAIT_S) would be 5 s lost. torchrun launches keep it."""
    monkeypatch.setattr(commands, "QUIET_RANK_WAIT_S", 0.0)


@pytest.fixture
def tiny_config():
    return tiny()

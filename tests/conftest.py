"""Shared fixtures: tiny configs built in the test, float32, fixed seeds."""
from __future__ import annotations

import pytest
import torch

from longcat_flash.cli import commands
from longcat_flash.presets import tiny


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

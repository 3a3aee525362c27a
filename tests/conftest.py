"""Shared fixtures: tiny configs built in the test, float32, fixed seeds."""
from __future__ import annotations

import pytest
import torch

from longcat_flash.presets import tiny


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return tiny()

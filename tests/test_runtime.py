"""The process-wide CPU allocator setting: applied on glibc, skipped on request."""
from __future__ import annotations

import platform

import pytest

from longcat_flash.runtime import tune_cpu_allocator


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    assert tune_cpu_allocator() is True
    monkeypatch.setenv("LONGCAT_TUNE_MALLOC", "0")
    assert tune_cpu_allocator() is False

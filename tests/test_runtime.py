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


HELD = """
import torch
from longcat_flash.runtime import release_free_heap, tune_cpu_allocator
rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
tune_cpu_allocator()
weights = torch.ones(64 * 2**20)  # 256 MB read, then replaced (converted, quantized) and freed
del weights
held = rss()
release_free_heap()
print(held - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_tuned_heap_gives_back_what_a_load_freed(tmp_path, monkeypatch):
    """With the tuned allocator the heap kept the weights a quantized load had replaced: a server with
    --quantize int8 held 4.0 GB where the unquantized one held 2.8 GB (the bench preset)."""
    import subprocess
    import sys

    returned = subprocess.run([sys.executable, "-c", HELD], capture_output=True, text=True, check=True).stdout
    assert int(returned) > 200, returned  # MB

    from longcat_flash.checkpoint.fresh import init_checkpoint
    from longcat_flash.infer import loader
    from longcat_flash.presets import tiny

    calls = []
    monkeypatch.setattr(loader, "release_free_heap", lambda: calls.append(True))
    loader.load_for_inference(init_checkpoint(tiny(), tmp_path / "tiny"), quantize="int8")
    assert calls == [True]

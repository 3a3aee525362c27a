"""Process-wide settings that make PyTorch fast on a CPU; one-shot commands and the benchmarks call them at start.

`longcat serve` tunes its engine process only: there a step's memory is bounded by the engine's token budget, so
what the heap keeps is small and reused every step, while the HTTP process's peaks depend on what clients send.

PyTorch's CPU allocator caches nothing: every tensor is a malloc. glibc serves large mallocs (above a threshold
that grows only up to 32 MB) with fresh mmap pages and gives freed heap memory back to the OS, so the same
activations are page-faulted and zeroed by the kernel again at every step: the logits alone of a small training
batch are 64 MB. Keeping large blocks on the heap and not trimming it reuses the pages, which is what jemalloc or
tcmalloc do when preloaded (PyTorch's CPU performance guide recommends them). Measured on `bench/bench_train.py`:
our bf16 step 0.94 -> 0.60 s, transformers' 1.87 -> 1.71 s. The cost is that the process keeps its peak memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = 1 << 30  # blocks below 1 GiB come from the heap; up to 1 GiB of free heap is kept


def tune_cpu_allocator() -> bool:
    """Tell glibc malloc to keep and reuse large blocks. Off with LONGCAT_TUNE_MALLOC=0; a no-op (False) where
    the C library is not glibc."""
    if os.environ.get("LONGCAT_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_THRESHOLD, _KEEP), (_M_TRIM_THRESHOLD, _KEEP), (_M_TOP_PAD, 64 << 20)))
    if not ok:
        log.info("mallopt refused the allocator settings; running with the C library's defaults")
    return ok


def release_free_heap() -> None:
    """Give the heap's free memory back to the OS (glibc's malloc_trim; elsewhere nothing). For after a load that
    replaced the weights it read (converted or quantized): with tune_cpu_allocator's settings the heap keeps what
    the originals freed, and a quantized model's process held more than an unquantized one's."""
    if not sys.platform.startswith("linux"):
        return
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")

"""For the serving tests: a real `longcat serve` subprocess for the end-to-end ones (serve/launch.py, one OpenMP
thread), and whether code runs on an event loop."""
from __future__ import annotations

import asyncio

from longcat_flash.serve.launch import free_port, running_server

__all__ = ["free_port", "on_a_loop", "running_server"]


def on_a_loop() -> bool:
    """Whether the caller runs on an event loop (not in a worker thread)."""
    try:
        return asyncio.get_running_loop() is not None
    except RuntimeError:
        return False

"""A real `longcat serve` subprocess for the end-to-end serving tests (serve/launch.py, one OpenMP thread)."""
from __future__ import annotations

from longcat_flash.serve.launch import free_port, running_server

__all__ = ["free_port", "running_server"]

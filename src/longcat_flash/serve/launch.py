"""A real `longcat serve` subprocess on a free loopback port: what the end-to-end tests, `bench/bench_serve.py` and
`experiments/tool_use.py` talk to over HTTP, started one way everywhere."""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: str | Path, *args: str, threads: int = 1, startup_s: float = 90) -> Iterator[str]:
    """Serve `model_dir` (`threads` OpenMP threads, extra CLI `args`) until the block ends; yields the base URL
    once /health answers. A server that dies or does not come up raises with its own output. The port is the
    OS's pick (`--port 0`), read from the server's first line: one picked here (free_port) could be taken before
    the server binds it, and another server answering there passed for this one."""
    exe = [shutil.which("longcat")] if shutil.which("longcat") else [sys.executable, "-m", "longcat_flash.cli"]
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a long run's output can never block the server
        proc = subprocess.Popen([*exe, "serve", "--model", str(model_dir), "--port", "0", *args],
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=_stop_with_parent if _PRCTL else None)
        base = None
        try:
            deadline = time.time() + startup_s
            while base is None or not _healthy(base):
                base = base or _announced_base(log)
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    proc.wait()
                    log.seek(0)
                    raise RuntimeError(f"server did not come up in {startup_s} s:\n{log.read().decode()}")
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _announced_base(log) -> str | None:
    """The base URL in `longcat serve`'s first line, once written ("longcat serve: NAME on http://HOST:PORT/v1");
    read without moving the offset the server writes at."""
    found = re.search(rb"^longcat serve: .* on (http://\S+):(\d+)/v1 ", os.pread(log.fileno(), 1 << 16, 0), re.M)
    return f"{found[1].decode()}:{int(found[2])}" if found else None


def _prctl() -> Callable[..., int] | None:
    """Linux's prctl, or None: a server whose parent is killed (SIGKILL skips the `finally` above) stops with it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()
PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (an experiment killed by a time-out left its server
    running, holding a port and its model's memory)."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def _healthy(base: str) -> bool:
    """Whether /health answers 200 (the standard library's client: the `serve` extra installs no HTTP client)."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False

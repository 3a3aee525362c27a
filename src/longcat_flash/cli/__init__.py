"""`longcat` entry point. The commands (commands.py) import torch, seconds of work: a Ctrl-C in them ends the
command as a Ctrl-C during one does, quietly with the shell's status for SIGINT, not with an import's traceback."""
from __future__ import annotations

import gc
import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from .commands import main as run
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    run(argv)


def command() -> None:
    """The `longcat` command itself (and `python -m longcat_flash.cli`): main(), then an exit whose last garbage
    collections skip everything the command built (they took ~1 s of each torch process's exit on a 2-core host).
    Memory goes back to the OS anyway; finalizers of cyclic garbage no longer run at exit, so every file or writer
    a command opens is closed explicitly. main() alone stays for callers that go on running."""
    try:
        main()
    finally:
        gc.freeze()

"""`longcat` entry point. The commands (commands.py) import torch, seconds of work: a Ctrl-C in them ends the
command as a Ctrl-C during one does, quietly with the shell's status for SIGINT, not with an import's traceback."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from .commands import main as run
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    run(argv)

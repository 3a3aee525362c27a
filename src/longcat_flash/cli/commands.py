"""The `longcat` command line: parse the arguments, refuse combinations of flags that do not fit together, build
objects and call one function per command; the work itself lives in the packages."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from ..device import DeviceError, out_of_memory
from ..distributed.env import RankZeroFailed, launched, peer_lost
from ..runtime import tune_cpu_allocator
from . import analysis, data, inference, training

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    *analysis.COMMANDS, *training.COMMANDS, *inference.COMMANDS, *data.COMMANDS]
MULTI_PROCESS = training.MULTI_PROCESS  # the commands torchrun may launch
PRINTS_ITS_RESULT = ("generate", "chat", "info", "cost")  # what these make is their standard output
QUIET_RANK_WAIT_S = 5.0  # how long a rank that leaves an error line to another rank waits for it to print


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longcat", description="LongCat-Flash: train, run and serve")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    parser.set_defaults(subcommands=sub.choices)  # so an unknown flag is reported with its command's usage
    return parser


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # the shell's status for the signal, after the cleanup a raise runs


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; under torchrun a usage error (or --help) is printed by rank 0 alone (every rank has the
    same one), the other ranks exit with the same status quietly."""
    quiet = launched() and _rank() != 0
    with contextlib.ExitStack() as silenced:
        if quiet:
            silenced.enter_context(contextlib.redirect_stderr(io.StringIO()))
            silenced.enter_context(contextlib.redirect_stdout(io.StringIO()))
        try:
            args, unknown = build_parser().parse_known_args(argv)
            if unknown:
                args.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        except SystemExit as leaving:
            if quiet and leaving.code:
                _wait_for_the_speaker()  # rank 0's usage error
            raise
    return args


def _wait_for_the_speaker() -> None:
    """Give the rank that prints the error this rank leaves to it (rank 0, or this node's first rank) time to say
    it: torchrun stops every worker once one exits with an error, so a quiet rank that left at once cut that line
    off (in 5 of 9 launches at world 3)."""
    time.sleep(QUIET_RANK_WAIT_S)


def _hold_closed_streams() -> list[str]:
    """Put /dev/null on a closed standard stream (`<&-`, `>&-`): its descriptor would be the next file opened (a
    checkpoint, a socket), where a library's print lands, and torch's kernel build fails on a missing stdout. A
    closed stdin reads as an empty input. Returns the names of those that were closed."""
    closed = []
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        if getattr(sys, name) is not None:
            continue
        held = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)  # the lowest free descriptor
        if held != fd:  # an import opened a file on it meanwhile: leave that file alone
            os.close(held)
        setattr(sys, name, open(os.devnull if held != fd else fd, "r" if fd == 0 else "w", closefd=held != fd))
        closed.append(name)
    return closed


def _prints_its_result(args: argparse.Namespace) -> bool:
    """Whether what the command makes goes to standard output: its result, `--print-config`, `--out -`."""
    return (args.command in PRINTS_ITS_RESULT or getattr(args, "print_config", False)
            or getattr(args, "out", None) == "-")


def main(argv: list[str] | None = None) -> None:
    closed = _hold_closed_streams()
    args = _parse(argv)
    if "stdout" in closed and _prints_its_result(args):  # `echo hi >&-` fails too: "Bad file descriptor"
        sys.exit(f"longcat {args.command}: standard output is closed: nowhere to write what it prints")
    if args.command != "serve":  # one-shot commands reuse their large blocks; serve tunes its engine process only
        tune_cpu_allocator()
    # SIGTERM (`timeout`, `kill`) ends a one-process command as Ctrl-C does, through its cleanup: a half-written
    # file's temporary name is removed. serve has its own shutdown; torchrun stops its workers itself.
    on_term = args.command != "serve" and not launched() and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_term else None
    try:
        _run(args)
    finally:
        if on_term:  # as it was (None: a handler not set from Python, taken as the default)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(args: argparse.Namespace) -> None:
    try:
        if launched() and args.command not in MULTI_PROCESS:  # N copies would each write the same files
            raise ValueError(f"runs in one process; start it without torchrun (only {' and '.join(MULTI_PROCESS)} "
                             "run under torchrun)")
        if launched() and _rank():  # every rank reads the same files: rank 0 warns once
            logging.getLogger(__package__.rpartition(".")[0]).setLevel(logging.ERROR)  # the whole package's
        args.run(args)
    except DeviceError as err:  # a usage error, like a bad flag: status 2; each rank's own (its node's devices)
        print(f"{_speaker(args.command)}: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly with the shell's status for SIGINT
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader left (`longcat ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except RankZeroFailed:
        _wait_for_the_speaker()  # rank 0 prints what failed
        _leave(1)
    except (RuntimeError, MemoryError) as err:  # memory, or a collective: torch's errors from deep inside
        if what := out_of_memory(err):  # each rank its own: its device, its share of the host
            _leave(f"{_speaker(args.command)}: out of memory ({what}); it needs a smaller model, batch or sequence, "
                   "or a machine with more memory")
        reason = peer_lost(err) if launched() else ""  # a collective failed: NCCL's and gloo's own errors
        if not reason:
            raise
        _leave(f"{_speaker(args.command, rank_zero_too=True)}: lost contact with the other ranks "
               f"({reason}): one of them stopped (torchrun's summary names it) or waited past --dist-timeout")
    except (ValueError, OSError, KeyError) as err:  # OSError: a read-only or full disk, a missing file, ...
        if _rank() and isinstance(err, (ValueError, KeyError)) and int(os.environ.get("LOCAL_RANK", "0")):
            _wait_for_the_speaker()  # a node's ranks share its files and settings: its first rank prints the one
            _leave(1)  # message, so a node whose files differ (a --resume folder missing there) says why there
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
        _leave(f"{_speaker(args.command)}: {message}")


def _rank() -> int:
    """This process's rank as the launcher set it (0 in one process), with or without a process group."""
    return int(os.environ.get("RANK", "0"))


def _speaker(command: str, rank_zero_too: bool = False) -> str:
    """How an error line starts: `longcat COMMAND`, and the rank under torchrun where it is not 0."""
    return f"longcat {command} (rank {_rank()})" if _rank() or rank_zero_too else f"longcat {command}"


def _leave(status: int | str) -> NoReturn:
    """sys.exit(status); but a process of a torchrun group says its line and leaves at once: finalizing a process
    group whose peers have left can abort the interpreter ("terminate called without an active exception",
    status -6 instead of 1)."""
    import torch.distributed as dist

    if not (launched() and dist.is_initialized()):
        sys.exit(status)
    if isinstance(status, str):
        print(status, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1 if isinstance(status, str) else status)

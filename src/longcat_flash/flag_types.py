"""argparse types and checks for the scripts' number flags (bench/, experiments/): a bad value is a usage error
naming the flag (status 2), not a traceback from deep inside a run, nor a run that measures nothing.

This module imports nothing from the package: every layer may use it."""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import Any


def _number(kind: type, low: float, strict: bool) -> Any:
    """An argparse type: a finite `kind` above `low` (strict) or at least `low`."""
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if kind is float and not math.isfinite(value):  # (an int is finite; isfinite overflows on a huge one)
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value
    return convert


integer = _number(int, -math.inf, strict=False)  # any integer, for flags that check their own range
positive_int = _number(int, 0, strict=True)  # steps, seeds, counts, threads, rows
non_negative_int = _number(int, 0, strict=False)  # a seed
positive_float = _number(float, 0, strict=True)  # learning rates, ε, RoPE bases, tolerances, time limits
non_negative_float = _number(float, 0, strict=False)  # loss weights


def _at_most(convert: Any, high: float, interval: str) -> Any:
    """An argparse type: `convert`'s value, at most `high` (`interval` says the whole range in its message)."""
    def check(text: str) -> Any:
        value = convert(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value
    return check


fraction = _at_most(non_negative_float, 1, "[0, 1]")  # a rate, a share
top_p = _at_most(positive_float, 1, "(0, 1]")  # a nucleus
temperature = _at_most(non_negative_float, 100, "[0, 100]")  # a sampling temperature (0: greedy)
penalty = _at_most(_number(float, -2, strict=False), 2, "[-2, 2]")  # OpenAI's presence / frequency
CPUS = os.cpu_count() or 1
threads = _at_most(positive_int, CPUS, f"[1, {CPUS}] (this machine's CPUs)")  # past them: OpenMP fails to start
seed = _at_most(non_negative_int, 2**63 - 1, "[0, 2^63)")  # torch's generators take an int64; -1 wrapped silently


def user_path(text: str) -> str:
    """A path flag's value with `~` expanded: the shell expands `--out ~/run` but not `--out=~/run`, which made a
    folder named `~` in the working directory (and `rm -rf ~` is how one removes it)."""
    return os.path.expanduser(text)


def sampling_seed(text: str) -> int:
    """A sampling seed: any int64, as the server (OpenAI, vLLM) takes it (infer/sampling.py maps it to a
    generator's)."""
    value = integer(text)
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [-2^63, 2^63), got {text}")
    return value


def distinct(flag: str, values: Sequence[Any], least: int = 1, need: str = "") -> list[Any]:
    """The values of a list flag, checked: a repeated one (which would rerun a variant, or shrink a grid below what
    was asked) or fewer than `least` of them, which `need` requires, is a ValueError."""
    if repeated := sorted({v for v in values if list(values).count(v) > 1}):
        shown = (f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in repeated)
        raise ValueError(f"{flag}: {', '.join(shown)} given more than once")
    if len(values) < least:
        raise ValueError(f"{flag}: {need} needs at least {least} distinct values, got {len(values)}")
    return list(values)


def parse_distinct(parser: argparse.ArgumentParser, *dests: str) -> argparse.Namespace:
    """`parser.parse_args()`, with the list flags `dests` held to distinct values (a usage error otherwise)."""
    args = parser.parse_args()
    for dest in dests:
        try:
            distinct(f"--{dest.replace('_', '-')}", getattr(args, dest))
        except ValueError as err:
            parser.error(str(err))
    return args

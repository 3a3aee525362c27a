"""Helpers shared by the training tests: a small offline corpus and a seconds-long tiny recipe."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from longcat_flash.train.config import TrainConfig, apply_overrides, recipe

CORPUS_FILES = ("json/decoder.py", "json/encoder.py", "textwrap.py", "heapq.py", "bisect.py", "string.py",
                "glob.py", "fnmatch.py", "functools.py")


def make_corpus(root: Path) -> Path:
    """~140 KB of standard-library Python in `root` (a directory source)."""
    root.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_FILES:
        shutil.copy(stdlib / name, root / name.replace("/", "_"))
    return root


def tiny_overrides(corpus: Path, cache: Path, *extra: str) -> list[str]:
    return [f"data.source={corpus}", f"data.cache_dir={cache}", *extra]


def tiny_config(corpus: Path, cache: Path, *extra: str) -> TrainConfig:
    return apply_overrides(recipe("tiny"), tiny_overrides(corpus, cache, *extra))


@contextlib.contextmanager
def run_directory_held(out: Path) -> Iterator[subprocess.Popen]:
    """Another live process holding `out`'s run lock (train/run_lock.py) for the block; killed after it."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from longcat_flash.train import run_lock; run_lock.hold(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()

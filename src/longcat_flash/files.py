"""Writing files that readers never see half-written, with the permissions the user's umask asks for, the one
folder the package keeps its caches in, and what those caches are keyed by.

One way for the whole package: write under a temporary name beside the target (same directory, so the rename is
atomic on one filesystem), then rename it into place. Writers that create their file privately (safetensors
writes mode 0600 whatever the umask) are widened to 0o666 & ~umask, the mode `open()` would have given, so
colleagues on a shared filesystem can read a model, a checkpoint or a token shard whenever the umask allows it.

This module imports nothing from the package: every layer may use it.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_home() -> Path:
    """$XDG_CACHE_HOME/longcat-flash, or ~/.cache/longcat-flash: the token shards' and the compiled kernels' cache.
    An empty or relative $XDG_CACHE_HOME is ignored, as the XDG spec says (it put the cache in the working
    directory); a set one is how a user whose home is read-only (a container, a cluster) moves every cache."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "longcat-flash"


def hash_file_states(h: hashlib._Hash, paths: Iterable[Path]) -> None:
    """Each file's path, size and modification time into `h`: what a cache made from the files is keyed by (an
    edit changes the size or the time; reading the contents to know would cost as much as the cache saves)."""
    for path in paths:
        stat = path.stat()
        h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def current_umask() -> int:
    """The process umask. POSIX can only read it by setting it, so it is set and restored at once."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def make_folder(path: Path, what: str) -> None:
    """mkdir -p `path`, where a file or a broken link in the way is said by name (`what`: the flag or field that
    gave it), not as a bare "[Errno 17] File exists"."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        blocked = Path(err.filename or path)
        kind = "a broken link" if blocked.is_symlink() and not blocked.exists() else "a file"
        where = "" if blocked == path else f": {blocked}"
        raise NotADirectoryError(f"{what} {path}{where} is {kind}, not a folder") from None


def chmod_per_umask(path: str | Path) -> None:
    """Give `path` the mode a plain `open(path, "w")` would have: 0o666 less the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def _short(name: str, most: int = 200) -> str:
    """`name`, or for one of over `most` bytes its first ~120 and a hash of it, its suffix kept: the hidden,
    per-process name beside it must stay within a file name's 255 bytes (a 250-byte --out could not be written)."""
    if len(name.encode()) <= most:
        return name
    suffix = Path(name).suffix if len(Path(name).suffix) <= 16 else ""
    head = name.encode()[:120].decode("utf-8", "ignore")
    return f"{head}~{hashlib.sha256(name.encode()).hexdigest()[:12]}{suffix}"


@contextmanager
def temporary_file(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` to write into (per process: data-parallel ranks may write at once).

    When the block ends the file has the umask's mode; the caller renames it (several files can then be renamed
    together, as a sharded export does). When the block fails the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{_short(path.name)}.{os.getpid()}.tmp")
    try:
        yield tmp
        chmod_per_umask(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """A temporary path to write into; when the block succeeds it replaces `path` in one rename."""
    with temporary_file(path) as tmp:
        yield tmp
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")

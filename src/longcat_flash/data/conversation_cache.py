"""SFT conversations, rendered and tokenized, cached on disk as the pre-training corpus's token shards are:
`longcat sft` rendered and tokenized every conversation again at each start and resume (50k conversations: three
minutes, on every rank of a torchrun).

`cache_dir/conversations-<name>-<key>.npz` holds every conversation's ids and trained mask end to end, with their
lengths (arrays only: read back without pickle). The key covers what the result depends on: the files (paths,
sizes, mtimes), the tokenizer (its vocabulary and chat templates), the columns ignored, the stop texts, the window,
and the source of the code that renders and tokenizes (a change to it rebuilds every cache).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..files import atomic_write, hash_file_states, make_folder
from .conversation_tokens import ChatTokenizer
from .shards import remove_abandoned_parts

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent.parent
RENDERING_CODE = ("data", "tokenizer", "chat_template.py")  # what turns a row into ids and a mask


def cache_path(cache_dir: Path, files: Sequence[Path], tokenizer: ChatTokenizer, ignore: Sequence[str],
               ends: Sequence[str], window: int) -> Path:
    """Where the tokenized conversations of `files` are cached for these settings."""
    rendering = (tokenizer.fingerprint, tokenizer.chat_template, tokenizer.tool_chat_template, tokenizer.bos_token,
                 tokenizer.eos_token, tokenizer.pad_token)  # the vocabulary, and what the templates are given
    key = hashlib.sha256(repr((_code_digest(), rendering, tuple(ignore), tuple(ends), window)).encode())
    hash_file_states(key, [path.resolve() for path in files])
    return cache_dir / f"conversations-{files[0].stem if len(files) == 1 else files[0].parent.name}-" \
                       f"{key.hexdigest()[:16]}.npz"


def load(path: Path) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The cached (ids, trained) of each conversation, or None when there is no complete cache at `path`."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            ids, trained, lengths = saved["ids"], saved["trained"], saved["lengths"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent, empty, cut short: made again
        return None
    if not len(ids) == len(trained) == lengths.sum():
        return None
    cuts = np.cumsum(lengths)[:-1]
    return list(zip(np.split(ids, cuts), np.split(trained, cuts)))


def save(path: Path, encoded: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write the cache whole under a temporary name, then rename it: a reader never sees half of one. A cache that
    cannot be written (a read-only or full disk) is said once; the run goes on without it."""
    try:
        make_folder(path.parent, "data.cache_dir")
        remove_abandoned_parts(path.parent)
        with atomic_write(path) as tmp, tmp.open("wb") as f:
            np.savez(f, ids=np.concatenate([ids for ids, _ in encoded]),
                     trained=np.concatenate([trained for _, trained in encoded]),
                     lengths=np.array([len(ids) for ids, _ in encoded], dtype=np.int64))
    except (OSError, ValueError) as err:
        log.warning("the tokenized conversations are not cached (%s): the next start prepares them again", err)


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    digest = hashlib.sha256()
    for part in RENDERING_CODE:
        root = PACKAGE / part
        for source in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(source.read_bytes())
    return digest.hexdigest()

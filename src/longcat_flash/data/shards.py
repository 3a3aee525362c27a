"""Token shards: a corpus tokenized once into one flat token array on disk (documents joined by eos), cached.

`cache_dir/<name>-<fingerprint>.bin` holds the tokens (uint16, or uint32 above 65536 ids) and the `.json` beside
it their `ShardMeta`; the JSON is written last, so it marks the shard complete. A shard is reused while its
fingerprint (corpus files, sizes, mtimes, caps, tokenizer) matches.

This package must not import longcat_flash.tokenizer (siblings never import each other); it needs only what
`TokenizerLike` describes.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from ..files import atomic_write, atomic_write_text, make_folder
from .corpus import Corpus

ABANDONED_AFTER_S = 3600  # a partial shard nobody has written to for this long is a killed tokenization's
SHARD_FORMAT_VERSION = 2  # bump when the shard layout or what it holds changes, so old caches are rebuilt (2: a
# corpus cut at data.max_bytes exactly; 1 took the last document whole)


class TokenizerLike(Protocol):
    """What the data pipeline needs from a tokenizer (longcat_flash.tokenizer.Tokenizer satisfies it)."""

    eos_id: int | None
    vocab_size: int
    fingerprint: str

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class ShardMeta:
    """The JSON beside a `.bin` shard: enough to read it and to know whether it is still current."""

    fingerprint: str
    tokenizer_fingerprint: str
    source: str
    n_tokens: int
    n_docs: int
    dtype: str

    @classmethod
    def read(cls, bin_path: Path) -> ShardMeta:
        meta_path = bin_path.with_suffix(".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"token shard metadata not found: {meta_path}")
        return cls(**json.loads(meta_path.read_text(encoding="utf-8")))


def build_token_shard(source: str | Path | None, tokenizer: TokenizerLike, cache_dir: str | Path, *,
                      text_field: str = "text", max_bytes: int | None = None, max_docs: int | None = None,
                      chunk_bytes: int = 1 << 20, progress: bool | None = True) -> Path:
    """Tokenize `source` once into `cache_dir/<name>-<fingerprint>.bin` (docs joined by eos); returns its path.

    A shard whose fingerprint (corpus files + sizes + mtimes + caps + tokenizer) matches is reused as is.
    `progress`: a bar; False: a line as tokenizing starts and one as it ends (a batch job's log said nothing for
    minutes); None: silent.
    """
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos token, which separates documents: name one in a "
                         'tokenizer_config.json beside its tokenizer.json ({"eos_token": "[SEP]"}, say)')
    corpus = Corpus(source, text_field, max_bytes, max_docs)
    fingerprint = hashlib.sha256(
        f"{SHARD_FORMAT_VERSION}\0{corpus.fingerprint()}\0{tokenizer.fingerprint}".encode()).hexdigest()
    bin_path = Path(cache_dir) / f"{corpus.name}-{fingerprint[:16]}.bin"
    if _shard_is_current(bin_path, fingerprint):
        return bin_path
    make_folder(bin_path.parent, "data.cache_dir")
    remove_abandoned_parts(bin_path.parent)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    with atomic_write(bin_path) as tmp, tmp.open("wb") as f:
        n_tokens, n_docs = _write_tokens(corpus, tokenizer, f, dtype, chunk_bytes, progress)
        if n_tokens == 0:
            raise ValueError(f"corpus {corpus.root} produced no text (text_field={text_field!r})")
    meta = ShardMeta(fingerprint, tokenizer.fingerprint, str(corpus.root), n_tokens, n_docs, np.dtype(dtype).name)
    atomic_write_text(bin_path.with_suffix(".json"), json.dumps(asdict(meta), indent=2) + "\n")  # commit marker
    if progress is not None and (others := _other_shards(bin_path, meta)):
        print(f"note: {len(others)} other token shard(s) of {corpus.root} stay in {bin_path.parent} "
              f"({megabytes(sum(p.stat().st_size for p in others))}; made before the corpus changed, with another "
              f"tokenizer or data.max_bytes, or by an older longcat-flash): delete those no run reads: "
              f"{', '.join(p.name for p in others)}", flush=True)
    return bin_path


def _other_shards(bin_path: Path, meta: ShardMeta) -> list[Path]:
    """The other complete shards in bin_path's folder of the same corpus: a cache keeps each version of a corpus
    it tokenized (as `datasets` keeps its cache files), each as large as the corpus, which nothing reported (every
    edit of a 450 MB corpus left another 280 MB; a run that trains its tokenizer trains another one then)."""
    others = []
    for other in bin_path.parent.glob("*.bin"):
        with contextlib.suppress(FileNotFoundError, TypeError, ValueError):
            if other != bin_path and ShardMeta.read(other).source == meta.source:
                others.append(other)
    return sorted(others)


def megabytes(n: int) -> str:
    """A size for a message: three digits, where a small corpus read "0 MB"."""
    return f"{n / 1e6:.3g} MB"


def remove_abandoned_parts(cache_dir: Path) -> None:
    """Delete the partial shards (and tokenized conversations, data/conversation_cache.py) of writes killed midway
    (SIGKILL, torchrun stopping its workers: no exception cleans up after those), each as large as its data: those
    no process has written to for ABANDONED_AFTER_S. A live writer (another run, another node on a shared cache)
    writes every few seconds."""
    for part in itertools.chain(cache_dir.glob(".*.bin.*.tmp"), cache_dir.glob(".*.npz.*.tmp")):
        with contextlib.suppress(FileNotFoundError):  # its writer may finish (rename it) meanwhile
            if time.time() - part.stat().st_mtime > ABANDONED_AFTER_S:
                part.unlink()


def _shard_is_current(bin_path: Path, fingerprint: str) -> bool:
    try:
        meta = ShardMeta.read(bin_path)
    except (FileNotFoundError, TypeError, ValueError):
        return False
    expected_size = meta.n_tokens * np.dtype(meta.dtype).itemsize
    return meta.fingerprint == fingerprint and bin_path.is_file() and bin_path.stat().st_size == expected_size


def _write_tokens(corpus: Corpus, tokenizer: TokenizerLike, f: Any, dtype: type[np.integer], chunk_bytes: int,
                  progress: bool | None) -> tuple[int, int]:
    """Encode documents in ~chunk_bytes batches (parallel in the Rust tokenizer) and append them to `f`; a longer
    document goes in pieces (`_pieces`), its eos after the last."""
    n_tokens, n_docs, eos, files = 0, 0, [tokenizer.eos_id], corpus.files()
    size = sum(p.stat().st_size for p in files)
    # the text's size, bounded by the files' (a .jsonl or .parquet holds less text than its bytes); not for
    # gzip-compressed files, a third of their text (the bar stood at 100% with most of the work left): a count
    total = None if any(p.name.endswith(".gz") for p in files) else min(size, corpus.max_bytes or sys.maxsize)
    pieces = ((piece, last) for doc in corpus.documents(files)
              for piece, last in _marked_last(_pieces(doc, chunk_bytes, tokenizer)))
    start = time.monotonic()
    if progress is False:
        print(f"tokenizing {corpus.root} ({megabytes(size)} of files) into the token cache", flush=True)
    with tqdm(desc=f"tokenizing {corpus.name}", total=total, unit="B", unit_scale=True,
              disable=progress is not True) as bar:
        for chunk in _chunks(pieces, chunk_bytes):
            encoded = tokenizer.encode_batch([piece for piece, _ in chunk])
            ends = [last for _, last in chunk]
            count = sum(len(ids) for ids in encoded) + sum(ends)
            flat = itertools.chain.from_iterable(itertools.chain(ids, eos * last) for ids, last in zip(encoded, ends))
            np.fromiter(flat, dtype=dtype, count=count).tofile(f)
            n_tokens, n_docs = n_tokens + count, n_docs + sum(ends)
            bar.update(sum(len(piece.encode("utf-8")) for piece, _ in chunk))
            bar.set_postfix(tokens=n_tokens, refresh=False)
        bar.total = bar.n  # file sizes overestimate .jsonl/.parquet text; end the bar at 100%
    if progress is False:
        print(f"tokenized {corpus.root}: {n_tokens} tokens, {n_docs} documents in {time.monotonic() - start:.0f} s",
              flush=True)
    return n_tokens, n_docs


def _chunks(pieces: Iterator[tuple[str, bool]], chunk_bytes: int) -> Iterator[list[tuple[str, bool]]]:
    """Group (text, ends a document) pieces into lists of about `chunk_bytes` characters (bounds memory, keeps
    batches big)."""
    chunk, size = [], 0
    for piece in pieces:
        chunk.append(piece)
        if (size := size + len(piece[0])) >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _marked_last(pieces: list[str]) -> Iterator[tuple[str, bool]]:
    return ((piece, i == len(pieces) - 1) for i, piece in enumerate(pieces))


MOST_WHOLE = 4 << 20  # characters left whole where no exact cut is found (~180 bytes each while encoded)


def _pieces(doc: str, size: int, tokenizer: TokenizerLike) -> list[str]:
    """`doc` in pieces of about `size` characters: a 50 MB text file encoded at once took 6 GB (the tokenizer's
    records of each token). A cut is made where the tokenizer encodes the text around it as the two sides apart (a
    byte-level BPE does at a line start, before a space between words, and at most places of a text with neither,
    a base64 blob; a SentencePiece "▁" prefix does not), so the tokens are those of the whole document. Where no
    such place is found the rest stays whole up to MOST_WHOLE characters, and past that is cut anyway, its tokens
    at the cut then its sides' (a 20 MB record with no place took 4.3 GB)."""
    pieces, start = [], 0
    while len(doc) - start > size:
        cut = _cut(doc, start + size, tokenizer)
        if cut is None:
            if len(doc) - start <= MOST_WHOLE:
                break
            cut = start + size
        pieces.append(doc[start:cut])
        start = cut
    return [*pieces, doc[start:]]


CUTS = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")  # a line start or a word's space, between non-blanks


def _cut(doc: str, at: int, tokenizer: TokenizerLike, tries: int = 16, context: int = 256) -> int | None:
    """The first place from `at` on where the text around it (`context` characters each side) encodes as its two
    sides apart: of `tries` places of CUTS in the next `context` x `tries` characters, else of the `tries`
    characters from `at` (a text without spaces or lines); None if none of them does."""
    near = (place.start() for place in CUTS.finditer(doc, at, at + context * tries))  # not the whole rest's scan
    for cut in itertools.chain(itertools.islice(near, tries), range(at, min(at + tries, len(doc)))):
        left, right = doc[max(cut - context, 0):cut], doc[cut:cut + context]
        both, alone_left, alone_right = tokenizer.encode_batch([left + right, left, right])
        if both == alone_left + alone_right:
            return cut
    return None

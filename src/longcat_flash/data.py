"""Training data: corpora, a cached token shard, fixed-length packing, and a resumable data-parallel sampler.

Pipeline:  corpus files -> documents (str) -> one flat token array on disk (docs joined by eos) -> windows of
seq_len + 1 tokens -> batches. The default corpus is the running Python's standard library (~30 MB of .py files),
so training works offline with no download.

Determinism is stateless: the order of epoch e is a permutation drawn from a numpy Generator seeded with
(seed, e), so a sampler's whole state is (epoch, position). Resuming from that state replays exactly the batches an
uninterrupted run would have drawn, at any data-parallel world size.

This module must not import longcat_flash.tokenizer (siblings never import each other); it needs only what
`TokenizerLike` describes.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from tqdm import tqdm

STDLIB = "stdlib"  # the source name (or None) that selects the running Python's standard library
DOC_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet")  # what a directory source reads
SHARD_FORMAT_VERSION = 1  # bump when the shard layout changes, so old caches are rebuilt
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class TokenizerLike(Protocol):
    """What the data pipeline needs from a tokenizer (longcat_flash.tokenizer.Tokenizer satisfies it)."""

    eos_id: int | None
    vocab_size: int
    fingerprint: str

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


# ---- corpora ----

@dataclass(frozen=True)
class Corpus:
    """Where documents come from: `source` is None/"stdlib", a directory, a text file, a .jsonl or a .parquet.

    `max_bytes` / `max_docs` cap the documents read (UTF-8 bytes of text), for quick runs and tokenizer samples.
    """

    source: str | Path | None = None
    text_field: str = "text"
    max_bytes: int | None = None
    max_docs: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_docs"):
            if (value := getattr(self, name)) is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"Corpus.{name} must be a positive integer or None, got {value!r}")

    @property
    def is_stdlib(self) -> bool:
        return self.source is None or (isinstance(self.source, str) and self.source == STDLIB)

    @property
    def root(self) -> Path:
        return Path(sysconfig.get_paths()["stdlib"]) if self.is_stdlib else Path(self.source).expanduser()

    @property
    def name(self) -> str:
        return STDLIB if self.is_stdlib else self.root.stem or "corpus"

    def files(self) -> list[Path]:
        """The corpus files in a deterministic (sorted) order; a missing path fails here, naming it."""
        root = self.root
        if self.is_stdlib:
            return _stdlib_files(root)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise FileNotFoundError(f"corpus source not found: {root}")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in DOC_SUFFIXES)
        if not files:
            raise ValueError(f"corpus directory {root} holds no {'/'.join(DOC_SUFFIXES)} files")
        return files

    def documents(self, files: Sequence[Path] | None = None) -> Iterator[str]:
        """Non-empty documents of `files` (default: all), in order, stopping at max_bytes / max_docs."""
        docs = (doc for path in (self.files() if files is None else files)
                for doc in _read_documents(path, self.text_field) if doc)
        n_bytes = 0
        for index, doc in enumerate(docs):
            if (self.max_docs is not None and index >= self.max_docs) or \
                    (self.max_bytes is not None and n_bytes >= self.max_bytes):
                return
            n_bytes += len(doc.encode("utf-8"))
            yield doc

    def fingerprint(self) -> str:
        """Hash of what the documents depend on: paths, sizes, mtimes, field and caps (not the file contents)."""
        h = hashlib.sha256(repr((SHARD_FORMAT_VERSION, str(self.root.resolve()), self.text_field,
                                 self.max_bytes, self.max_docs)).encode())
        for path in self.files():
            stat = path.stat()
            h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _stdlib_files(root: Path) -> list[Path]:
    """The stdlib's .py files; site-packages is pruned from the walk, not filtered after it (it can be GBs)."""
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted(files)


def iter_documents(source: str | Path | None = None, *, text_field: str = "text", max_bytes: int | None = None,
                   max_docs: int | None = None) -> Iterator[str]:
    """Documents of `source` (see Corpus), e.g. to train a tokenizer or inspect a corpus."""
    return Corpus(source, text_field, max_bytes, max_docs).documents()


def sample_texts(source: str | Path | None = None, max_bytes: int = 16_000_000, *,
                 text_field: str = "text") -> list[str]:
    """About `max_bytes` of documents from evenly spread files of the corpus, for tokenizer training.

    Spreading matters for a directory: the first N MB of a sorted stdlib is mostly packages starting with a-c.
    A single-file source gives its first `max_bytes`.
    """
    corpus = Corpus(source, text_field, max_bytes=max_bytes)
    files = corpus.files()
    keep = min(1.0, max_bytes / max(1, sum(p.stat().st_size for p in files)))
    spread = [path for i, path in enumerate(files) if int((i + 1) * keep) > int(i * keep)]  # a `keep` fraction
    return list(corpus.documents(spread))


def _read_documents(path: Path, text_field: str) -> Iterator[str]:
    """One document per text file, per .jsonl line, per .parquet row."""
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, text_field)
    else:
        # errors="replace": a stray non-UTF-8 byte (a few stdlib files are latin-1) should not stop a run.
        yield path.read_text(encoding="utf-8", errors="replace")


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from err
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{line_no}: no text_field {text_field!r} (has {keys})")
            if not isinstance(record[text_field], str):
                raise ValueError(f"{path}:{line_no}: field {text_field!r} must be a string, "
                                 f"got {type(record[text_field]).__name__}")
            yield record[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or longcat-flash[dev])") from err
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no text_field column {text_field!r} (has {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


# ---- token shards ----

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
                      chunk_bytes: int = 1 << 20, progress: bool = True) -> Path:
    """Tokenize `source` once into `cache_dir/<name>-<fingerprint>.bin` (docs joined by eos); returns its path.

    A shard whose fingerprint (corpus files + sizes + mtimes + caps + tokenizer) matches is reused as is.
    """
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos token; documents are separated by eos")
    corpus = Corpus(source, text_field, max_bytes, max_docs)
    fingerprint = hashlib.sha256(f"{corpus.fingerprint()}\0{tokenizer.fingerprint}".encode()).hexdigest()
    bin_path = Path(cache_dir) / f"{corpus.name}-{fingerprint[:16]}.bin"
    if _shard_is_current(bin_path, fingerprint):
        return bin_path
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    tmp_path = bin_path.with_suffix(f".{os.getpid()}.tmp")  # per process: DP ranks may build at once
    try:
        with tmp_path.open("wb") as f:
            n_tokens, n_docs = _write_tokens(corpus, tokenizer, f, dtype, chunk_bytes, progress)
        if n_tokens == 0:
            raise ValueError(f"corpus {corpus.root} produced no text (text_field={text_field!r})")
        os.replace(tmp_path, bin_path)
    finally:
        tmp_path.unlink(missing_ok=True)  # only left when writing failed
    meta = ShardMeta(fingerprint, tokenizer.fingerprint, str(corpus.root), n_tokens, n_docs, np.dtype(dtype).name)
    _atomic_write_text(bin_path.with_suffix(".json"), json.dumps(asdict(meta), indent=2) + "\n")  # commit marker
    return bin_path


def _shard_is_current(bin_path: Path, fingerprint: str) -> bool:
    try:
        meta = ShardMeta.read(bin_path)
    except (FileNotFoundError, TypeError, ValueError):
        return False
    expected_size = meta.n_tokens * np.dtype(meta.dtype).itemsize
    return meta.fingerprint == fingerprint and bin_path.is_file() and bin_path.stat().st_size == expected_size


def _write_tokens(corpus: Corpus, tokenizer: TokenizerLike, f: Any, dtype: type[np.integer], chunk_bytes: int,
                  progress: bool) -> tuple[int, int]:
    """Encode documents in ~chunk_bytes batches (parallel in the Rust tokenizer) and append them to `f`."""
    n_tokens, n_docs, eos, files = 0, 0, [tokenizer.eos_id], corpus.files()
    total = min(sum(p.stat().st_size for p in files), corpus.max_bytes or sys.maxsize)  # an upper bound
    with tqdm(desc=f"tokenizing {corpus.name}", total=total, unit="B", unit_scale=True,
              disable=not progress) as bar:
        for chunk in _chunks(corpus.documents(files), chunk_bytes):
            encoded = tokenizer.encode_batch(chunk)
            count = sum(len(ids) for ids in encoded) + len(encoded)
            flat = itertools.chain.from_iterable(itertools.chain(ids, eos) for ids in encoded)
            np.fromiter(flat, dtype=dtype, count=count).tofile(f)
            n_tokens, n_docs = n_tokens + count, n_docs + len(chunk)
            bar.update(sum(len(doc.encode("utf-8")) for doc in chunk))
            bar.set_postfix(tokens=n_tokens, refresh=False)
        bar.total = bar.n  # file sizes overestimate .jsonl/.parquet text; end the bar at 100%
    return n_tokens, n_docs


def _chunks(docs: Iterator[str], chunk_bytes: int) -> Iterator[list[str]]:
    """Group documents into lists of about `chunk_bytes` characters (bounds memory, keeps batches big)."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        if (size := size + len(doc)) >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- packing and sampling ----

class TokenDataset:
    """Windows of `seq_len + 1` tokens over one split of a flat token array (inputs = w[:-1], targets = w[1:]).

    Window i starts at token i * seq_len, so consecutive windows share one token and every token is a target
    exactly once. The validation split is the last `val_fraction` of the tokens; no window crosses the boundary.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, split: Literal["train", "val"] = "train",
                 val_fraction: float = 0.01) -> None:
        if not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        boundary = len(tokens) - int(round(len(tokens) * val_fraction))
        self.tokens = tokens[:boundary] if split == "train" else tokens[boundary:]
        self.seq_len, self.split = seq_len, split
        if len(self) == 0:
            raise ValueError(f"the {split} split has {len(self.tokens)} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1}; lower seq_len or change val_fraction={val_fraction}")

    @classmethod
    def from_shard(cls, bin_path: str | Path, seq_len: int, split: Literal["train", "val"] = "train",
                   val_fraction: float = 0.01) -> TokenDataset:
        """Memory-map a shard written by `build_token_shard` (nothing is read until a batch needs it)."""
        bin_path = Path(bin_path)
        if not bin_path.is_file():
            raise FileNotFoundError(f"token shard not found: {bin_path}")
        tokens = np.memmap(bin_path, dtype=ShardMeta.read(bin_path).dtype, mode="r")
        return cls(tokens, seq_len, split, val_fraction)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Windows `indices` as a (B, seq_len + 1) int64 tensor."""
        windows = [self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1] for i in indices]
        return torch.from_numpy(np.stack(windows).astype(np.int64))  # (B, seq_len + 1)


def _local_slice(global_batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's rows of a global batch: contiguous blocks, so concatenating ranks restores the batch."""
    if global_batch_size <= 0 or global_batch_size % world_size:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"world_size={world_size}")
    local = global_batch_size // world_size
    return slice(rank * local, (rank + 1) * local)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class ResumableSampler:
    """Shuffled training batches from an explicit seed, resumable bit-for-bit from `state_dict()`.

    Every rank draws the same global batch and keeps its slice, so the data seen per step does not depend on the
    world size, and a checkpoint taken at one world size resumes at another. A batch that runs past the end of an
    epoch continues into the next epoch's order; no window is dropped.
    """

    def __init__(self, dataset: TokenDataset, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        _check_rank(rank, world_size)
        self.dataset, self.seed, self.rank, self.world_size = dataset, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])  # fresh per epoch: no RNG state to save
            self._order = (epoch, rng.permutation(len(self.dataset)))
        return self._order[1]

    def next_indices(self, global_batch_size: int) -> np.ndarray:
        """The next global batch's window indices, advancing the state (every rank calls this identically)."""
        rows = _local_slice(global_batch_size, self.rank, self.world_size)
        picked, need = [], global_batch_size
        while need:
            order = self._epoch_order(self.epoch)
            take = min(need, len(order) - self.position)
            picked.append(order[self.position: self.position + take])
            self.position, need = self.position + take, need - take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(picked)[rows]

    def next_batch(self, global_batch_size: int) -> torch.Tensor:
        """This rank's (global_batch_size // world_size, seq_len + 1) slice of the next global batch."""
        return self.dataset.batch(self.next_indices(global_batch_size))

    def state_dict(self) -> dict[str, int]:
        """Position in the global order; independent of rank and world size."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_sequences": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_sequences"):
            current = self.seed if key == "seed" else len(self.dataset)
            if state.get(key) != current:
                raise ValueError(f"sampler state has {key}={state.get(key)!r} but this sampler has {current}; "
                                 f"it was saved for different data or a different seed")
        if not 0 <= state["position"] < len(self.dataset):
            raise ValueError(f"sampler state position={state['position']} is outside [0, {len(self.dataset)})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def validation_batches(dataset: TokenDataset, global_batch_size: int, *, max_batches: int | None = None,
                       rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    """The fixed validation set: windows in order, whole global batches only, each rank its slice.

    The same call always yields the same batches, so validation losses are comparable across steps and runs.
    """
    _check_rank(rank, world_size)
    rows = _local_slice(global_batch_size, rank, world_size)
    n_batches = len(dataset) // global_batch_size
    if n_batches == 0:
        raise ValueError(f"the {dataset.split} split has {len(dataset)} windows, fewer than "
                         f"global_batch_size={global_batch_size}; raise val_fraction or lower the batch size")
    n_batches = n_batches if max_batches is None else min(n_batches, max_batches)
    starts = range(0, n_batches * global_batch_size, global_batch_size)
    return (dataset.batch(np.arange(start, start + global_batch_size)[rows]) for start in starts)

"""Corpora: where training documents come from, read one document at a time.

A source is the running Python's standard library (the default: ~30 MB of .py files, so training works offline
with no download), a directory, a glob pattern of files, a text file, a .jsonl (one document per line, in a text
field; also a .json file, JSON Lines or an array of such records) or a .parquet (one per row, in a text column).
Files that are not text (a pre-tokenized .bin, say) are refused, naming the file.
"""
from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import json
import math
import os
import re
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .. import json_text
from ..files import hash_file_states
from .dataset_folders import RUN_CONFIG_FILE, check_one_split, data_files, glob_files

STDLIB = "stdlib"  # the source name (or None) that selects the running Python's standard library
DOC_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet")  # what a folder source reads
# (a folder's .json files are mostly settings, package.json say; give a .json corpus as a file or a glob)
SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".parquet")  # a data set's shards: one split to a folder
JSON_KINDS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
RECORD_KINDS = (*JSON_KINDS, ".parquet")  # the formats whose documents are text_field of each record
# Corpus files in a folder in a form not read here (other compressions, NDJSON): refused by name, not left out
# unsaid. It matches the .gz kinds that are read too (DOC_SUFFIXES), which its one caller sets aside first.
UNREAD_DATA = re.compile(r"\.(?:txt|md|jsonl|json|ndjson|parquet)\.(?:gz|bz2|xz|zst|zstd|lz4|zip)$"
                         r"|\.ndjson$|\.arrow$")
TABLE_KINDS = (".csv", ".tsv", ".arrow")  # tables, which a file given alone would be read as one text document
TO_PARQUET = "`datasets` writes what is read here with Dataset.to_parquet (save_to_disk's .arrow is not read)"
# The magic bytes of compressed files: such a file under a plain text name is named for what it is.
COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
              b"PK\x03\x04": "zip"}
FIELD_HINT = "--set data.text_field=NAME reads the documents from another field"
TEXT_SNIFF_BYTES = 1024  # how much of a text file is checked for being text before it is read
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Where documents come from: `source` is None/"stdlib", a directory, a glob, a text file, a .jsonl or a .parquet.

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
        """What the cache file is named after: a glob's `*` or `?` in a file name is a trap in every shell, and a
        file name's 255 bytes must hold the shard's temporary name too."""
        name = re.sub(r"[^\w.-]+", "_", self.root.stem).strip("_.")[:64]  # and a long name (the shard's beside it)
        return STDLIB if self.is_stdlib else name or "corpus"

    def files(self) -> list[Path]:
        """The corpus files in a deterministic (sorted) order; a missing path fails here, naming it. A directory's
        hidden files and folders (`.git`, `.ipynb_checkpoints`) and training runs' directories (their metrics,
        samples and checkpoints) are not corpus; a glob pattern names its files (`c4/en/c4-train.*`)."""
        root = self.root
        if self.is_stdlib:
            return _stdlib_files(root)
        if (matched := glob_files(root)) is not None:
            return _no_tables(matched)
        if root.is_file():
            return _no_tables([root])
        if not root.is_dir():
            raise FileNotFoundError(f"corpus source not found: {root}")
        found = data_files(root)
        if unread := [p for p in found if corpus_kind(p) not in DOC_SUFFIXES and UNREAD_DATA.search(p.name.lower())]:
            raise ValueError(f"{unread[0]} in {root} is a data file in a format not read here; a corpus folder holds "
                             f"{'/'.join(DOC_SUFFIXES)} files: convert it, or move it out of the folder"
                             f"{f'; {TO_PARQUET}' if corpus_kind(unread[0]) == '.arrow' else ''}")
        files = [p for p in found if corpus_kind(p) in DOC_SUFFIXES]
        shards = {p.parent for p in files if corpus_kind(p) in SHARD_SUFFIXES}
        files = [p for p in files if not _data_set_card(p, shards)]
        check_one_split(root, [p for p in files if corpus_kind(p) in SHARD_SUFFIXES],
                        "give the training files alone (a run holds out the end of its corpus as its val split)")
        if not files and (root / RUN_CONFIG_FILE).is_file():  # a run trained with --out at the corpus
            raise ValueError(f"corpus directory {root} is a training run's directory (it holds {RUN_CONFIG_FILE}), "
                             "whose files are not corpus: move the text to a folder of its own")
        if not files:
            raise ValueError(f"corpus directory {root} holds no {'/'.join(DOC_SUFFIXES)} files")
        return files

    def documents(self, files: Sequence[Path] | None = None) -> Iterator[str]:
        """Non-empty documents of `files` (default: all), in order, stopping at max_docs documents or max_bytes
        bytes: the document that reaches max_bytes is cut there (at a character boundary), so one large file or row
        never goes past the cap.

        The stdlib's files are not checked for being UTF-8: a few of its test fixtures are deliberately latin-1
        or KOI8-R, and are read with replacement characters as always."""
        check_text = not self.is_stdlib
        docs = (doc for path in (self.files() if files is None else files)
                for doc in _read_documents(path, self.text_field, check_text) if doc)
        room = self.max_bytes if self.max_bytes is not None else math.inf
        for index, doc in enumerate(docs):
            if self.max_docs is not None and index >= self.max_docs:
                return
            data = doc.encode("utf-8")
            if len(data) > room:
                doc = data[:room].decode("utf-8", errors="ignore")
                if doc:
                    yield doc
                return
            room -= len(data)
            yield doc

    def fingerprint(self) -> str:
        """Hash of what the documents depend on: paths, sizes, mtimes, caps, and the field where records are read
        (not the file contents)."""
        files = self.files()
        field = self.text_field if any(corpus_kind(path) in RECORD_KINDS for path in files) else None
        h = hashlib.sha256(repr((str(self.root.resolve()), field, self.max_bytes, self.max_docs)).encode())
        hash_file_states(h, files)
        return h.hexdigest()


def _data_set_card(path: Path, shard_folders: set[Path]) -> bool:
    """Whether `path` is a hub data set's card: a README.md in a folder that holds the set's record shards, or
    folders of them, which `datasets` never reads as data."""
    return path.name == "README.md" and any(path.parent == f or path.parent in f.parents for f in shard_folders)


def _no_tables(files: list[Path]) -> list[Path]:
    """`files`, named alone or by a glob: a table among them is refused, since read as text it would be one
    document, header and all."""
    if table := next((p for p in files if corpus_kind(p) in TABLE_KINDS), None):
        raise ValueError(f"{table} is a {corpus_kind(table)} table, which is not read here (as text it would be one "
                         f"document, header and all): a corpus file is text or records in {'/'.join(RECORD_KINDS)}; "
                         f"{TO_PARQUET}")
    return files


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
    A single-file source gives its first `max_bytes`. Files of very unequal sizes can spread to less than half of
    `max_bytes` (none of one 9 MB file for 8 MB; only the 10 KB one of 9, 9, 9 MB and 10 KB): the rest of the
    corpus, in order, then fills the sample up.
    """
    corpus = Corpus(source, text_field, max_bytes=max_bytes)
    files = corpus.files()
    keep = min(1.0, max_bytes / max(1, sum(p.stat().st_size for p in files)))
    spread = [path for i, path in enumerate(files) if int((i + 1) * keep) > int(i * keep)]  # a `keep` fraction
    if sum(p.stat().st_size for p in spread) < max_bytes / 2:
        chosen = set(spread)
        spread += [path for path in files if path not in chosen]
    return list(corpus.documents(spread))


# ---- readers: one document per text file, per .jsonl line, per .parquet row ----

def corpus_kind(path: Path) -> str:
    """A corpus file's format by its name: its suffix, or ".jsonl.gz" / ".json.gz" when gzip-compressed."""
    name = path.name.lower()
    return next((kind for kind in (".jsonl.gz", ".json.gz") if name.endswith(kind)), path.suffix.lower())


def _read_documents(path: Path, text_field: str, check_text: bool) -> Iterator[str]:
    kind = corpus_kind(path)
    if kind == ".parquet":
        yield from _read_parquet(path, text_field)
        return
    if check_text and kind not in (".jsonl.gz", ".json.gz"):
        _require_text(path, text_field)
    if kind in JSON_KINDS:  # .json: JSON Lines (as `datasets`' to_json writes
        with decoding_errors(path):  # them) or an array of records
            yield from _read_jsonl(path, text_field)
    else:
        # errors="replace": a stray non-UTF-8 byte past the checked head should not stop a run; utf-8-sig: a byte
        # order mark (Windows tools write one) is not text.
        yield path.read_text(encoding="utf-8-sig", errors="replace")


def _require_text(path: Path, text_field: str) -> None:
    """Refuse a file that does not start as text: read as text it would be garbage (a nanoGPT-style
    pre-tokenized .bin decodes without an error), so say what a corpus may be instead."""
    with path.open("rb") as f:
        head = f.read(TEXT_SNIFF_BYTES)
    if compression := _compression(head):
        gzip_name = " or name it *.jsonl.gz / *.json.gz (JSON records)" if compression == "gzip" else ""
        raise ValueError(f"corpus file {path} is {compression}-compressed, which is not read under this name: "
                         f"decompress it{gzip_name}")
    if not _looks_like_text(head):
        raise ValueError(f"corpus file {path} is not UTF-8 text (NUL bytes or invalid UTF-8 in its first "
                         f"{TEXT_SNIFF_BYTES} bytes; pre-tokenized token files are not read). A corpus is a text "
                         f"file, a directory of {'/'.join(DOC_SUFFIXES)} files, a .jsonl with a {text_field!r} "
                         f"field per line, or a .parquet with a {text_field!r} column")


def _compression(head: bytes) -> str | None:
    """The compression a file's first bytes say it has (COMPRESSED), or None."""
    return next((name for magic, name in COMPRESSED.items() if head.startswith(magic)), None)


def _looks_like_text(head: bytes) -> bool:
    """No NUL byte (text never has one) and valid UTF-8, except for a character cut at the end of `head`."""
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def open_text(path: Path) -> TextIO:
    """A UTF-8 text file, gzip-compressed when its name ends in .gz or .GZ (as some data sets ship JSON Lines); a byte
    order mark at its start (Windows tools write one) is not part of the text."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return path.open(encoding="utf-8-sig")


@contextlib.contextmanager
def decoding_errors(path: Path) -> Iterator[None]:
    """Reading `path` through `open_text` in the block: a gzip file that is not one or is cut short, or text that
    is not UTF-8 (latin-1, UTF-16, compressed without the .gz name), is one ValueError naming the file."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable gzip file ({err})") from None
    except UnicodeDecodeError as err:  # its position counts from a buffer's start, not the file's: found again
        with path.open("rb") as f:
            hint = ", or name a gzip file *.gz" if _compression(f.read(8)) == "gzip" and path.suffix.lower() != ".gz" \
                else ""
        found = _first_undecodable(path)
        if found is None:
            raise ValueError(f"{path}: not UTF-8 text ({err}); convert it to UTF-8{hint}") from None
        line, offset, byte = found
        whose = "the decompressed file" if path.suffix.lower() == ".gz" else "the file"
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {byte!r} at byte {offset} of {whose}); convert it to "
                         f"UTF-8{hint}") from None


def _first_undecodable(path: Path) -> tuple[int, int, bytes] | None:
    """(line, byte offset, the byte) where `path`'s text (decompressed) first stops being UTF-8, or None. Line by
    line: a newline byte is never inside a UTF-8 character, so each line decodes on its own."""
    offset = 0
    with (gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb")) as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return number, offset + err.start, line[err.start:err.start + 1]
            offset += len(line)
    return None


def starts_with_bracket(path: Path) -> bool:
    """Whether the text file's first non-blank character is "[": a JSON array, not JSON Lines."""
    with open_text(path) as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped.startswith("[")
    return False


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line; a line that does not parse is an error naming it. A
    .json file that is one array gives (index, record) for each of its records."""
    if corpus_kind(path) in (".json", ".json.gz") and starts_with_bracket(path):
        yield from enumerate(whole_json(path), 1)
        return
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json_text.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            yield line_no, record


def whole_json(path: Path) -> Any:
    """The text file as one JSON value; a ValueError naming the file (and line) when it is not one."""
    try:
        with open_text(path) as f:
            return json_text.loads(f.read())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}{f':{err.lineno}' if err.lineno else ''}: not valid JSON ({err.msg})") from None


# Half of a UTF-16 pair alone, as JSON's "\ud800" escape gives it (text cut inside an emoji): UTF-8 has no encoding
# for it, so it becomes U+FFFD, as a stray bad byte in a text file does.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for line_no, record in jsonl_records(path):
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{line_no}: no text_field {text_field!r} (has {keys}); {FIELD_HINT}")
        if record[text_field] is None:  # a missing text, as a null in a .parquet column: no document
            continue
        if not isinstance(record[text_field], str):
            raise ValueError(f"{path}:{line_no}: field {text_field!r} must be a string, "
                             f"got {type(record[text_field]).__name__}")
        yield _LONE_SURROGATE.sub("\ufffd", record[text_field])


def pyarrow_modules(path: Path) -> tuple[Any, Any]:
    """`pyarrow` and `pyarrow.parquet`, imported when a file needs them (pyarrow is an extra, not a core
    dependency). Without it, a ValueError in one line, as for any file this install cannot read."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow (the longcat-flash[parquet] "
                         "extra)") from None
    return pa, pq


def _is_string_view(pa: Any, kind: Any) -> bool:
    """pyarrow's string_view type (pyarrow >= 16 writes and reads it)."""
    return hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind)


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    pa, pq = pyarrow_modules(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no text_field column {text_field!r} (has {parquet.schema_arrow.names}); "
                         f"{FIELD_HINT}")
    kind = parquet.schema_arrow.field(text_field).type
    values = kind.value_type if pa.types.is_dictionary(kind) else kind  # pandas' category columns are dictionaries
    if not (pa.types.is_string(values) or pa.types.is_large_string(values) or _is_string_view(pa, values)):
        raise ValueError(f"{path}: column {text_field!r} must hold strings, not {kind}")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)

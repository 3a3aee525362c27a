"""Where SFT conversation rows come from: the files a path, a folder or a glob names (one split of a data set), and
each file's rows as (file:line, row): JSON Lines, JSON (an array, or one pretty-printed row), either gzip-compressed,
Parquet, or a `datasets` Arrow stream. conversations.py checks the rows.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import json_text
from .corpus import decoding_errors, jsonl_records, pyarrow_modules, starts_with_bracket, whole_json
from .dataset_folders import DATASETS_METADATA, check_one_split, data_files, glob_files

ROW_FILES = (".jsonl", ".json", ".parquet", ".arrow")  # .arrow: what `datasets`' save_to_disk writes; JSON also .gz
# Data files `datasets` reads that we do not (other compressions, CSV, NDJSON): in a folder, refused by name.
UNREAD_ROWS = re.compile(r"\.(?:jsonl|json|ndjson|csv|tsv|parquet|arrow)\.(?:bz2|xz|zst|zstd|lz4|zip)$"
                         r"|\.(?:ndjson|csv|tsv)(?:\.gz)?$")


class ConversationError(ValueError):
    """A row that is not a conversation we can train on; the message starts with `file:line: field:`."""


def decoded_json(text: str, where: str, name: str, what: str) -> Any:
    """JSON text held in a row's string field, decoded; `what` says what the field must hold."""
    try:
        return json_text.loads(text)
    except json_text.Unplaced as err:  # valid JSON, past what Python reads
        raise ConversationError(f"{where}: {name}: {err}") from None
    except json.JSONDecodeError as err:
        raise ConversationError(f"{where}: {name}: {what} ({err})") from None


def row_files(pattern: str | Path) -> list[Path]:
    """The file itself; the files a glob pattern names (`data/train-*.parquet`); or a directory's row files at any
    depth in name order (hidden ones left out: caches), all of one split."""
    if (files := glob_files(pattern)) is not None:
        return files
    path = Path(pattern)
    if not path.is_dir():
        return [path]
    if listed := _saved_dataset_files(path):
        return listed
    if (path / "dataset_dict.json").is_file():  # a DatasetDict: reading it all would mix its splits
        splits = ", ".join(sorted(p.name for p in path.iterdir() if p.is_dir()))
        raise ValueError(f"{path} holds a `datasets` DatasetDict (splits: {splits}); give one split's folder")
    found = [p for p in data_files(path) if p.name not in DATASETS_METADATA]
    if unread := [p for p in found if UNREAD_ROWS.search(p.name.lower())]:  # left out, they were rows lost unsaid
        raise ValueError(f"{unread[0]} in {path} is a data file in a format not read here; conversations come as "
                         f"{', '.join(ROW_FILES)} (JSON also .gz): convert it, or move it out of the folder")
    caches = _map_caches(path)
    files = [p for p in found if row_format(p) in ROW_FILES and p not in caches]
    if not files:
        raise FileNotFoundError(f"no conversation files ({', '.join(ROW_FILES)}) in the directory {path}")
    check_one_split(path, files, "give the training files as --data (a file, or a folder or quoted glob of them) "
                                 "and the held-out ones as --val-data")
    return files


def _map_caches(path: Path) -> set[Path]:
    """The `cache-*.arrow` files that map / filter calls wrote into the save_to_disk folders under `path`: not in
    their state.json, not their rows."""
    caches = set()
    for state in path.rglob("state.json"):
        if listed := _saved_dataset_files(state.parent):
            caches.update(file for file in state.parent.glob("*.arrow") if file not in listed)
    return caches


def _saved_dataset_files(path: Path) -> list[Path]:
    """The files of a `datasets` save_to_disk folder, as its state.json lists them (none if it is not one): the
    folder may also hold `cache-*.arrow` files that later map / filter calls wrote, which are not its rows."""
    try:
        listed = json.loads((path / "state.json").read_text(encoding="utf-8"))["_data_files"]
        files = [path / entry["filename"] for entry in listed]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return files if files and all(file.is_file() for file in files) else []


def rows(path: Path, ignore: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """(file:line, row) for each row of one file; a file that is not one of ROW_FILES' formats is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {path}")
    if row_format(path) in (".parquet", ".arrow"):
        yield from _arrow_rows(path, ignore)
        return
    if row_format(path) not in (".jsonl", ".json"):
        raise ValueError(f"{path}: conversations come as .jsonl (one JSON object per line), .json (that, or one "
                         "array of objects), either gzip-compressed (.gz), .parquet, .arrow, or a directory of such "
                         "files")
    with decoding_errors(path):
        yield from _json_rows(path)


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    rows = 0
    try:  # JSON Lines, also under .json (as `datasets`' to_json writes them), or a .json array (LLaMA-Factory's)
        for rows, (number, row) in enumerate(jsonl_records(path), 1):
            if rows == 1 and isinstance(row, list) and row_format(path) == ".jsonl":  # the array on one line
                raise ConversationError(f"{path}:{number}: row: a JSON array, not an object: the file is one JSON "
                                        "array, not JSON Lines; name it .json")
            yield f"{path}:{number}", row
    except UnicodeDecodeError:  # named with its file by rows()
        raise
    except ValueError as err:  # a line that is not JSON
        if rows == 0 and row_format(path) == ".json" and isinstance(whole := _whole_json(path), dict):
            yield f"{path}:1", whole  # one row, pretty-printed over many lines
            return
        if rows == 0 and row_format(path) == ".jsonl" and starts_with_bracket(path):
            raise ConversationError(f"{err}: the file is one JSON array, not JSON Lines; name it .json") from None
        raise ConversationError(str(err)) from None


def _whole_json(path: Path) -> Any:
    """The file as one JSON value, or None when it is not one."""
    try:
        return whole_json(path)
    except ValueError:
        return None


def _arrow_rows(path: Path, ignore: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """The rows of a .parquet (ignored columns not even read) or of an Arrow stream (.arrow, as `datasets`'
    save_to_disk writes them), with the values of `datasets`' Json features decoded: `datasets` 5 stores objects of
    varying shape (messages with and without tool calls) as JSON strings and names them so in the schema."""
    pa, pq = pyarrow_modules(path)
    what = "a readable Parquet file" if row_format(path) == ".parquet" else "an Arrow stream as `datasets` writes them"
    try:
        if row_format(path) == ".parquet":
            file = pq.ParquetFile(path)
            schema = file.schema_arrow
            index = [c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)]
            batches = file.iter_batches(batch_size=1024, columns=[c for c in schema.names
                                                                  if c not in ignore and c not in index])
        else:
            batches = pa.ipc.open_stream(pa.memory_map(str(path)))
            schema = batches.schema
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
        rows = (row for batch in batches for row in batch.to_pylist())
        for number, row in enumerate(rows, 1):
            where = f"{path}:{number}"
            yield where, {k: _json_features(v, features.get(k), where, k) for k, v in row.items()}
    except (pa.ArrowException, OSError) as err:  # not that format, or cut short
        raise ValueError(f"{path}: not {what} ({err})") from None


def _json_features(value: Any, feature: Any, where: str, name: str) -> Any:
    """`value` with every part that `datasets` feature spec `feature` marks as Json decoded from its string."""
    if value is None or not isinstance(feature, (dict, list)):
        return value
    if isinstance(feature, list) or feature.get("_type") in ("List", "LargeList", "Sequence"):
        inner = feature[0] if isinstance(feature, list) else feature.get("feature")
        return [_json_features(v, inner, where, f"{name}[{i}]") for i, v in enumerate(value)] \
            if isinstance(value, list) else value
    if feature.get("_type") == "Json":
        return decoded_json(value, where, name, "a string here must hold JSON") if isinstance(value, str) else value
    if "_type" not in feature and isinstance(value, dict):  # a struct: one feature per key
        return {k: _json_features(v, feature.get(k), where, f"{name}.{k}") for k, v in value.items()}
    return value


def row_format(path: Path) -> str:
    """A row file's format by its name, in lower case (Windows tools write ROWS.JSONL): the suffix, or the one
    before .gz (`rows.jsonl.gz` is JSON Lines)."""
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix == ".gz" else suffix


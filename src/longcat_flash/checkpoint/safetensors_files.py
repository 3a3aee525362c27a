"""A checkpoint folder's safetensors files as transformers and vLLM read them: one `model.safetensors`, or shards
with an index (every key a shard holds, the index's place first); the tensors one at a time, file by file; the
dtypes they hold, from the headers. A file that is not safetensors is named as bad input: nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LM_HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"  # the same keys in both layouts
SAFETENSORS_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@contextlib.contextmanager
def _opened(file: Path, keys: list[str] = ()) -> Iterator[Any]:
    """safe_open, with a file that is not valid safetensors reported by name, as bad input (ValueError), and the
    keys the index maps to it checked to be there."""
    if not file.is_file():  # only an index can name a file that is not there
        raise FileNotFoundError(f"{INDEX_FILE} names {file.name}, which is missing")
    try:
        handle = safe_open(file, "pt")
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
    with handle as f:
        if absent := set(keys) - set(f.keys()):
            raise KeyError(f"{INDEX_FILE} maps {min(absent)!r} to {file.name}, which does not hold it")
        yield f


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str],
                      shown: str | Path) -> None:
    """safetensors' save_file, with a failed write (a full disk) an OSError naming the file as the user knows it
    (`shown`: a hidden temporary `path` is gone by the time the error is read): safetensors raises its own error,
    which callers that report an unwritable checkpoint in one line did not catch."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        raise OSError(f"{shown}: {err}") from None


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Official key -> the safetensors file holding it (single file or sharded with an index; with both, the single
    file, as transformers reads such a folder)."""
    if (path / SINGLE_FILE).is_file():
        with _opened(path / SINGLE_FILE) as f:
            return {key: path / SINGLE_FILE for key in f.keys()}
    if (path / INDEX_FILE).is_file():
        return _indexed_files(path)
    pickled = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {pickled}: pickle files are never loaded, convert them to safetensors)" if pickled else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")


def _indexed_files(path: Path) -> dict[str, Path]:
    """The index's weight_map, each shard a file name inside the checkpoint folder, and the keys its shards hold
    beyond it."""
    index = path / INDEX_FILE
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{index} is not a JSON object: {err}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ValueError(f"{index} has no weight_map object of key -> shard file name")
    for name in set(weight_map.values()):
        if Path(name).name != name.removeprefix("./"):  # "./model-00001-of-00002.safetensors" is a file name too
            raise ValueError(f"{index} names shard {name!r}, outside the checkpoint folder (shards are file names)")
    weight_map = {key: name.removeprefix("./") for key, name in weight_map.items()}
    files = {key: path / name for key, name in weight_map.items()}
    for name in sorted(set(weight_map.values())):  # and every key each shard holds, as transformers and vLLM read a
        if (path / name).is_file():  # shard (one the index leaves out was "missing" here); the index's place first
            with _opened(path / name) as f:
                files.update({key: path / name for key in f.keys() if key not in files})
    return files


def _keys_by_file(path: Path) -> list[tuple[Path, list[str]]]:
    """(safetensors file, its official keys), file by file in name order."""
    by_file: dict[Path, list[str]] = {}
    for key, file in checkpoint_files(path).items():
        by_file.setdefault(file, []).append(key)
    return sorted(by_file.items())


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (official key, tensor) one at a time, file by file."""
    for file, keys in _keys_by_file(path):
        with _opened(file, keys) as f:
            for key in keys:
                tensor = f.get_tensor(key)
                if not tensor.is_floating_point():
                    raise ValueError(f"checkpoint key {key!r} in {file.name} is {tensor.dtype}, not a floating "
                                     "point weight")
                yield key, tensor


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (its LM head's, or the embedding's when they are tied)."""
    files = checkpoint_files(path)
    key = next((k for k in (LM_HEAD, EMBEDDING) if k in files), None)
    if key is None:
        raise ValueError(f"{path}: neither lm_head.weight nor model.embed_tokens.weight in the checkpoint")
    with _opened(files[key]) as f:
        name = f.get_slice(key).get_dtype()
    if name not in SAFETENSORS_FLOATS:
        raise ValueError(f"{files[key]}: {key} is {name}, not one of {sorted(SAFETENSORS_FLOATS)}")
    return SAFETENSORS_FLOATS[name]


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's weights (read from the safetensors headers): a model
    loaded without a dtype is in this one throughout, even where a file keeps a few tensors (norms) in another."""
    sizes: dict[str, int] = {}
    for file, keys in _keys_by_file(path):
        with _opened(file, keys) as f:
            for key in keys:
                part = f.get_slice(key)
                sizes[part.get_dtype()] = sizes.get(part.get_dtype(), 0) + math.prod(part.get_shape())
    floating = {name: n for name, n in sizes.items() if name in SAFETENSORS_FLOATS}
    return SAFETENSORS_FLOATS[max(floating, key=floating.get)] if floating else torch.float32

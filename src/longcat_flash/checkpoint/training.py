"""Training checkpoints: any objects with state_dict()/load_state_dict(), written atomically and verified.

Layout (docs/checkpoint.md):

    ROOT/step_00000100/manifest.json        step, meta, and sha256 + size of every file
    ROOT/step_00000100/<name>.safetensors   one state dict per object (model, optimizer, ...): its tensors, and
                                            the rest of its structure as JSON in the file's metadata

A checkpoint is written into ROOT/.tmp-step_XXXXXXXX-<pid>/, every file fsynced, the manifest last, and the
directory renamed into place (then the parent fsynced): a kill at any moment leaves the earlier checkpoints
intact and never a partial directory under a step name. Only after that are checkpoints beyond `keep` removed.
Nothing is pickled: a state dict is split into its tensors (safetensors) and a JSON skeleton of the containers
and scalars around them (`encode_state` / `decode_state`), so loading a checkpoint never runs code.
This module knows nothing about training; the trainer hands it the objects.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..files import chmod_per_umask
from .safetensors_files import write_safetensors

MANIFEST = "manifest.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 3
SKELETON = "skeleton"  # the safetensors metadata key holding the JSON structure


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the objects it is loaded into."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` (those with a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# ---- writing ----

def save(root: str | Path, step: int, objects: Mapping[str, Stateful], meta: dict[str, Any] | None = None,
         keep: int | None = None) -> Path:
    """Write every object's state_dict() as checkpoint `step` under `root`; keep the newest `keep`."""
    return save_states(root, step, {name: obj.state_dict() for name, obj in objects.items()}, meta, keep)


def save_states(root: str | Path, step: int, states: Mapping[str, Any], meta: dict[str, Any] | None = None,
                keep: int | None = None) -> Path:
    """`save` for states already in hand (e.g. edited by model growth)."""
    return commit(temporary_dir(root, step), step, states, meta, keep)


def temporary_dir(root: str | Path, step: int) -> Path:
    """A fresh, empty ROOT/.tmp-step_XXXXXXXX/ to write checkpoint `step` into. Its name is the same in every
    process, so the ranks of a sharded save (checkpoint/sharded.py) write their files side by side; under a
    process group only one rank calls this, before the others write."""
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def temporary_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"{TMP_PREFIX}{step_dir(root, step).name}"


def commit(tmp: Path, step: int, states: Mapping[str, Any], meta: dict[str, Any] | None = None,
           keep: int | None = None) -> Path:
    """Write `states` into `tmp`, then a manifest covering every file in it (files other processes wrote there
    too, in subdirectories), and rename it into place as checkpoint `step`; keep the newest `keep`."""
    for name, state in states.items():
        _write_state(tmp / f"{name}.safetensors", state)
    written = sorted(p for p in tmp.rglob("*") if p.is_file())
    files = {str(p.relative_to(tmp)).removesuffix(".safetensors"): _synced_entry(p, tmp) for p in written}
    manifest = {"format": FORMAT_VERSION, "step": step, "files": files, "meta": meta or {}}
    _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    final = step_dir(tmp.parent, step)
    _swap_into_place(tmp, final)
    if keep is not None:
        prune(tmp.parent, keep)
    return final


def _write_state(path: Path, state: Any) -> None:
    """One object's state as safetensors; made readable per the umask (safetensors creates files 0600)."""
    tensors, skeleton = encode_state(state)
    write_safetensors(tensors, path, metadata={SKELETON: json.dumps(skeleton)}, shown=path.name)  # its step's
    chmod_per_umask(path)


def _write_bytes(path: Path, payload: bytes) -> None:
    path.write_bytes(payload)
    _synced_entry(path, path.parent)


def _synced_entry(path: Path, root: Path) -> dict[str, Any]:
    """fsync a written file; its manifest entry (path relative to the checkpoint directory)."""
    with path.open("rb+") as f:
        os.fsync(f.fileno())
    return {"file": str(path.relative_to(root)), "bytes": path.stat().st_size, "sha256": _sha256(path)}


# ---- state dicts <-> (tensors, JSON skeleton) ----

def encode_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a state dict into named tensors and a JSON-able skeleton that `decode_state` rebuilds it from.

    Dicts with str keys stay JSON objects; other dicts (an optimizer's int-keyed state) and tuples are tagged.
    Tensors sharing storage (tied weights) are cloned apart: safetensors stores each once, and loading
    copies values into the live parameters anyway."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            key = str(len(tensors))
            t = obj.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            tensors[key] = t.clone() if ptr in seen and t.numel() else t
            seen.add(ptr)
            return {"__tensor__": key}
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: walk(v) for k, v in obj.items()}
            return {"__items__": [[walk(k), walk(v)] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [walk(v) for v in obj]}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot checkpoint a {type(obj).__name__} (state dicts hold tensors, containers, scalars)")

    return tensors, walk(state)


def decode_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """The inverse of `encode_state`."""
    if isinstance(skeleton, list):
        return [decode_state(tensors, v) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__tuple__" in skeleton:
        return tuple(decode_state(tensors, v) for v in skeleton["__tuple__"])
    if "__items__" in skeleton:
        return {decode_state(tensors, k): decode_state(tensors, v) for k, v in skeleton["__items__"]}
    return {k: decode_state(tensors, v) for k, v in skeleton.items()}


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an existing final (the same step saved again) is moved aside first, then removed."""
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: str | Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints, and temporaries left by killed writers."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for path in list_checkpoints(root)[:-keep]:  # renamed first: a kill mid-delete leaves a temporary, not a
        doomed = path.with_name(f"{TMP_PREFIX}old-{path.name}")  # step directory missing files
        shutil.rmtree(doomed, ignore_errors=True)  # one a killed prune left, if this step was saved again since
        path.rename(doomed)
        shutil.rmtree(doomed)
    clean_temporaries(root)


def clean_temporaries(root: str | Path) -> None:
    """Delete half-written checkpoint directories (a writer was killed before its rename)."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


# ---- reading ----

def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint in a checkpoints root or in a run directory's
    `checkpoints/`; a clear CheckpointError when there is none."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    if path.name.startswith(STEP_PREFIX) and path.is_dir():
        raise CheckpointError(f"{path} is incomplete: it has no {MANIFEST} (the write was interrupted)")
    incomplete = sorted(p.name for root in (path / "checkpoints", path) if root.is_dir()
                        for p in root.glob(f"{STEP_PREFIX}*") if not (p / MANIFEST).is_file())
    found = f"; {', '.join(incomplete)} has no {MANIFEST} (an interrupted write)" if incomplete else ""
    raise CheckpointError(f"no checkpoint found at {path} (expected {path}/checkpoints/{STEP_PREFIX}*/{MANIFEST})"
                          f"{found}")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta (step, settings) checkpoint `path` was saved with, after checking its files' sizes (cheap: no
    file is read): what a command reads before it loads the checkpoint, which verifies the checksums."""
    return read_manifest(path, share=None)["meta"]


def _check_shape(manifest: Any) -> None:
    """A KeyError or TypeError unless `manifest` is {"files": {name: {"file", "bytes", "sha256"}}, "meta": {...}}."""
    if not isinstance(manifest, dict):
        raise TypeError(f"a JSON {type(manifest).__name__}, not an object")
    if missing := {"files", "meta"} - manifest.keys():
        raise KeyError(", ".join(sorted(missing)))
    entries = manifest["files"].values() if isinstance(manifest["files"], dict) else None
    if entries is None or not isinstance(manifest["meta"], dict) or not all(
            isinstance(e, dict) and {"file", "bytes", "sha256"} <= e.keys() for e in entries):
        raise TypeError("files or meta not as written")


def read_manifest(path: str | Path, share: tuple[int, int] | None = (0, 1)) -> dict[str, Any]:
    """The manifest of checkpoint `path`, after checking every file's size, and the sha256 of the files in this
    process's `share` = (index, count): file i is hashed where i % count == index, so the ranks of a job split
    the reading instead of each reading everything (None: no file is hashed)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        _check_shape(manifest)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / MANIFEST} is corrupt ({err})") from None
    index, count = share or (0, 0)
    for i, (name, entry) in enumerate(sorted(manifest["files"].items())):
        file = path / entry["file"]
        size = file.stat().st_size if file.is_file() else None
        if size is None:  # a node's shards lost with its disk, a partial copy
            wrong = "is missing"
        elif size != entry["bytes"]:  # a truncated copy, a disk that filled: said as such, without reading it
            wrong = f"is {size} bytes where {MANIFEST} says {entry['bytes']}"
        elif count and i % count == index and _sha256(file) != entry["sha256"]:
            wrong = f"does not match its sha256 in {MANIFEST}"
        else:
            continue
        earlier = [p for p in list_checkpoints(path.parent) if p.name < path.name]
        remedy = (f"to resume from the checkpoint before it, move {path.name} out of {path.parent}, to a place "
                  "outside the run" if earlier else
                  f"there is no earlier checkpoint: move {path.name} out of {path.parent}, to a place outside the "
                  "run, and start the run again (without --resume: --auto-resume does so by itself)")
        raise CheckpointError(f"checkpoint {path} is corrupt: {entry['file']} ({name}) {wrong}; {remedy}")
    return manifest


def load_states(path: str | Path, share: tuple[int, int] = (0, 1)) -> tuple[dict[str, Any], dict[str, Any]]:
    """(states by object name, meta) of a verified checkpoint (`read_manifest` for `share`). Files in
    subdirectories (sharded tensors, checkpoint/sharded.py) are verified here but read by their own reader."""
    path = Path(path)
    manifest = read_manifest(path, share)
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r}; this version reads format "
                              f"{FORMAT_VERSION} (safetensors states, sharded model and optimizer)")
    states = {}
    for name, entry in manifest["files"].items():
        if "/" in entry["file"]:
            continue
        file = path / entry["file"]
        try:
            with safe_open(file, "pt") as f:
                skeleton = json.loads((f.metadata() or {})[SKELETON])
            states[name] = decode_state(load_file(file), skeleton)
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path}: cannot read {entry['file']} ({err})") from None
    return states, manifest["meta"]


def load(path: str | Path, objects: Mapping[str, Stateful]) -> dict[str, Any]:
    """Load checkpoint `path` into `objects` (every one must be in it); returns the checkpoint's meta."""
    states, meta = load_states(path)
    missing = sorted(set(objects) - set(states))
    if missing:
        raise CheckpointError(f"checkpoint {path} has no state for {missing} (it holds {sorted(states)})")
    for name, obj in objects.items():
        try:
            obj.load_state_dict(states[name])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path}: the {name!r} state does not fit: {err}") from None
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

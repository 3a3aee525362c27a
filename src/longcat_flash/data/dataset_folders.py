"""A data set's folder as the hub and `datasets` lay it out: which split each file holds, by its name, and the files
`datasets` writes beside the data. A folder given as training data must hold one split: train and test files read
together would train on the held-out rows (pre-training corpora and SFT conversations alike).
"""
from __future__ import annotations

import fnmatch
import glob
import itertools
import os
import re
from pathlib import Path

# The words that name a split in a data set's file and folder names, as `datasets` matches them: between separators
# (`train-00000-of-00002.parquet`, `mydata_test.jsonl`, `validation/`), each word standing for its split.
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test"}
_SPLIT_WORD = re.compile(rf"(?:^|[-._ 0-9])({'|'.join(sorted(SPLIT_WORDS, key=len, reverse=True))})(?=$|[-._ 0-9])")
DATASETS_METADATA = ("dataset_info.json", "state.json", "dataset_infos.json")  # `datasets`' own files: not data
RUN_CONFIG_FILE = "train_config.json"  # what marks a training run's directory (train/config.py writes it)
RUN_LOCK_FILE = ".lock"  # and, from the run's start, its lock (train/run_lock.py takes it before writing anything)


def glob_files(pattern: str | Path) -> list[Path] | None:
    """The files a glob pattern (`data/train-*.parquet`, `**` at any depth) names, in name order, all of one split
    (`data/*.parquet` over train and test files is refused, as their folder is); None when `pattern` is a path that
    exists or holds no wildcard; FileNotFoundError when it matches no file."""
    if Path(pattern).exists() or not _wild(str(pattern)):
        return None
    base = Path(*itertools.takewhile(lambda part: not _wild(part), Path(pattern).parts))  # what the files are under
    if "**" in Path(pattern).parts:  # walked as a folder is (glob.glob follows every link: a loop never ends;
        # a run's directory inside, its metrics.jsonl and tokenizer.json, is not data)
        wild = Path(pattern).parts[len(base.parts):]
        found = [path for path in data_files(base) if _matches(path.relative_to(base).parts, wild)]
    else:
        found = [Path(p) for p in glob.glob(str(pattern)) if Path(p).is_file()]
    if not (files := unique_files(found)):
        raise FileNotFoundError(f"no file matches {pattern}")
    words, named, _ = _splits(base, files)  # files no split names may stand beside one: the pattern chose them
    if len(words) > 1:
        raise ValueError(f"the pattern {pattern} matches the files of several splits ({named}); narrow it to one "
                         "split's files")
    return files


def _wild(text: str) -> bool:
    return any(c in text for c in "*?[")


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether a path's parts match a glob pattern's, as glob does: `**` any number of folders (none too), any
    other part one name (fnmatch's `*`, `?`, `[...]`)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def check_one_split(path: Path, files: list[Path], beside: str) -> None:
    """Refuse `files` (under the folder `path`) when they hold several splits, or a held-out split beside files no
    split names (which `datasets` leaves out, reading the folder as the held-out split alone); `beside` says what to
    give instead in that case."""
    words, named, splits = _splits(path, files)
    unnamed = [file for file, found in splits.items() if found is None]
    if len(words) > 1:
        raise ValueError(f"{path} holds the files of several splits ({named}); give one split's files: a file, a "
                         f"folder or a glob pattern such as '{path}/**/*train*' (quoted)")
    if unnamed and set(words) - {"train"}:
        held = next(file for file, found in splits.items() if found)
        raise ValueError(f"{path} holds {named} files ({held.relative_to(path)}) beside files no split names "
                         f"({unnamed[0].relative_to(path)}{', ...' if len(unnamed) > 1 else ''}), which `datasets` "
                         f"would leave out; {beside} (if every file is training data and a name only looks like a "
                         f"split's, a quoted glob reads the files it matches as they are: '{path}/**')")


def _splits(path: Path, files: list[Path]) -> tuple[dict[str, str], str, dict[Path, tuple[str, str] | None]]:
    """The splits `files` (under `path`) name ({split: the word naming it}), them as a phrase, and each file's."""
    splits = {file: split_of(file.relative_to(path)) for file in files}
    words = {split: word for found in splits.values() if found for split, word in [found]}
    return words, ", ".join(f"{s} ({w})" if w != s else s for s, w in sorted(words.items())), splits


def split_of(relative: Path) -> tuple[str, str] | None:
    """(split, the word that names it) for a data set file by the hub's naming (SPLIT_WORDS), its folders first;
    None for other names."""
    found = (_SPLIT_WORD.search(part.lower()) for part in relative.parts)
    return next(((SPLIT_WORDS[m.group(1)], m.group(1)) for m in found if m), None)


def tree_files(root: Path) -> list[Path]:
    """The files below directory `root` in sorted order, without hidden files and folders (`.git`,
    `.ipynb_checkpoints`), as paths under `root`; through symlinked folders that lead out of the tree (data kept
    elsewhere), each real folder and file once. A link to a folder inside the tree is not followed (the folder is
    read under its own name, which says its split), nor one to a folder holding the tree (the tree again, or the
    disk)."""
    top, files, seen = os.path.realpath(root), [], set()

    def followed(folder: str) -> bool:
        if not os.path.islink(folder):
            return True
        real = os.path.realpath(folder)
        return os.path.commonpath([real, top]) not in (real, top)  # neither inside the tree nor holding it

    def unreadable(err: OSError) -> None:  # a folder left out unsaid would be data lost unsaid
        if Path(err.filename or "").name == "lost+found":  # a file system's own, root's alone: never data
            return
        raise OSError(err.errno, f"cannot list the folder {err.filename} under {root} ({err.strerror}): give the "
                      "data access to it, move it out, or name the files to read with a quoted glob") from None

    # os.walk, as rglob skips symlinked folders (< 3.13)
    for directory, subdirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        if (real := os.path.realpath(directory)) in seen:  # a loop, or a folder two links lead to
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and followed(os.path.join(directory, d)))
        files += [path for name in names if not name.startswith(".") and (path := Path(directory, name)).is_file()]
    return unique_files(files)


def unique_files(files: list[Path]) -> list[Path]:
    """`files` in name order, each real file once: a file link beside its target (`latest.txt` -> `v2.txt`) would
    train on the file twice, maybe once in each split. The target's own name is kept; a link only for a file
    nothing else names (data kept elsewhere)."""
    seen = {os.path.realpath(path) for path in files if not path.is_symlink()}
    unique = [path for path in files if not path.is_symlink()]
    for link in sorted(path for path in files if path.is_symlink()):
        if (real := os.path.realpath(link)) not in seen:
            seen.add(real)
            unique.append(link)
    return sorted(unique)


def data_files(root: Path) -> list[Path]:
    """`tree_files(root)` but those of training runs' and models' directories below it (a run's metrics.jsonl and
    tokenizer.json, a checkpoint's config.json): `--data .` with runs/ inside it."""
    found = tree_files(root)
    runs = {folder for folder in {p.parent for p in found} if _run_or_model(folder)}
    return [p for p in found if not runs.intersection(p.parents)]


def _run_or_model(folder: Path) -> bool:
    """A training run's directory (its config, or from its start its lock beside the tokenizer it writes first) or
    a model's (config.json beside safetensors weights)."""
    return ((folder / RUN_CONFIG_FILE).is_file() or ((folder / RUN_LOCK_FILE).is_file()
                                                    and (folder / "tokenizer.json").is_file())
            or ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))))

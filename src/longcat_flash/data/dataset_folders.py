"""A data set's folder as the hub and `datasets` lay it out: which split each file holds, by its name, and the files
`datasets` writes beside the data. A folder given as training data must hold one split: train and test files read
together would train on the held-out rows (pre-training corpora and SFT conversations alike).
"""
from __future__ import annotations

import glob
import itertools
import re
from pathlib import Path

# The words that name a split in a data set's file and folder names, as `datasets` matches them: between separators
# (`train-00000-of-00002.parquet`, `mydata_test.jsonl`, `validation/`), each word standing for its split.
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test"}
_SPLIT_WORD = re.compile(rf"(?:^|[-._ 0-9])({'|'.join(sorted(SPLIT_WORDS, key=len, reverse=True))})(?=$|[-._ 0-9])")
DATASETS_METADATA = ("dataset_info.json", "state.json", "dataset_infos.json")  # `datasets`' own files: not data


def glob_files(pattern: str | Path) -> list[Path] | None:
    """The files a glob pattern (`data/train-*.parquet`, `**` at any depth) names, in name order, all of one split
    (`data/*.parquet` over train and test files is refused, as their folder is); None when `pattern` is a path that
    exists or holds no wildcard; FileNotFoundError when it matches no file."""
    if Path(pattern).exists() or not _wild(str(pattern)):
        return None
    files = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"no file matches {pattern}")
    base = Path(*itertools.takewhile(lambda part: not _wild(part), Path(pattern).parts))  # what the files are under
    words, named, _ = _splits(base, files)  # files no split names may stand beside one: the pattern chose them
    if len(words) > 1:
        raise ValueError(f"the pattern {pattern} matches the files of several splits ({named}); narrow it to one "
                         "split's files")
    return files


def _wild(text: str) -> bool:
    return any(c in text for c in "*?[")


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
                         f"would leave out; {beside}")


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

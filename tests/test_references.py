"""Every reference in the repository points inside it (docs/design.md §5).

Rules, applied to every text file git tracks or would add (`git ls-files`; data and binary files skipped):
  1. A repo path cited in a comment, docstring or doc must exist. A path counts as a citation when it starts with a
     top-level folder of the repository (`docs/mla.md`, `tests/test_moe.py`, `bench/bench_ep.py`) or with a
     subpackage of `src/longcat_flash` (`train/trainer.py`, `model/moe.py`), is not part of a longer path or a URL,
     and ends in a file extension. It is resolved against the repository root, the package, and the citing file's
     folder. Bare file names (`block.py`) and templates (`bench/bench_*.py`, `OUT/<name>.json`) are not checked.
  2. A section cited after a doc path, `docs/architecture.md §3.2` or `docs/mla.md#shared-front-queries-and-the-latent`, must exist:
     a numbered heading (`## 3.`, `### 3.2`) or a heading whose GitHub anchor is the one given.
  3. Nothing cites the background files that live outside the repository (the spec, the peer survey, the style
     guide, the design sketch: see OUT_OF_REPO below); the technical report is cited by its own section
     numbers ("report §2.2"), which is fine.
"""
from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "longcat_flash"
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()

DATA_SUFFIXES = {".png", ".jpg", ".json", ".jsonl", ".parquet", ".safetensors", ".bin", ".pt", ".gz", ".npy"}
EXTENSIONS = "py|md|toml|json|jsonl|png|txt|sh|yaml|yml|cfg"
# Background material that exists only outside the repository (written split so this file does not match itself).
OUT_OF_REPO = re.compile(r"(?<![\w.-])(?:[\w.-]+/)*(?:" + "|".join(
    ["architecture", "peers", "report", "style", "scale_out", "chat_format", "DESIGN"]) + r")\.md\b"
    r"|\.\./shared\b|\bshared/reference\b")
SECTION = re.compile(r"(?:\s*(?:,|/|–|-|and)?\s*§(\d+(?:\.\d+)*))")


@cache
def tracked() -> tuple[str, ...]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    return tuple(p for p in out.stdout.decode().split("\0") if p)


@cache
def roots() -> str:
    """Alternation of the first path components that mark a citation: top-level folders and subpackages."""
    top = {p.split("/", 1)[0] for p in tracked() if "/" in p}
    sub = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return "|".join(sorted(map(re.escape, top | sub | {"longcat_flash"}), key=len, reverse=True))


def path_pattern() -> re.Pattern[str]:
    return re.compile(r"(?<![\w./:~<>{}*$-])((?:" + roots() + r")/[\w./-]*?\w\.(?:" + EXTENSIONS + r"))"
                      r"(?![\w*<>{}/-]|\.\w)(#[\w-]+)?")


def texts() -> list[tuple[str, str]]:
    out = []
    for rel in tracked():
        path = ROOT / rel
        if Path(rel).suffix in DATA_SUFFIXES or not path.is_file():
            continue
        raw = path.read_bytes()
        if b"\0" in raw:
            continue
        try:
            out.append((rel, raw.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return out


def resolve(cited: str, citing: str) -> Path | None:
    for base in (ROOT, PACKAGE, ROOT / "src", (ROOT / citing).parent):
        target = (base / cited).resolve()
        if target.is_file() and target.is_relative_to(ROOT):
            return target
    return None


def github_anchor(heading: str) -> str:
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


@cache
def headings(path: Path) -> tuple[list[str], set[str]]:
    """(section numbers, GitHub anchors) of a markdown file's headings; code blocks skipped."""
    numbers, anchors, fenced = [], set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6}\s+(.*)", line)
        if match:
            anchors.add(github_anchor(match.group(1)))
            number = re.match(r"(\d+(?:\.\d+)*)\.?\s", match.group(1))
            if number:
                numbers.append(number.group(1))
    return numbers, anchors


def broken_references(files: list[tuple[str, str]]) -> list[str]:
    pattern, bad = path_pattern(), []
    for rel, text in files:
        for lineno, line in enumerate(text.splitlines(), 1):
            where = f"{rel}:{lineno}"
            if rel != SELF:
                bad += [f"{where}: cites {m.group(0)!r}, which is outside the repository"
                        for m in OUT_OF_REPO.finditer(line) if not (ROOT / m.group(0)).is_file()]
            for m in pattern.finditer(line):
                target = resolve(m.group(1), rel)
                if target is None:
                    bad.append(f"{where}: cites {m.group(1)}, which does not exist")
                    continue
                if target.suffix != ".md":
                    continue
                numbers, anchors = headings(target)
                if m.group(2) and m.group(2)[1:] not in anchors:
                    bad.append(f"{where}: cites {m.group(1)}{m.group(2)}, no such heading")
                for section in _sections(line[m.end():]):
                    if section not in numbers:
                        bad.append(f"{where}: cites {m.group(1)} §{section}, no such numbered heading")
    return bad


def _sections(rest: str) -> list[str]:
    """The § numbers directly after a cited path: `§3`, `§6.2–§6.3`, `§3.2 / §3.3`."""
    out, pos = [], 0
    while (m := SECTION.match(rest, pos)) is not None:
        out.append(m.group(1))
        pos = m.end()
    return out


def test_every_reference_points_inside_the_repository():
    bad = broken_references(texts())
    assert not bad, "broken or outside references:\n" + "\n".join(bad)


def test_the_rules_catch_what_they_should_and_nothing_else():
    # The bad citations are assembled from pieces, so that this file itself cites nothing that is missing.
    citing, missing_doc, missing_module = "docs/" + "x.md", "docs/" + "nonexistent.md", "train/" + "no_such.py"
    cited = [(citing, line) for line in [
        f"see {missing_doc} for more",                            # 0 missing doc
        f"the loop ({missing_module}) runs",                      # 1 missing module, package-relative
        "docs/mla.md " + "§99 has it",                            # 2 missing numbered section
        "docs/mla.md" + "#no-such-heading",                       # 3 missing anchor
        "as the spec says (" + "architecture" + ".md §4)",        # 4 out-of-repo background file, bare
        "../" + "shared/notes",                                   # 5 out-of-repo path
    ]]
    fine = [(citing, line) for line in [
        "https://github.com/huggingface/transformers/blob/main/src/transformers/models/x/model/foo.py",
        "torch/distributed/fsdp/nothing.py and OUT/metrics.jsonl and OUT/<name>.json and bench/bench_*.py",
        "json/decoder.py from the stdlib corpus; block.py; config.json; a ratio of 1.5/2.py",
        "train/trainer.py and model/moe.py and docs/mla.md and tests/test_moe.py",
        "docs/architecture.md §6.2–§6.3 and docs/architecture.md §3.2 / §3.3",
        "the report's §2.2 (report §2.2)",
    ]]
    found = broken_references(cited)
    assert len(found) == len(cited), "\n".join(found)
    assert broken_references(fine) == []

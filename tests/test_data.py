"""Data: corpus sources, cached token shards, packing, train/val split, resumable and DP-sliced sampling."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from longcat_flash.data import (Corpus, ResumableSampler, ShardMeta, TokenDataset, build_token_shard,
                                iter_documents, sample_texts, validation_batches)
from longcat_flash.tokenizer import Tokenizer, train_tokenizer

DOCS = {
    "a.txt": "first text file\nwith two lines\n",
    "b.md": "# Title\n\nSome *markdown* — ünïcödé 🙂\n",
    "sub/c.py": "def f(x):\n    return x * 2\n",
}
JSONL = [{"text": "json doc one", "id": 1}, {"text": "json doc two </s> stays text", "id": 2}]


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in JSONL) + "\n\n", encoding="utf-8")
    (root / "ignored.png").write_bytes(b"\x89PNG\x00\x01")  # not a corpus format, nor data: left out
    return root


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(list(DOCS.values()) * 10 + [r["text"] for r in JSONL], vocab_size=300)


def _write_parquet(path: Path, rows: dict[str, list]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(rows), path)
    return path


# ---- corpus sources ----

def test_directory_source_is_recursive_sorted_and_filtered(corpus_dir: Path) -> None:
    docs = list(iter_documents(corpus_dir))
    assert docs == [DOCS["a.txt"], DOCS["b.md"], JSONL[0]["text"], JSONL[1]["text"], DOCS["sub/c.py"]]


def test_hidden_folders_and_run_directories_are_not_corpus(tmp_path: Path) -> None:
    """`--data .` read `.ipynb_checkpoints` copies and the run's own metrics.jsonl (`--out` inside the corpus),
    which then failed the next run: "metrics.jsonl:1: no text_field 'text'"."""
    (tmp_path / "a.txt").write_text("kept", encoding="utf-8")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("a copy", encoding="utf-8")
    run = tmp_path / "runs" / "small"
    run.mkdir(parents=True)
    (run / "train_config.json").write_text("{}", encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    (run / "sample.txt").write_text("generated", encoding="utf-8")
    assert list(iter_documents(tmp_path)) == ["kept"]


def test_a_run_that_trained_into_the_corpus_folder_is_named(tmp_path: Path) -> None:
    """`--out` at the corpus folder marked it a run's directory: every later run read "holds no .txt/... files"."""
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    (tmp_path / "train_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="is a training run's directory .it holds train_config.json., whose files"):
        list(iter_documents(tmp_path))


def test_a_folder_is_skipped_as_a_run_or_model_only_by_their_files_together(tmp_path: Path) -> None:
    """Any folder holding a `.lock` (a name other tools use) or a .safetensors file was skipped with its text."""
    for folder, names in (("locked", [".lock"]), ("weights", ["x.safetensors"]), ("run", [".lock", "tokenizer.json"]),
                          ("model", ["config.json", "model.safetensors"])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.txt").write_text(folder, encoding="utf-8")
        for name in names:
            (tmp_path / folder / name).write_text("{}", encoding="utf-8")
    assert list(iter_documents(tmp_path)) == ["locked", "weights"]


def test_symlinked_folders_are_read_once_and_a_link_loop_ends(tmp_path: Path) -> None:
    """rglob skipped symlinked folders: a corpus of links to data elsewhere held "no .txt/... files"."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "far.txt").write_text("far", encoding="utf-8")
    corpus = tmp_path / "corpus"
    (corpus / "real").mkdir(parents=True)
    (corpus / "real" / "near.txt").write_text("near", encoding="utf-8")
    (corpus / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (corpus / "real" / "loop").symlink_to(corpus, target_is_directory=True)  # back up: would never end
    (corpus / "a_same").symlink_to(corpus / "real", target_is_directory=True)  # the same folder again: read once
    (corpus / "real" / "up").symlink_to(tmp_path, target_is_directory=True)  # the folder holding the tree
    assert list(iter_documents(corpus)) == ["far", "near"]
    assert [p.relative_to(corpus).parts[0] for p in Corpus(corpus).files()] == ["linked", "real"]  # by its own name
    only_links = tmp_path / "only_links"
    only_links.mkdir()
    (only_links / "data").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert list(iter_documents(only_links)) == ["far"]


def test_a_recursive_glob_reads_each_file_once_through_link_loops(tmp_path: Path) -> None:
    """glob.glob follows every symlinked folder under `**`: a link to `..` read the same file 41 times (train and
    validation alike), and links to `.` and `..` side by side never ended. A `**` pattern now walks as a folder does."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "far.txt").write_text("far", encoding="utf-8")
    tree = tmp_path / "g"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "near.txt").write_text("near", encoding="utf-8")
    (tree / "top.txt").write_text("top", encoding="utf-8")
    (tree / "sub" / "notes.md").write_text("not matched", encoding="utf-8")
    (tree / "sub" / "self").symlink_to(".", target_is_directory=True)
    (tree / "sub" / "parent").symlink_to("..", target_is_directory=True)
    (tree / "sub" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # data kept elsewhere
    assert [p.relative_to(tree).as_posix() for p in Corpus(f"{tree}/**/*.txt").files()] == [
        "sub/linked/far.txt", "sub/near.txt", "top.txt"]
    assert [p.name for p in Corpus(f"{tree}/**/n*").files()] == ["near.txt", "notes.md"]
    assert [p.name for p in Corpus(f"{tree}/*/*.txt").files()] == ["near.txt"]  # one level, as glob reads it


def test_a_file_link_beside_its_target_is_read_once(tmp_path: Path) -> None:
    """A folder's `latest.txt -> v2.txt` trained on v2 twice, maybe once in each split."""
    (tmp_path / "elsewhere.txt").write_text("far", encoding="utf-8")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "v2.txt").write_text("v2", encoding="utf-8")
    (corpus / "latest.txt").symlink_to("v2.txt")
    (corpus / "far.txt").symlink_to(tmp_path / "elsewhere.txt")  # the one name this file has in the corpus
    assert [p.name for p in Corpus(corpus).files()] == ["far.txt", "v2.txt"]
    assert [p.name for p in Corpus(f"{corpus}/*.txt").files()] == ["far.txt", "v2.txt"]


def test_single_text_file_is_one_document(corpus_dir: Path) -> None:
    assert list(iter_documents(corpus_dir / "b.md")) == [DOCS["b.md"]]


def test_jsonl_with_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "one"}\n{"body": "two"}\n', encoding="utf-8")
    assert list(iter_documents(path, text_field="body")) == ["one", "two"]


def test_a_json_file_is_records_not_text(tmp_path: Path) -> None:
    """A .json source (JSON Lines as `datasets`' to_json writes them, or an array) was trained on as raw text, its
    keys and quotes included, with text_field never read."""
    import gzip

    records = [{"body": "one"}, {"body": "two"}]
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "array.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    with gzip.open(tmp_path / "array.json.gz", "wt") as f:
        f.write(json.dumps(records))
    for name in ("lines.json", "array.json", "array.json.gz"):
        assert list(iter_documents(tmp_path / name, text_field="body")) == ["one", "two"]
    with pytest.raises(ValueError, match=r"array\.json:1: no text_field 'text'"):
        list(iter_documents(tmp_path / "array.json"))
    (tmp_path / "array.json").write_text("[" + json.dumps(records[0]) + ",\n{oops}]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"array\.json:2: not valid JSON"):
        list(iter_documents(tmp_path / "array.json"))


@pytest.mark.parametrize("line, match", [
    ('{"other": "x"}', r"x\.jsonl:2: no text_field 'text' \(has \['other'\]\); --set data\.text_field=NAME reads"),
    ('{"text": 5}', r"x\.jsonl:2: field 'text' must be a string"),
    ('{"text": ', r"x\.jsonl:2: not valid JSON"),
    ('["text"]', r"x\.jsonl:2: no text_field 'text'"),
])
def test_bad_jsonl_names_file_line_and_field(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        list(iter_documents(path))


def test_suffixes_are_read_in_any_case(tmp_path: Path) -> None:
    """DOCS.JSONL was read as one plain-text document (its JSON lines and all), and skipped inside a directory."""
    path = tmp_path / "DOCS.JSONL"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert list(iter_documents(path)) == ["one", "two"]
    assert list(iter_documents(tmp_path)) == ["one", "two"]


def test_parquet_source(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "p.parquet", {"content": ["row one", None, "row two"], "n": [1, 2, 3]})
    assert list(iter_documents(path, text_field="content")) == ["row one", "row two"]
    with pytest.raises(ValueError, match=r"no text_field column 'text' .*; --set data\.text_field=NAME"):
        list(iter_documents(path))


def test_files_as_other_tools_write_them(tmp_path: Path) -> None:
    """Gzip-compressed JSON Lines were refused as "not UTF-8 text" (and skipped in a folder), a category or
    string_view column as "must hold strings", a null text stopped a .jsonl where a .parquet skipped it, and a
    text file's byte order mark was trained on."""
    import gzip

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "corpus"
    folder.mkdir()
    with gzip.open(folder / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped one"}\n{"text": null}\n{"text": "zipped two"}\n')
    assert list(iter_documents(folder / "a.jsonl.gz")) == ["zipped one", "zipped two"]
    (folder / "b.txt").write_text("\ufeffno mark", encoding="utf-8")
    category = pa.array(["cat one", None, "cat two"]).dictionary_encode()
    pq.write_table(pa.table({"text": category}), folder / "c.parquet")
    assert list(iter_documents(folder)) == ["zipped one", "zipped two", "no mark", "cat one", "cat two"]
    if hasattr(pa, "string_view"):
        pq.write_table(pa.table({"text": pa.array(["view"], type=pa.string_view())}), tmp_path / "v.parquet")
        assert list(iter_documents(tmp_path / "v.parquet")) == ["view"]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz: not a readable gzip file"):
        list(iter_documents(tmp_path / "bad.jsonl.gz"))


def test_a_corpus_folder_reads_json_gz_shards_one_split_at_a_time(tmp_path: Path) -> None:
    """A C4-style folder of .json.gz shards was refused as holding no corpus files, a .jsonl.zst shard was left out
    unsaid, and train and validation shards side by side were both trained on; a glob now picks one split. A code
    tree keeps reading as it did: its settings .json, fixtures and files named like splits are no data set's."""
    import gzip

    c4 = tmp_path / "c4" / "en"
    c4.mkdir(parents=True)
    for split, k in (("train", 0), ("train", 1), ("validation", 0)):
        with gzip.open(c4 / f"c4-{split}.{k:05d}-of-00002.json.gz", "wt", encoding="utf-8") as f:
            f.write(json.dumps({"text": f"{split} {k}", "url": "u"}) + "\n")
    (c4 / "dataset_info.json").write_text(json.dumps({"features": {}}))  # `datasets`' own file, not records
    with pytest.raises(ValueError, match=r"en holds the files of several splits \(train, validation\); give one "
                                         r"split's files: a file, a folder or a glob pattern"):
        Corpus(c4).files()
    assert list(iter_documents(c4 / "c4-train.*")) == ["train 0", "train 1"]
    with pytest.raises(ValueError, match=r"the pattern .*en/c4-\* matches the files of several splits \(train, "
                                         r"validation\); narrow it to one split's files"):
        Corpus(c4 / "c4-*").files()  # a glob over both splits trained on the held-out one
    with pytest.raises(FileNotFoundError, match=r"no file matches .*c4-test\.\*"):
        Corpus(c4 / "c4-test.*").files()
    (c4 / "c4-validation.00000-of-00002.json.gz").unlink()
    assert list(iter_documents(c4)) == ["train 0", "train 1"]
    (c4 / "c4-train.00002-of-00002.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd rows")
    with pytest.raises(ValueError, match=r"c4-train\.00002-of-00002\.jsonl\.zst in .*en is a data file in a format "
                                         r"not read here"):
        Corpus(c4).files()
    code = tmp_path / "code"
    (code / "tests" / "data").mkdir(parents=True)
    (code / "parse.py").write_text("def parse(): ...")
    (code / "tests" / "test_parse.py").write_text("def test_parse(): ...")
    (code / "requirements-dev.txt").write_text("pytest")  # "dev" names no split here
    (code / "package.json").write_text('{\n  "name": "x"\n}')  # settings, not records
    (code / "tests" / "data" / "cases.csv").write_text("a,b")  # a fixture, not corpus
    (code / "tests" / "data" / "archive.zip").write_bytes(b"PK\x03\x04")
    assert len(list(iter_documents(code))) == 3


def test_bad_bytes_lone_surrogates_and_compressed_files_in_a_corpus(tmp_path: Path) -> None:
    """A bad byte past a .jsonl's first KiB stopped a run with a UnicodeDecodeError naming no file, a lone surrogate
    escape (valid JSON) with a UnicodeEncodeError, and a zstd file was "not UTF-8 text" about pre-tokenized files."""
    lines = "".join(json.dumps({"text": f"line {i} " * 4}) + "\n" for i in range(50)).encode()
    (tmp_path / "bad.jsonl").write_bytes(lines + b'{"text": "bad \xff byte"}\n' + lines)
    with pytest.raises(ValueError, match=rf"bad\.jsonl:51: not UTF-8 text \(byte b'\\xff' at byte {len(lines) + 14} "
                                         r"of the file\); convert it to UTF-8$"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "cut.jsonl").write_text('{"text": "cut \\ud83d emoji"}\n{"text": "whole \\ud83d\\ude00"}\n')
    docs = list(iter_documents(tmp_path / "cut.jsonl"))
    assert docs == ["cut \ufffd emoji", "whole \U0001f600"] and all(doc.encode("utf-8") for doc in docs)
    (tmp_path / "rows.jsonl").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(256)))
    with pytest.raises(ValueError, match=r"rows\.jsonl is zstd-compressed, which is not read under this name: "
                                         r"decompress it$"):
        list(iter_documents(tmp_path / "rows.jsonl"))
    import gzip
    (tmp_path / "notes.txt").write_bytes(gzip.compress(b"some notes"))
    with pytest.raises(ValueError, match=r"notes\.txt is gzip-compressed.*or name it \*\.jsonl\.gz"):
        list(iter_documents(tmp_path / "notes.txt"))


def test_parquet_in_directory(corpus_dir: Path) -> None:
    _write_parquet(corpus_dir / "e.parquet", {"text": ["from parquet"]})
    assert "from parquet" in list(iter_documents(corpus_dir))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    """`longcat train --data corpus.parquet` without pyarrow printed an ImportError's traceback, whose advice was
    the test extra."""
    from longcat_flash.cli import main

    path = _write_parquet(tmp_path / "p.parquet", {"text": ["x"]})
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(ValueError, match=r"pip install pyarrow \(the longcat-flash\[parquet\] extra\)"):
        list(iter_documents(path))
    with pytest.raises(SystemExit) as stop:
        main(["train", "--preset", "tiny", "--data", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    assert str(stop.value.code) == f"longcat train: reading {path} needs pyarrow: pip install pyarrow (the " \
        "longcat-flash[parquet] extra)"


def test_what_a_folder_from_the_hub_holds_beside_its_data(tmp_path: Path) -> None:
    """A hub data set's card (README.md) beside its record shards was trained on; a `datasets` save_to_disk
    folder (.arrow) was "no corpus files", and a table given alone was read as one text document."""
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    _write_parquet(hub / "data" / "train-00000-of-00001.parquet", {"text": ["row one", "row two"]})
    (hub / "README.md").write_text("---\nlicense: mit\n---\n# My dataset\n")
    (hub / "data" / "notes.md").write_text("a note")  # not the card: read, as every text file in a folder
    assert list(iter_documents(hub)) == ["a note", "row one", "row two"]  # in name order
    (tmp_path / "hubs" / "b" / "data").mkdir(parents=True)  # cards of several data sets, each above its shards
    (hub / "data" / "notes.md").rename(tmp_path / "hubs" / "notes.md")
    hub.rename(tmp_path / "hubs" / "a")
    (tmp_path / "hubs" / "b" / "data" / "train.jsonl").write_text(json.dumps({"text": "row three"}) + "\n")
    (tmp_path / "hubs" / "b" / "README.md").write_text("# card b")
    assert list(iter_documents(tmp_path / "hubs")) == ["row one", "row two", "row three", "a note"]
    (tmp_path / "code").mkdir()  # without records, a README is text like any other
    (tmp_path / "code" / "README.md").write_text("# tool")
    assert list(iter_documents(tmp_path / "code")) == ["# tool"]
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "data-00000-of-00001.arrow").write_bytes(b"\xff\xff\xff\xff")
    (saved / "state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"data-00000-of-00001\.arrow in .*saved is a data file in a format not read "
                                         r"here.*Dataset\.to_parquet"):
        Corpus(saved).files()
    (tmp_path / "t.csv").write_text("text,label\nhello,1\n")
    with pytest.raises(ValueError, match=r"t\.csv is a \.csv table, which is not read here"):
        Corpus(tmp_path / "t.csv").files()
    with pytest.raises(ValueError, match=r"t\.csv is a \.csv table"):  # named by a glob, too
        Corpus(tmp_path / "*.csv").files()


def test_a_folder_that_cannot_be_listed_is_an_error_not_left_out(tmp_path: Path, monkeypatch) -> None:
    """os.walk skipped a folder it could not list (no read permission), so its files were left out unsaid. Run
    as root, which reads any folder, the refusal is the operating system's, made to happen here."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "sub" / "b.txt").write_text("two")
    listing = os.scandir

    def refusing(path=".", *args):
        if Path(path) == tmp_path / "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path, *args)
    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(PermissionError, match=r"cannot list the folder .*sub under .* \(Permission denied\): give"):
        Corpus(tmp_path).files()


def test_files_named_like_a_split_among_training_files_say_how_to_read_them_all(tmp_path: Path) -> None:
    """`dev.to-articles.jsonl` reads as a validation split, as `datasets` reads it; the refusal said to give the
    training files alone, which these all are, and not how to."""
    for name in ("github", "dev.to-articles"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": name}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("notes")
    with pytest.raises(ValueError, match=r"a quoted glob reads the files it matches as they are: '.*/\*\*'"):
        Corpus(tmp_path).files()
    assert list(iter_documents(tmp_path / "**")) == ["dev.to-articles", "github", "notes"]  # nested ones too


def test_a_tokenizer_without_eos_is_told_where_to_name_one(tmp_path: Path, corpus_dir: Path) -> None:
    """A WordPiece-style vocabulary ends documents with [SEP]; the refusal did not say how to make it the eos."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({"[UNK]": 0, "[SEP]": 1, "def": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"no eos token, which separates documents: name one in a "
                                         r"tokenizer_config\.json beside its tokenizer\.json"):
        build_token_shard(corpus_dir, Tokenizer.load(tmp_path), tmp_path / "cache", progress=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[SEP]"}))
    assert build_token_shard(corpus_dir, Tokenizer.load(tmp_path), tmp_path / "cache", progress=False).is_file()


def test_missing_path_and_empty_directory_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        list(iter_documents(tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        list(iter_documents(tmp_path / "empty"))


def test_caps_on_documents_and_bytes(corpus_dir: Path) -> None:
    assert len(list(iter_documents(corpus_dir, max_docs=2))) == 2
    first = len(DOCS["a.txt"].encode())
    assert list(iter_documents(corpus_dir, max_bytes=first)) == [DOCS["a.txt"]]
    second = list(iter_documents(corpus_dir, max_docs=2))[1]
    assert list(iter_documents(corpus_dir, max_bytes=first + 5)) == [DOCS["a.txt"], second.encode()[:5].decode()]
    big = corpus_dir.parent / "one.txt"  # one file larger than the cap: it was read whole
    big.write_text("é" + "x" * 10_000, encoding="utf-8")
    assert list(iter_documents(big, max_bytes=1)) == [] and list(iter_documents(big, max_bytes=100)) == [
        "é" + "x" * 98]  # cut at a character boundary: é is two bytes
    with pytest.raises(ValueError, match="max_docs"):
        Corpus(corpus_dir, max_docs=0)


def test_stdlib_is_the_default_source() -> None:
    corpus = Corpus()
    files = corpus.files()
    assert corpus.is_stdlib and Corpus("stdlib").is_stdlib and not Corpus(Path("stdlib")).is_stdlib
    assert len(files) > 500 and files == sorted(files)
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    first_text = next(p.read_text(encoding="utf-8") for p in files if p.stat().st_size)
    assert list(iter_documents(max_docs=3))[0] == first_text


def test_sample_texts_spreads_over_files(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"f{i:02d}.txt").write_text(f"doc {i:02d} " * 10, encoding="utf-8")
    sample = sample_texts(tmp_path, max_bytes=500)
    indices = [int(doc.split()[1]) for doc in sample]
    assert len(sample) == 7 and sum(map(len, sample)) <= 500  # 7 of 20 files of 70 bytes...
    assert indices[0] <= 3 and indices[-1] >= 17  # ...spread to the end of the corpus, not just its start


@pytest.mark.parametrize("files", [1, 3])
def test_sample_texts_of_files_larger_than_the_sample_are_their_first_documents(tmp_path: Path, files: int) -> None:
    """One 9 MB .jsonl with an 8 MB sample (or shards each past it) gave no text: the run's tokenizer trained on
    nothing and held the 256 bytes alone, while the log said it trained on 8 MB."""
    for f in range(files):
        (tmp_path / f"part{f}.jsonl").write_text("".join(json.dumps({"text": f"doc {f} {i} " * 20}) + "\n"
                                                         for i in range(50)), encoding="utf-8")
    sample = sample_texts(tmp_path if files > 1 else tmp_path / "part0.jsonl", max_bytes=2000)
    assert sample and sample[0].startswith("doc 0 0 ") and 1000 < sum(map(len, sample)) <= 2000


def test_sample_texts_fills_up_what_files_of_unequal_sizes_spread_to(tmp_path: Path) -> None:
    """Three 9000-byte files and a 100-byte one, 8000 bytes wanted: the spread kept the small file alone."""
    for name, size in (("a", 9000), ("b", 9000), ("c", 9000), ("d", 100)):
        (tmp_path / f"{name}.txt").write_text(name * size, encoding="utf-8")
    sample = sample_texts(tmp_path, max_bytes=8000)
    assert sample[0] == "d" * 100 and sample[1] == "a" * 7900  # the spread's file, then the corpus in order


# ---- token shards ----

class Spy:
    """A tokenizer that remembers the longest text it was given to encode."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.longest = tok, 0
        self.eos_id, self.vocab_size, self.fingerprint = tok.eos_id, tok.vocab_size, tok.fingerprint

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.longest = max(self.longest, *map(len, texts))
        return self.tok.encode_batch(texts)


@pytest.mark.parametrize("kind", ["byte-level", "one line", "sentencepiece", "sentencepiece, no spaces"])
def test_a_long_text_file_is_encoded_in_pieces_to_the_same_tokens(tmp_path: Path, tok: Tokenizer, kind) -> None:
    """A single 50 MB text file went to the tokenizer whole and took 6 GB: a long document is now cut at line
    starts or between words where the tokens come out as they do for the whole text (not at a line start before
    which a SentencePiece vocabulary would put its "▁")."""
    from tokenizer_support import sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer() if kind.startswith("sentencepiece") else tok
    lines = [f"{'    ' * (i % 3)}value_{i} = compute({i}, 'x')  # note {i}\n" for i in range(400)]
    lines[200] = "\n"  # a blank line: no cut beside it
    doc = "".join(lines)
    doc = {"one line": doc.replace("\n", " "), "sentencepiece, no spaces": doc.replace(" ", "")}.get(kind, doc)
    (tmp_path / "one.txt").write_text(doc, encoding="utf-8")
    spy = Spy(tokenizer)
    path = build_token_shard(tmp_path / "one.txt", spy, tmp_path / "cache", chunk_bytes=1000, progress=False)
    assert np.fromfile(path, dtype=ShardMeta.read(path).dtype).tolist() == [*tokenizer.encode(doc), tokenizer.eos_id]
    assert ShardMeta.read(path).n_docs == 1
    if kind == "sentencepiece, no spaces":
        assert spy.longest == len(doc)  # its only places are line starts, where its pieces would encode otherwise
    else:
        assert spy.longest < 1300, spy.longest  # a piece, not the 18 kB document


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_a_long_record_with_no_space_or_line_is_cut_too(tmp_path: Path, tok: Tokenizer, kind, monkeypatch) -> None:
    """A 20 MB record with neither spaces nor lines (base64 data) was encoded whole: 4.3 GB. A byte-level BPE
    finds exact cuts in it anyway; where none is found (SentencePiece's "▁") the text is cut past MOST_WHOLE."""
    import base64
    import random

    from tokenizer_support import sentencepiece_tokenizer

    from longcat_flash.data import shards

    monkeypatch.setattr(shards, "MOST_WHOLE", 5000)
    tokenizer = sentencepiece_tokenizer() if kind == "sentencepiece" else tok
    blob = base64.b64encode(random.Random(0).randbytes(15000)).decode()  # 20k characters, no space, no line
    (tmp_path / "blob.jsonl").write_text(json.dumps({"text": blob}) + "\n", encoding="utf-8")
    spy = Spy(tokenizer)
    path = build_token_shard(tmp_path / "blob.jsonl", spy, tmp_path / "cache", chunk_bytes=1000, progress=None)
    assert spy.longest <= (1300 if kind == "byte-level" else 5000), spy.longest  # not the 20k-character record
    tokens = np.fromfile(path, dtype=ShardMeta.read(path).dtype).tolist()
    if kind == "byte-level":
        assert tokens == [*tokenizer.encode(blob), tokenizer.eos_id]
    assert ShardMeta.read(path).n_docs == 1 and tokens[-1] == tokenizer.eos_id


def test_tokenizing_without_progress_bars_says_when_it_starts_and_ends(corpus_dir: Path, tok: Tokenizer,
                                                                       tmp_path: Path, capsys) -> None:
    """`longcat train --no-progress` on a 450 MB corpus printed nothing for three minutes: the bar went, and with
    it every word of the phase. The other ranks of a torchrun (progress None) stay silent."""
    build_token_shard(corpus_dir, tok, tmp_path / "quiet", progress=None)
    assert capsys.readouterr().out == ""
    path = build_token_shard(corpus_dir, tok, tmp_path / "cache", progress=False)
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith(f"tokenizing {corpus_dir} (") and said[0].endswith(" MB of files) into the token cache")
    meta = ShardMeta.read(path)
    assert said[1].startswith(f"tokenized {corpus_dir}: {meta.n_tokens} tokens, {meta.n_docs} documents in "), said


def test_a_changed_corpus_says_which_other_shards_stay_in_the_cache(tmp_path: Path, tok: Tokenizer, capsys) -> None:
    """Each edit of a corpus left another shard as large as its tokens in the cache, and nothing said so (a run
    that trains its tokenizer on the corpus trains another one after the edit: its shards differ in both)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "first version of the corpus"}) + "\n", encoding="utf-8")
    first = build_token_shard(corpus, tok, tmp_path / "cache", progress=None)
    other_tokenizer = train_tokenizer(["other"] * 10, 280)
    build_token_shard(corpus, other_tokenizer, tmp_path / "cache", progress=None)
    corpus.write_text(json.dumps({"text": "second version, edited"}) + "\n", encoding="utf-8")
    capsys.readouterr()
    second = build_token_shard(corpus, tok, tmp_path / "cache", progress=False)
    note = capsys.readouterr().out.splitlines()[-1]
    assert second != first and first.is_file()  # kept: a cache deletes nothing a run may read
    assert note.startswith(f"note: 2 other token shard(s) of {corpus} stay in ") and first.name in note, note


def test_the_bar_of_a_compressed_corpus_counts_instead_of_ending_early(tmp_path: Path, tok: Tokenizer,
                                                                        capsys) -> None:
    """Its total was the files' compressed size, a third of their text: the bar stood at 100% with most of the
    work left, then ran past it."""
    import gzip

    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(200))
    build_token_shard(tmp_path / "a.jsonl.gz", tok, tmp_path / "cache", progress=True)
    first_render = capsys.readouterr().err.split("\r")[1]
    assert first_render.startswith("tokenizing a.jsonl: 0.00B [") and "%" not in first_render, first_render


def test_a_globs_shard_is_named_without_its_wildcards(corpus_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    """`--set data.source='corpus/*.md'` cached its tokens as `*-<hash>.bin`, a name every shell expands."""
    path = build_token_shard(f"{corpus_dir}/*.md", tok, tmp_path / "cache", progress=False)
    assert path.name.startswith("corpus-") and not set("*?[]") & set(path.name), path.name


def test_shard_holds_documents_joined_by_eos(corpus_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    path = build_token_shard(corpus_dir, tok, tmp_path / "cache", progress=False)
    meta = ShardMeta.read(path)
    tokens = np.fromfile(path, dtype=meta.dtype)
    assert meta.dtype == "uint16" and meta.n_tokens == len(tokens) and meta.n_docs == 5
    assert meta.tokenizer_fingerprint == tok.fingerprint
    docs = list(iter_documents(corpus_dir))
    expected = [t for doc in docs for t in [*tok.encode(doc), tok.eos_id]]
    assert tokens.tolist() == expected
    assert tok.decode(tokens.tolist(), skip_special_tokens=False) == "</s>".join(docs) + "</s>"


def test_shard_cache_is_reused(corpus_dir: Path, tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    first = build_token_shard(corpus_dir, tok, tmp_path, progress=False)
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a, **k: pytest.fail("cache not reused"))
    assert build_token_shard(corpus_dir, tok, tmp_path, progress=False) == first


def test_a_killed_tokenizations_partial_shard_goes_with_the_next_one(corpus_dir: Path, tok: Tokenizer,
                                                                     tmp_path: Path) -> None:
    """A tokenization killed mid-write (torchrun stopping its workers, SIGKILL) left its partial shard, as large as
    the corpus, in the cache for good: every failed start added one. One still being written stays."""
    import os
    import time

    abandoned, live = tmp_path / ".stdlib-0123456789abcdef.bin.4242.tmp", tmp_path / ".other-fedcba.bin.77.tmp"
    for part in (abandoned, live):
        part.write_bytes(b"\0" * 1000)
    hours_ago = time.time() - 2 * 3600
    os.utime(abandoned, (hours_ago, hours_ago))
    build_token_shard(corpus_dir, tok, tmp_path, progress=False)
    assert not abandoned.exists() and live.exists()


def test_shard_cache_is_invalidated(corpus_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    first = build_token_shard(corpus_dir, tok, tmp_path, progress=False)
    other_tok = build_token_shard(corpus_dir, train_tokenizer(DOCS.values(), 280), tmp_path, progress=False)
    capped = build_token_shard(corpus_dir, tok, tmp_path, max_docs=2, progress=False)
    assert len({first, other_tok, capped}) == 3 and ShardMeta.read(capped).n_docs == 2
    changed = corpus_dir / "a.txt"
    changed.write_text("edited", encoding="utf-8")
    os.utime(changed, ns=(1, 1))
    edited = build_token_shard(corpus_dir, tok, tmp_path, progress=False)
    assert edited != first and ShardMeta.read(edited).n_tokens < ShardMeta.read(first).n_tokens


def test_the_text_field_changes_the_cache_only_where_records_are_read(corpus_dir: Path) -> None:
    """A text corpus's documents do not depend on text_field: another one tokenized the whole corpus again."""
    text = corpus_dir / "a.txt"
    assert Corpus(text, text_field="content").fingerprint() == Corpus(text).fingerprint()
    (corpus_dir / "d.jsonl").unlink()
    assert Corpus(corpus_dir, text_field="content").fingerprint() == Corpus(corpus_dir).fingerprint()
    (corpus_dir / "d.jsonl").write_text(json.dumps({"text": "a", "content": "b"}) + "\n", encoding="utf-8")
    assert Corpus(corpus_dir, text_field="content").fingerprint() != Corpus(corpus_dir).fingerprint()


def test_truncated_shard_is_rebuilt(corpus_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    path = build_token_shard(corpus_dir, tok, tmp_path, progress=False)
    n_bytes = path.stat().st_size
    path.write_bytes(path.read_bytes()[:10])
    assert build_token_shard(corpus_dir, tok, tmp_path, progress=False) == path
    assert path.stat().st_size == n_bytes


def test_shard_errors(tmp_path: Path, tok: Tokenizer) -> None:
    (tmp_path / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="produced no text"):
        build_token_shard(tmp_path / "blank.txt", tok, tmp_path / "cache", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        build_token_shard(tmp_path / "bad.jsonl", tok, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written shard or temp file is left behind
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        TokenDataset.from_shard(tmp_path / "missing.bin", seq_len=4)


def test_capped_stdlib_shard(tok: Tokenizer, tmp_path: Path) -> None:
    path = build_token_shard(None, tok, tmp_path, max_bytes=200_000, progress=False)
    assert path.name.startswith("stdlib-")
    dataset = TokenDataset.from_shard(path, seq_len=64, split="val", val_fraction=0.1)
    assert dataset.batch([0, 1]).shape == (2, 65)


# ---- packing and the train/val split ----

def test_windows_overlap_by_one_token() -> None:
    dataset = TokenDataset(np.arange(100, dtype=np.uint16), seq_len=8, val_fraction=0.0)
    batch = dataset.batch([0, 1, 11])
    assert len(dataset) == 12 and batch.shape == (3, 9) and batch.dtype == torch.int64
    assert batch[0].tolist() == list(range(9)) and batch[1].tolist() == list(range(8, 17))
    assert batch[2].tolist() == list(range(88, 97))


def test_train_and_val_are_disjoint_and_cover_the_tokens() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    train = TokenDataset(tokens, seq_len=16, split="train", val_fraction=0.1)
    val = TokenDataset(tokens, seq_len=16, split="val", val_fraction=0.1)
    seen_train = set(train.batch(range(len(train))).flatten().tolist())
    seen_val = set(val.batch(range(len(val))).flatten().tolist())
    assert seen_train.isdisjoint(seen_val)
    assert max(seen_train) < 900 <= min(seen_val)
    assert len(seen_train) > 880 and len(seen_val) > 90


def test_memmap_shard_loads(corpus_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    path = build_token_shard(corpus_dir, tok, tmp_path, progress=False)
    dataset = TokenDataset.from_shard(path, seq_len=4, val_fraction=0.2)
    assert isinstance(dataset.tokens, np.memmap) and dataset.batch([0]).shape == (1, 5)


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 0}, "seq_len"), ({"split": "test"}, "split"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"seq_len": 50, "split": "val", "val_fraction": 0.1}, "fewer than one window"),
])
def test_dataset_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenDataset(np.arange(100), **{"seq_len": 4, **kwargs})


# ---- sampling ----

@pytest.fixture
def dataset() -> TokenDataset:
    return TokenDataset(np.arange(10 * 4 + 1, dtype=np.uint16), seq_len=4, val_fraction=0.0)  # 10 windows


def _draw(sampler: ResumableSampler, steps: int, batch: int = 4) -> list[torch.Tensor]:
    return [sampler.next_batch(batch) for _ in range(steps)]


def test_sampler_is_deterministic_and_seed_dependent(dataset: TokenDataset) -> None:
    a, b = _draw(ResumableSampler(dataset, seed=7), 5), _draw(ResumableSampler(dataset, seed=7), 5)
    c = _draw(ResumableSampler(dataset, seed=8), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_each_epoch_visits_every_window_once(dataset: TokenDataset) -> None:
    sampler = ResumableSampler(dataset, seed=0)
    first, second = sampler.next_indices(10), sampler.next_indices(10)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert first.tolist() != second.tolist() and sampler.state_dict()["epoch"] == 2


def test_batch_crossing_epoch_boundary_continues_next_order(dataset: TokenDataset) -> None:
    sampler = ResumableSampler(dataset, seed=3)
    draws = np.concatenate([sampler.next_indices(4) for _ in range(5)])  # 20 = exactly two epochs
    assert sorted(draws[:10].tolist()) == sorted(draws[10:].tolist()) == list(range(10))


@pytest.mark.parametrize("resume_after", [1, 2, 3])  # mid-epoch, across the first boundary (8 -> 12), later
def test_resume_from_state_dict_is_bitwise_identical(dataset: TokenDataset, resume_after: int) -> None:
    reference = _draw(ResumableSampler(dataset, seed=11), 8)
    interrupted = ResumableSampler(dataset, seed=11)
    _draw(interrupted, resume_after)
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a JSON checkpoint
    resumed = ResumableSampler(dataset, seed=11)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(_draw(resumed, 8 - resume_after), reference[resume_after:]))


def test_load_state_dict_rejects_other_data_or_seed(dataset: TokenDataset) -> None:
    state = ResumableSampler(dataset, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(dataset, seed=2).load_state_dict(state)
    smaller = TokenDataset(np.arange(21), seq_len=4, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"training data differs .* \(the training windows were \d+, now 5\)"):
        ResumableSampler(smaller, seed=1).load_state_dict(state)  # it named the sampler's num_sequences
    edited = TokenDataset(dataset.tokens.copy(), seq_len=dataset.seq_len, val_fraction=0.0)
    edited.tokens[len(edited.tokens) // 2] += 1  # one token changed: as many windows, other data
    with pytest.raises(ValueError, match="training data differs"):
        ResumableSampler(edited, seed=1).load_state_dict(state)
    ResumableSampler(TokenDataset(dataset.tokens.copy(), seq_len=dataset.seq_len, val_fraction=0.0),
                     seed=1).load_state_dict(state)  # the same data, another array: resumes


def test_a_sampler_goes_on_with_changed_data_only_when_asked(dataset: TokenDataset) -> None:
    """After an upgrade that tokenizes a corpus differently (or files added), a resume had no way on but a new run.
    same_data=False (--accept-changed-data) keeps the place in the epoch's order where the windows are as many, or
    starts the next epoch where their number (and so the epoch's order) changed, and says what changed."""
    sampler = ResumableSampler(dataset, seed=1)
    _draw(sampler, 3)
    state = sampler.state_dict()
    edited = TokenDataset(dataset.tokens.copy(), seq_len=dataset.seq_len, val_fraction=0.0)
    edited.tokens[0] += 1
    with pytest.raises(ValueError, match="pass --accept-changed-data"):
        ResumableSampler(edited, seed=1).load_state_dict(state)
    resumed = ResumableSampler(edited, seed=1)
    assert resumed.load_state_dict(state, same_data=False) == "the training windows' tokens differ"
    assert (resumed.epoch, resumed.position) == (state["epoch"], state["position"])
    few = TokenDataset(np.arange(4 * 2 + 1), seq_len=4, val_fraction=0.0)  # 2 windows: the position is past them
    shrunk = ResumableSampler(few, seed=1)
    assert shrunk.load_state_dict(state, same_data=False) == f"the training windows were {len(dataset)}, now 2"
    assert (shrunk.epoch, shrunk.position) == (state["epoch"] + 1, 0)
    grown = ResumableSampler(TokenDataset(np.arange(40 * 4 + 1), seq_len=4, val_fraction=0.0), seed=1)
    assert grown.load_state_dict(state, same_data=False) == f"the training windows were {len(dataset)}, now 40"
    assert (grown.epoch, grown.position) == (state["epoch"] + 1, 0)
    assert ResumableSampler(dataset, seed=1).load_state_dict(state, same_data=False) == ""  # nothing changed
    with pytest.raises(ValueError, match="seed"):  # a setting, not data: still refused
        ResumableSampler(edited, seed=2).load_state_dict(state, same_data=False)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_reassemble_the_global_batch(dataset: TokenDataset, world_size: int) -> None:
    reference = _draw(ResumableSampler(dataset, seed=5), 6, batch=8)
    ranks = [ResumableSampler(dataset, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for step in range(6):
        parts = [sampler.next_batch(8) for sampler in ranks]
        assert all(p.shape == (8 // world_size, 5) for p in parts)
        assert torch.equal(torch.cat(parts), reference[step])


def test_resume_at_another_world_size(dataset: TokenDataset) -> None:
    reference = _draw(ResumableSampler(dataset, seed=9), 4, batch=4)
    single = ResumableSampler(dataset, seed=9)
    _draw(single, 2, batch=4)
    ranks = [ResumableSampler(dataset, seed=9, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.load_state_dict(single.state_dict())
    for step in (2, 3):
        assert torch.equal(torch.cat([s.next_batch(4) for s in ranks]), reference[step])


def test_bad_rank_or_batch_size(dataset: TokenDataset) -> None:
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(dataset, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="multiple of world_size"):
        ResumableSampler(dataset, seed=0, rank=0, world_size=3).next_batch(4)


# ---- validation ----

def test_validation_batches_are_fixed_and_rank_sliced() -> None:
    val = TokenDataset(np.arange(1000, dtype=np.uint16), seq_len=8, split="val", val_fraction=0.2)
    first = list(validation_batches(val, 4))
    assert len(first) == len(val) // 4 and all(b.shape == (4, 9) for b in first)
    assert all(torch.equal(x, y) for x, y in zip(first, validation_batches(val, 4)))
    assert len(list(validation_batches(val, 4, max_batches=2))) == 2
    for step, rank_parts in enumerate(zip(*(validation_batches(val, 4, rank=r, world_size=2) for r in (0, 1)))):
        assert torch.equal(torch.cat(rank_parts), first[step])


def test_a_validation_split_smaller_than_a_batch_is_repeated_to_fill_one() -> None:
    """A 100-row smoke test's default split held fewer windows than one batch, and the run refused to start."""
    val = TokenDataset(np.arange(100), seq_len=8, split="val", val_fraction=0.2)
    assert 0 < len(val) < 8
    [batch] = validation_batches(val, 8)
    assert torch.equal(batch, val.batch(np.arange(8) % len(val)))


# ---- files that are not text ----

@pytest.mark.parametrize("head", [np.arange(600, dtype=np.uint16).tobytes(),  # pre-tokenized ids: NUL bytes
                                  "caf\xe9 latin-1".encode("latin-1")])          # invalid UTF-8
def test_a_file_that_is_not_text_is_refused_naming_it(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "train.bin"
    path.write_bytes(head)
    with pytest.raises(ValueError, match=r"train\.bin is not UTF-8 text.*directory of .*\.jsonl with a 'text'"):
        list(iter_documents(path))
    (tmp_path / "dir").mkdir()
    path.rename(tmp_path / "dir" / "notes.txt")
    with pytest.raises(ValueError, match=r"notes\.txt is not UTF-8 text"):
        list(iter_documents(tmp_path / "dir"))


def test_text_cut_mid_character_at_the_checked_head_is_text(tmp_path: Path) -> None:
    text = "a" * 1023 + "é and more"  # 'é' straddles the first 1024 bytes
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert list(iter_documents(tmp_path / "a.txt")) == [text]


def test_cli_train_refuses_a_binary_corpus(tmp_path: Path) -> None:
    from longcat_flash.cli import main

    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "tiny", "--data", str(tmp_path / "random.bin"), "--out", str(tmp_path / "run"),
              "--no-progress", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert "longcat train:" in str(exc.value.code) and "random.bin is not UTF-8 text" in str(exc.value.code)

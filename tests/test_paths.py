"""Paths as users type them: `~` in a flag's value, a model served through a link, a token cache under an
unusable $XDG_CACHE_HOME, and a `**` glob over a folder that holds a training run."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from longcat_flash.cli.commands import build_parser
from longcat_flash.data import Corpus


@pytest.mark.parametrize("argv, dest", [
    (["train", "--out=~/run"], "out"), (["sft", "--model=~/base"], "model"), (["serve", "--model=~/m"], "model"),
    (["generate", "--model=~/m", "--prompt", "x"], "model"), (["grow", "~/run", "--out=~/grown"], "out"),
    (["train", "--data=~/c"], "data"),
])
def test_a_tilde_after_an_equals_sign_is_the_home_folder(argv, dest):
    """The shell expands `--out ~/run` but not `--out=~/run`, which trained into a folder named `~` here."""
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == os.path.expanduser(f"~/{getattr(args, dest).rpartition('/')[2]}")
    assert not getattr(args, dest).startswith("~")


def test_a_model_served_through_a_link_is_named_as_the_link(tmp_path, monkeypatch):
    """`serve --model latest` (a link to run-7) served the model as `run-7`, and a request naming `latest` was a
    404; vLLM names a model by its --model."""
    pytest.importorskip("fastapi")
    from longcat_flash.serve.server import served_name

    (tmp_path / "run-7").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "run-7", target_is_directory=True)
    assert served_name(tmp_path / "latest") == served_name(f"{tmp_path}/latest/") == "latest"
    monkeypatch.chdir(tmp_path / "run-7")
    assert served_name(".") == "run-7"


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_is_ignored(monkeypatch, xdg):
    """The token cache went into the working directory (`./longcat-flash/tokens`), against the XDG spec."""
    from longcat_flash.train.datasets import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert default_cache_dir() == Path.home() / ".cache" / "longcat-flash" / "tokens"
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    assert default_cache_dir() == Path("/srv/cache/longcat-flash/tokens")


def test_the_kernel_cache_follows_xdg_cache_home_as_the_token_cache_does(monkeypatch):
    """The kernels were built under ~/.cache/longcat_flash whatever $XDG_CACHE_HOME said: with a read-only home
    (a container, a cluster) moving every cache took a second variable, and the two caches spelled the package's
    name two ways."""
    from longcat_flash.infer.extension import kernel_cache

    monkeypatch.delenv("LONGCAT_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    assert kernel_cache() == Path("/srv/cache/longcat-flash/kernels")
    monkeypatch.setenv("LONGCAT_KERNEL_CACHE", "/srv/kernels")
    assert kernel_cache() == Path("/srv/kernels")


def test_the_kernels_build_with_the_installed_ninja_when_the_virtualenv_is_not_activated(monkeypatch, tmp_path):
    """`.venv/bin/longcat` run without activating the environment: torch looks for ninja on PATH only, found none
    and every path fell back to plain PyTorch, though the ninja package (a dependency) sat in the environment."""
    ninja = pytest.importorskip("ninja")
    from longcat_flash.infer.extension import _ninja_on_path

    monkeypatch.setenv("PATH", str(tmp_path))
    _ninja_on_path()
    assert Path(shutil.which("ninja")).parent == Path(ninja.BIN_DIR)


def test_a_recursive_glob_skips_a_training_run_inside_the_folder(tmp_path):
    """`--data 'convs/**/*.jsonl'` read the metrics.jsonl of a run trained with --out convs/run, which the folder
    form `--data convs` skips."""
    (tmp_path / "convs" / "run").mkdir(parents=True)
    (tmp_path / "convs" / "chat.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "convs" / "run" / "train_config.json").write_text("{}")
    (tmp_path / "convs" / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert [p.name for p in Corpus(f"{tmp_path}/convs/**/*.jsonl").files()] == ["chat.jsonl"]
    assert [p.name for p in Corpus(tmp_path / "convs").files()] == ["chat.jsonl"]


def test_resume_with_its_own_directory_spelt_another_way_is_accepted(tmp_path, monkeypatch):
    """`--resume base --out base/` (or ./base, or its absolute path) was refused as another directory."""
    from longcat_flash.cli.commands import main

    monkeypatch.chdir(tmp_path)
    for out in ("base/", "./base", str(tmp_path / "base")):
        with pytest.raises(SystemExit) as refused:
            main(["train", "--resume", "base", "--out", out])
        assert "continues in its own directory" not in str(refused.value), out
    with pytest.raises(SystemExit, match="continues in its own directory; drop --out other"):
        main(["train", "--resume", "base", "--out", "other"])


def test_names_of_up_to_255_bytes_can_be_written(tmp_path):
    """A 250-byte --out (a valid name) failed: its hidden temporary name beside it was over 255 bytes; and a corpus
    named in 232 bytes could not be trained on, its token shard named after it plus a hash and a temporary name."""
    from longcat_flash.data import build_token_shard
    from longcat_flash.files import atomic_write_text
    from longcat_flash.tokenizer import train_tokenizer

    target = tmp_path / ("a" * 245 + ".jsonl")
    atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == [target.name]
    corpus = tmp_path / ("中" * 76 + ".txt")  # 228 bytes
    corpus.write_text("hello world, hello corpus\n" * 20, encoding="utf-8")
    tokenizer = train_tokenizer(["hello world"], vocab_size=300)
    shard = build_token_shard(corpus, tokenizer, tmp_path / "cache", progress=False)
    assert len(shard.name.encode()) < 255 and shard.stat().st_size > 0


def test_init_from_under_the_home_folder_may_be_written_with_a_tilde(tmp_path, monkeypatch):
    """`--set init_from=~/base` was "model directory ~/base does not exist": no shell expands a ~ after the `=`."""
    from longcat_flash.cli.commands import main
    from longcat_flash.train.config import build_config

    monkeypatch.setenv("HOME", str(tmp_path))
    main(["init", "--preset", "tiny", "--out", str(tmp_path / "base")])
    cfg = build_config("sft", ["init_from=~/base"])
    assert cfg.model.num_layers == build_config("tiny", []).model.num_layers


def test_a_file_or_a_broken_link_where_a_folder_goes_is_named(tmp_path):
    """`--set data.cache_dir=<a file>` and an `--out` that is a broken link were a bare "[Errno 17] File exists"."""
    from longcat_flash.data import build_token_shard
    from longcat_flash.files import make_folder
    from longcat_flash.tokenizer import train_tokenizer

    (tmp_path / "a.txt").write_text("hello world\n" * 10)
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"data.cache_dir .*cache is a file, not a folder"):
        build_token_shard(tmp_path / "a.txt", train_tokenizer(["hello"], vocab_size=300), tmp_path / "cache")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match=r"--out .*gone is a broken link, not a folder"):
        make_folder(tmp_path / "gone", "--out")

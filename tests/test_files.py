"""Files are written atomically and with the user's umask: models, training checkpoints, token shards, tokenizers."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from longcat_flash.checkpoint import training, sharded
from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.data import build_token_shard
from longcat_flash.files import atomic_write, atomic_write_text
from longcat_flash.presets import get_preset
from longcat_flash.tokenizer import train_tokenizer


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def assert_umask_modes(root: Path, umask: int, at_least: int) -> None:
    found = modes(root)
    assert len(found) >= at_least, found
    assert found == dict.fromkeys(found, 0o666 & ~umask)


def test_atomic_write_keeps_old_content_on_failure_and_leaves_no_temporary(tmp_path: Path, umask: int):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert_umask_modes(tmp_path, umask, 1)


@pytest.mark.parametrize("max_shard_bytes", [2 * 1024**3, 1 << 20])  # one file; sharded with an index
def test_saved_model_follows_the_umask(tmp_path: Path, umask: int, max_shard_bytes: int):
    torch.manual_seed(0)
    LongcatFlash(get_preset("tiny")).save_pretrained(tmp_path, max_shard_bytes=max_shard_bytes)
    assert_umask_modes(tmp_path, umask, 2)


def test_training_checkpoint_follows_the_umask(tmp_path: Path, umask: int):
    model = torch.nn.Linear(4, 4)
    tmp = training.temporary_dir(tmp_path, 3)
    sharded.save(tmp / "sharded", {"model": dict(model.state_dict())})  # as the trainer does
    path = training.commit(tmp, 3, {"sampler": {"epoch": 0}, "rng": {"state": torch.get_rng_state()}})
    assert (path / "sharded").is_dir()
    assert_umask_modes(path, umask, 4)


def test_token_shard_and_tokenizer_follow_the_umask(tmp_path: Path, umask: int):
    (tmp_path / "corpus.txt").write_text("some text to tokenize\n" * 50)
    tokenizer = train_tokenizer(["some text to tokenize"] * 10, vocab_size=300)
    build_token_shard(tmp_path / "corpus.txt", tokenizer, tmp_path / "cache", progress=False)
    tokenizer.save(tmp_path / "tokenizer")
    assert_umask_modes(tmp_path / "cache", umask, 2)
    assert_umask_modes(tmp_path / "tokenizer", umask, 2)

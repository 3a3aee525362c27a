"""`longcat init`, `generate` and `chat` end to end on a tiny fresh checkpoint."""
from __future__ import annotations

import builtins
import json

import pytest
from infer_support import one_thread  # noqa: F401  (autouse fixture)

from longcat_flash.cli import main
from longcat_flash.config import ModelConfig
from longcat_flash.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    main(["init", "--preset", "tiny", "--out", str(out), "--dtype", "float32"])
    return out


def test_init_writes_a_loadable_checkpoint(checkpoint):
    cfg = ModelConfig.from_json(checkpoint)
    tokenizer = Tokenizer.load(checkpoint)
    assert cfg.vocab_size >= tokenizer.vocab_size and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "tokenizer_config.json").is_file()


def test_generate_plain_json_and_speculative(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "import os", "--max-new-tokens", "7",
            "--ignore-eos"]
    main(args)
    plain = capsys.readouterr().out
    main(args + ["--json"])
    record = json.loads(capsys.readouterr().out)
    assert plain == record["text"] + "\n"
    assert record["completion_tokens"] == 7 and record["prompt_tokens"] == len(
        Tokenizer.load(checkpoint).encode("import os"))
    assert record["total_s"] > 0 and record["finish_reason"] == "length"
    main(args + ["--json", "--speculative", "2", "--quantize", "int8"])
    spec = json.loads(capsys.readouterr().out)
    assert spec["completion_tokens"] == 7 and 0.0 <= spec["acceptance_rate"] <= 1.0


def test_chat_keeps_the_conversation(checkpoint, capsys, monkeypatch):
    lines = iter(["hello", "/reset", "again", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    main(["chat", "--model", str(checkpoint), "--max-new-tokens", "5", "--ignore-eos"])
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2


def test_generate_rejects_a_prompt_beyond_the_context(checkpoint):
    with pytest.raises(SystemExit, match="context"):
        main(["generate", "--model", str(checkpoint), "--prompt", "x " * 2000])

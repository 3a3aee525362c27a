"""`longcat sft` on the command line: errors, an end-to-end run from a `longcat init` checkpoint (loss falls,
metrics.jsonl, a loadable checkpoint), `--resume` bit for bit, and the same run under torchrun at world 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sft_support import write_conversations
from test_distributed import torchrun

from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.cli import main
from longcat_flash.train.metrics import read_metrics

FLAGS = ["--max-steps", "10", "--save-every", "5", "--no-progress", "--set", "data.seq_len=256",
         "--set", "data.batch_size=4", "--set", "data.val_fraction=0.2", "--set", "data.val_batches=2",
         "--set", "dtype=float32", "--set", "eval_every=5", "--set", "optim.lr=3e-3", "--set", "sample_tokens=4",
         "--set", "loss.monitor_every=0", "--set", "sft.ignore_columns=id,source"]


def run_cli(*args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return str(exc.value.code)


def test_sft_needs_a_model_and_data(tmp_path):
    assert "needs --model DIR and --data FILE" in run_cli("sft", "--out", str(tmp_path / "run"))
    assert "no config.json" in run_cli("sft", "--model", str(tmp_path), "--data", "x.jsonl", "--print-config")


def test_print_config_needs_no_data(tmp_path, capsys):
    """`longcat sft --print-config` refused to list the fields without --model and --data; without --model it
    showed the model fields of a preset sft never reads."""
    main(["sft", "--print-config", "--set", "optim.lr=1e-4"])
    printed = capsys.readouterr().out
    assert printed.startswith("# model.*: from the config.json of --model") and "\nmodel." not in printed
    assert "\noptim.lr=0.0001\n" in printed
    model = tmp_path / "model"
    main(["init", "--preset", "tiny", "--out", str(model), "--dtype", "float32"])
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 48  # no preset's
    (model / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    main(["sft", "--model", str(model), "--print-config"])
    assert "\nmodel.hidden_size=48\n" in capsys.readouterr().out


def test_bad_row_is_reported_with_file_line_and_field(tmp_path):
    model = tmp_path / "model"
    main(["init", "--preset", "tiny", "--out", str(model), "--dtype", "float32"])
    data = write_conversations(tmp_path / "chat.jsonl", 4)
    with data.open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n')
    message = run_cli("sft", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"))
    assert message == (f"longcat sft: {data}:5: messages[1].role: 'robot' is not one of "
                       "system/user/assistant/tool/developer/function")
    assert not (tmp_path / "run").exists()  # the refused start left its lock and its tokenizer there


def test_a_resume_keeps_its_held_out_conversations(tmp_path, capsys):
    """--resume with another --val-data went on, its val_loss curve now measured on other conversations (the
    training file itself, even); the same file moved elsewhere is the same held-out set."""
    model = tmp_path / "model"
    main(["init", "--preset", "tiny", "--out", str(model), "--dtype", "float32"])
    data = write_conversations(tmp_path / "chat.jsonl", 24)
    held, other = write_conversations(tmp_path / "val.jsonl", 6), write_conversations(tmp_path / "other.jsonl", 8)
    flags = ["--no-progress", "--save-every", "1", "--set", "data.seq_len=256", "--set", "data.batch_size=2",
             "--set", "data.val_batches=1", "--set", "dtype=float32", "--set", "sample_tokens=0"]
    assert "sft.val_data must be other conversations than sft.data" in run_cli(
        "sft", "--model", str(model), "--data", str(data), "--val-data", str(data), "--out", str(tmp_path / "x"),
        "--max-steps", "1", *flags)
    folder = tmp_path / "chats"
    folder.mkdir()
    for file, name in ((data, "chat.jsonl"), (held, "kept.jsonl")):  # no split word (val.jsonl is refused for that)
        shutil.copy(file, folder / name)
    assert f"sft.val_data: {folder / 'kept.jsonl'} is among the files of sft.data too" in run_cli(
        "sft", "--model", str(model), "--data", str(folder), "--val-data", str(folder / "kept.jsonl"), "--out",
        str(tmp_path / "x"), "--max-steps", "1", *flags)
    os.link(data, tmp_path / "linked.jsonl")  # the training file under another name: its resolved path differs
    assert f"sft.val_data: {tmp_path / 'linked.jsonl'} is among the files of sft.data too" in run_cli(
        "sft", "--model", str(model), "--data", str(data), "--val-data", str(tmp_path / "linked.jsonl"), "--out",
        str(tmp_path / "x"), "--max-steps", "1", *flags)
    run = tmp_path / "run"
    main(["sft", "--model", str(model), "--data", str(data), "--val-data", str(held), "--out", str(run),
          "--max-steps", "1", *flags])
    refusal = run_cli("sft", "--resume", str(run), "--val-data", str(other), "--max-steps", "2")
    assert "a resumed run keeps its held-out data" in refusal and f"sft.val_data: {held} -> {other}" in refusal
    moved = shutil.move(held, tmp_path / "moved.jsonl")
    capsys.readouterr()
    main(["sft", "--resume", str(run), "--val-data", str(moved), "--max-steps", "2", "--no-progress"])
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "longcat_flash.cli", *args], env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lm_loss"], r["mtp_loss"], r["grad_norm"], r.get("val_loss"))
            for r in read_metrics(run)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("sft")
    main(["init", "--preset", "tiny", "--out", str(root / "model"), "--dtype", "float32"])  # in this process
    data = write_conversations(root / "chat.jsonl", 150)
    rows = [json.loads(line) for line in data.read_text().splitlines()]  # as data sets have them, with columns
    data.write_text("".join(json.dumps({"id": i, "source": "test", **r}) + "\n" for i, r in enumerate(rows)))
    done = cli("sft", "--model", str(root / "model"), "--data", str(data), "--out", str(root / "run"), *FLAGS)
    assert "sft train: " in done.stdout and "sft val: " in done.stdout  # the packing report
    return root / "model", data, root / "run"


@pytest.mark.slow
def test_sft_cli_learns_and_writes_a_loadable_checkpoint(sft_run):
    _, _, run = sft_run
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert records[-1]["val_loss"] < records[4]["val_loss"] < records[0]["lm_loss"]
    model = LongcatFlash.from_pretrained(run)
    assert model.config.vocab_size == 512
    assert (run / "sample.txt").read_text().startswith("[Round 0] USER:")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]


@pytest.mark.slow
def test_sft_cli_resume_is_bitwise(sft_run, tmp_path):
    _, _, run = sft_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000010")  # interrupted after the step-5 checkpoint
    main(["sft", "--resume", str(copy), "--no-progress"])  # in this process: only the checkpoint carries state over
    assert losses(copy) == losses(run)


@pytest.mark.slow
def test_sft_under_torchrun_world2_matches_one_process(sft_run, tmp_path):
    model, data, run = sft_run
    # torchrun's -m: run the CLI module on every rank, as a user types it
    torchrun(2, Path("-m"), "longcat_flash.cli", "sft", "--model", str(model), "--data", str(data),
             "--out", str(tmp_path / "w2"), "--device", "cpu", *FLAGS)
    got, want = losses(tmp_path / "w2"), losses(run)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert max(abs(g[1] - w[1]) for g, w in zip(got, want)) <= 1e-4, (got, want)
    assert max(abs(g[5] - w[5]) for g, w in zip(got, want) if w[5] is not None) <= 1e-4
    assert LongcatFlash.from_pretrained(tmp_path / "w2").config.vocab_size == 512
    for key in ("z_loss", "balance_loss", "ffn_experts_per_token"):  # over the conversations' tokens, however the
        pairs = [(g[key], w[key]) for g, w in zip(read_metrics(tmp_path / "w2"), read_metrics(run))]  # padding falls
        assert max(abs(g - w) / abs(w) for g, w in pairs) <= 1e-4, (key, pairs)

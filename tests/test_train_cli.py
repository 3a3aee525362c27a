"""`longcat train` / `longcat grow` on the command line: clear errors, and a real SIGKILL + --resume that
reproduces the uninterrupted run's losses bit for bit."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_support import make_corpus, tiny_config, tiny_overrides

from longcat_flash.checkpoint import training
from longcat_flash.cli import main
from longcat_flash.train.checkpoints import exactness_notice, resume_config, schedule_notice, validation_notice
from longcat_flash.train.config import (ScalingConfig, ScheduleConfig, absolute_paths, apply_overrides, build_config,
                                       recipe)
from longcat_flash.train.metrics import read_metrics
from longcat_flash.train.trainer import train


def run_cli(*args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return str(exc.value.code)


def test_unknown_flag_lists_the_valid_flags(capsys):
    run_cli("train", "--max-step", "3")
    err = capsys.readouterr().err
    assert "unrecognized arguments: --max-step" in err and "--max-steps" in err and "--set KEY=VALUE" in err


def test_an_empty_path_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    """`--data ""` trained on the files of the directory the command ran in."""
    monkeypatch.chdir(tmp_path)
    assert "data.source must be a non-empty path or name, got ''" in run_cli(
        "train", "--preset", "tiny", "--data", "", "--out", "run")
    assert "sft.data must be a non-empty path or name, got ''" in run_cli("sft", "--data", " ", "--print-config")
    assert "data.cache_dir must be a non-empty path" in run_cli("train", "--set", "data.cache_dir=")
    assert list(tmp_path.iterdir()) == []


def test_a_start_refused_before_it_wrote_anything_leaves_no_folder(tmp_path):
    """A corpus folder with no text left --out behind holding only the run's lock; a folder that was there stays."""
    (tmp_path / "empty").mkdir()
    assert "holds no .txt/.md/.py" in run_cli("train", "--preset", "tiny", "--data", str(tmp_path / "empty"),
                                              "--out", str(tmp_path / "run"), "--no-progress")
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    assert "holds no .txt/.md/.py" in run_cli("train", "--preset", "tiny", "--data", str(tmp_path / "empty"),
                                              "--out", str(tmp_path / "mine"), "--no-progress")
    assert (tmp_path / "mine").is_dir()


def test_a_dict_sets_the_fields_it_names_and_clashes_with_their_flags():
    """`--set data={'seq_len': 32}` reset the section's other fields to the class defaults (not the recipe's),
    dropped earlier --set of the section, and escaped the flag-and---set clash check."""
    base = recipe("tiny")
    cfg = build_config("tiny", ["data={'seq_len': 32}", "optim.lr=0.2", "optim={'eps': 0.3}",
                                "model={'num_layers': 3, 'rope_scaling': {'rope_type': 'yarn', 'factor': 2.0, "
                                "'original_max_position_embeddings': 64}}", "data={'source': '123'}"])
    assert cfg.data == dataclasses.replace(base.data, seq_len=32, source="123")  # a string stays a string
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.betas) == (0.2, 0.3, base.optim.betas)
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == base.model.hidden_size
    assert cfg.model.rope_scaling.factor == 2.0
    yarn = "model.rope_scaling={'rope_type': 'yarn', 'factor': 2.0, 'original_max_position_embeddings': 64}"
    plain = build_config("tiny", [yarn, "model.rope_scaling={'rope_type': 'default'}"])
    assert plain.model.rope_scaling == base.model.rope_scaling  # rope_scaling is one value, replaced whole
    for unnamed in (["model.rope_scaling={'rope_type': 'yarn', 'original_max_position_embeddings': 64}"],
                    ["model.rope_scaling.rope_type=yarn", "model.rope_scaling.original_max_position_embeddings=64"]):
        with pytest.raises(ValueError, match=r"model.rope_scaling.factor is required for rope_type='yarn'"):
            build_config("tiny", unnamed)  # it was 1: an extension that extends nothing
    assert build_config("tiny", [yarn, "model.rope_scaling.beta_fast=16"]).model.rope_scaling.factor == 2.0
    assert "--save-every and --set checkpoint={'save_every': 5} both set checkpoint.save_every" in run_cli(
        "train", "--preset", "tiny", "--save-every", "2", "--set", "checkpoint={'save_every': 5}")


def test_unknown_field_lists_the_valid_fields():
    message = run_cli("train", "--set", "budget.rat=0.1")
    assert "unknown config field 'budget.rat'" in message and "budget.rate" in message
    assert "must be float" in run_cli("train", "--set", "optim.lr=fast")
    assert "loss.z_weight must be a finite number, got 'nan'" in run_cli("train", "--set", "loss.z_weight=nan")
    assert "is a section" in run_cli("train", "--set", "optim=1")


def test_a_json_dict_reads_as_the_python_one():
    """A dict copied from a config.json (true, false, null) said "'model.rope_scaling' is a section; set one of
    its fields ... or several as a dict", as did a dict with unquoted names."""
    json_form = ('model.rope_scaling={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64, '
                 '"truncate": false, "mscale": null}')
    python_form = ("model.rope_scaling={'rope_type': 'yarn', 'factor': 4, 'original_max_position_embeddings': 64, "
                   "'truncate': False, 'mscale': None}")
    assert build_config("tiny", [json_form]) == build_config("tiny", [python_form])
    assert build_config("tiny", [json_form]).model.rope_scaling.truncate is False
    for unreadable in ("{rope_type: yarn, factor: 4}", '{"rope_type": "yarn", "factor": NaN}'):  # NaN: not JSON
        message = run_cli("train", "--set", f"model.rope_scaling={unreadable}")
        assert f"model.rope_scaling={unreadable}: not a dict this can read" in message


def test_print_config_shows_overrides(capsys):
    main(["train", "--preset", "tiny", "--max-steps", "7", "--set", "budget.rate=0.01", "--print-config"])
    out = capsys.readouterr().out
    assert "max_steps=7" in out and "budget.rate=0.01" in out and "model.num_layers=2" in out


def test_a_text_field_keeps_the_text_as_typed(tmp_path: Path):
    """A folder named 2024_01 became the path 202401 (text parsed as a Python number, then turned back to text); a
    column named 1e3 became '1000.0'; null on a text field became the text 'None'."""
    (tmp_path / "2024_01").mkdir()
    cfg = build_config("tiny", [f"data.source={tmp_path / '2024_01'}", "data.text_field=1e3", "sample_prompt=0x10"])
    assert (cfg.data.source, cfg.data.text_field, cfg.sample_prompt) == (str(tmp_path / "2024_01"), "1e3", "0x10")
    assert build_config("tiny", ["data.source='2024'"]).data.source == "2024"  # quoted, as before
    cfg = build_config("sft", ["sft.ignore_columns=2024_01,1e3", "sft.data=rows.jsonl"])
    assert cfg.sft.ignore_columns == ("2024_01", "1e3")
    with pytest.raises(ValueError, match="^init_from=2024_01: model directory 2024_01 does not exist"):  # as typed
        build_config("sft", ["sft.data=rows.jsonl", "init_from=2024_01"])
    (tmp_path / "model.json").write_text("{}")  # a model's config.json given for its directory
    with pytest.raises(ValueError, match=f"^init_from={tmp_path / 'model.json'}: .* is a file; a model is a dir"):
        build_config("tiny", [f"init_from={tmp_path / 'model.json'}"])
    assert "data.source must be str, got None" in run_cli("train", "--set", "data.source=null", "--print-config")
    assert "data.source must be str, got 2024" in run_cli("train", "--set", "data={'source': 2024}", "--print-config")


def test_init_from_is_read_as_every_other_set_value(tmp_path: Path, capsys):
    """The model of an init_from run was looked up from the raw text: `init_from=NULL` (None to --set) was read as
    a directory, and a quoted path as one with quotes in its name."""
    import torch

    from longcat_flash.checkpoint.fresh import init_checkpoint
    from longcat_flash.presets import tiny

    main(["train", "--preset", "tiny", "--set", "init_from=NULL", "--print-config"])
    assert "init_from=None" in capsys.readouterr().out
    model = init_checkpoint(tiny().replace(num_layers=3), tmp_path / "model", dtype=torch.float32)
    main(["train", "--preset", "tiny", "--set", f"init_from='{model}'", "--print-config"])
    out = capsys.readouterr().out
    assert f"init_from='{model}'" in out and "model.num_layers=3" in out  # the checkpoint's model, not the recipe's


def test_the_sets_fit_the_recipe_to_an_init_from_model(tmp_path: Path, capsys):
    """The recipe's loss.balance_groups (4) and budget.target (2/3 of moe_topk) were checked against the checkpoint's
    model before the --set that fits them was applied: a model of 6 FFN experts, or one whose top-k is mostly
    zero experts, could not be trained or fine-tuned, though the error named the --set that fixes it."""
    import torch

    from longcat_flash.checkpoint.fresh import init_checkpoint
    from longcat_flash.presets import tiny

    six = init_checkpoint(tiny().replace(n_routed_experts=6), tmp_path / "six", dtype=torch.float32)
    with pytest.raises(ValueError, match="loss.balance_groups must be a divisor of model.n_routed_experts=6, got 4"):
        build_config("tiny", [f"init_from={six}"])  # the recipe's own value is still checked
    main(["train", "--preset", "tiny", "--set", f"init_from={six}", "--set", "loss.balance_groups=2",
          "--print-config"])
    out = capsys.readouterr().out
    assert "model.n_routed_experts=6" in out and "loss.balance_groups=2" in out
    with pytest.raises(ValueError, match="model.rope_scaling.factor is required"):  # the checks of a --set still hold
        build_config("tiny", [f"init_from={six}", "loss.balance_groups=2", "model.rope_scaling.rope_type=yarn",
                              "model.rope_scaling.original_max_position_embeddings=256"])
    mostly_zero = init_checkpoint(tiny().replace(n_routed_experts=8, moe_topk=11, zero_expert_num=3),
                                  tmp_path / "mostly_zero", dtype=torch.float32)
    with pytest.raises(ValueError, match="set budget.target >= 8"):
        build_config("tiny", [f"init_from={mostly_zero}"])
    assert build_config("tiny", [f"init_from={mostly_zero}", "budget.target=8"]).budget.target == 8


def test_init_from_a_run_resumed_and_stopped_before_its_end_is_refused(tmp_path: Path):
    """Its model files were the earlier finish's (step 2) while its newest checkpoint was at step 3: an extension
    run from it trained the older weights, without a word."""
    from train_support import tiny_config

    from longcat_flash.train.trainer import setup, train

    run = tmp_path / "run"
    cfg = tiny_config(make_corpus(tmp_path / "corpus"), tmp_path / "cache", "max_steps=2", "eval_every=0",
                      "sample_tokens=1")
    train(cfg, run, progress=False)
    assert build_config("tiny", [f"init_from={run}"]).init_from == str(run)  # finished: its model is its newest
    resumed = resume_config(run)
    setup(dataclasses.replace(resumed, max_steps=4), run, resume=True, progress=False)  # a resume to step 4 ...
    shutil.copytree(training.latest_checkpoint(run / "checkpoints"), run / "checkpoints" / "step_00000003")
    with pytest.raises(ValueError, match=r"the run there has not finished \(its newest checkpoint is at step 3 of 4\)"):
        build_config("tiny", [f"init_from={run}"])  # ... killed after its checkpoint at step 3
    recorded = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**recorded, "max_steps": None}))  # edited: not a run's
    assert build_config("tiny", [f"init_from={run}"]).init_from == str(run)  # a TypeError traceback before
    config = json.loads((run / "config.json").read_text())  # training has no attention dropout: said, not dropped
    (run / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    with pytest.raises(ValueError, match=r"config.json asks for attention_dropout=0.1, which training here does not"):
        build_config("tiny", [f"init_from={run}"])
    (run / "config.json").write_text(json.dumps(config))


def test_a_list_field_takes_comma_separated_names_or_a_list(capsys):
    for value in ("id,source", "['id', 'source']", " id , source ", "[id,source]", "(id, source)"):
        main(["sft", "--print-config", "--set", f"sft.ignore_columns={value}"])
        assert "sft.ignore_columns=('id', 'source')" in capsys.readouterr().out
    for value in ("3", "[3]", "['3']", "[\"3\", ]"):  # a name, as pandas names unnamed columns (was refused)
        main(["sft", "--print-config", "--set", f"sft.ignore_columns={value}"])
        assert "sft.ignore_columns=('3',)" in capsys.readouterr().out
    main(["sft", "--print-config", "--set", "sft.ignore_columns=['id', 1]"])  # no quotes kept inside a name
    assert "sft.ignore_columns=('id', '1')" in capsys.readouterr().out


@pytest.mark.parametrize("order", [1, -1])
def test_fields_checked_against_each_other_can_be_set_in_any_order(capsys, order):
    """--set applies all assignments before the checks that relate two fields, so neither order is refused."""
    sets = ["model.num_nextn_predict_layers=0", "loss.mtp_weight=0", "data.grad_accum=4", "data.batch_size=4",
            "optim.lr=0.1", "optim.lr=0.02"][::order]
    main(["train", "--preset", "tiny", "--print-config", *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr().out
    assert all(f in out for f in ("model.num_nextn_predict_layers=0", "loss.mtp_weight=0.0", "data.grad_accum=4",
                                  "data.batch_size=4"))
    assert f"optim.lr={0.02 if order == 1 else 0.1}" in out  # the later assignment wins
    assert "multiple of data.grad_accum=3" in run_cli("train", "--set", "data.grad_accum=3")  # still checked


def test_resume_without_checkpoint_or_with_a_corrupt_one_is_clear(tmp_path: Path):
    assert "no checkpoint found" in run_cli("train", "--resume", str(tmp_path))
    root = tmp_path / "run" / "checkpoints"
    path = training.save(root, 5, {"model": native_box()}, meta={"train_config": {}})
    (path / "model.safetensors").write_bytes(b"garbage")
    assert "corrupt" in run_cli("train", "--resume", str(tmp_path / "run"))
    assert f"no earlier checkpoint: move step_00000005 out of {root}, to a place outside the run, and start the " \
           "run again" in run_cli("train", "--resume", str(tmp_path / "run"))
    path.rename(tmp_path / "run" / path.name)  # moved out of checkpoints/ into the run: it read as a checkpoints
    assert run_cli("train", "--resume", str(tmp_path / "run")) == (  # folder, "resume run" the way out
        f"longcat train: {tmp_path / 'run'} holds the checkpoint step_00000005 beside its checkpoints folder: move "
        "step_00000005 to a place outside the run directory")


def test_resume_refuses_a_checkpoint_or_the_checkpoints_folder_in_place_of_the_run(tmp_path: Path):
    """Given a step directory (the natural try after a corrupt newest checkpoint), the run went on inside it: its
    metrics, weights and a nested checkpoints/ written there, the run itself untouched."""
    root = tmp_path / "run" / "checkpoints"
    path = training.save(root, 5, {"model": native_box()}, meta={"train_config": {}})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for given, what in ((path, "a checkpoint"), (root, "the checkpoints folder")):
        assert run_cli("train", "--resume", str(given)) == (
            f"longcat train: {given} is {what} of the run in {tmp_path / 'run'}, not a run directory: resume "
            f"{tmp_path / 'run'}, which continues from its newest checkpoint (to go back to an earlier one, first "
            f"move the later ones out of {root})")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_bad_layouts_and_outputs_are_one_line_errors(tmp_path: Path, capsys):
    (tmp_path / "file").write_text("x")
    assert "--out" in run_cli("train", "--preset", "tiny", "--out", str(tmp_path / "file")) and "is a file" in \
        run_cli("train", "--preset", "tiny", "--out", str(tmp_path / "file"))
    assert "--ep and --dp must be at least 1" in run_cli("train", "--preset", "tiny", "--ep", "0")
    assert "--dp 2 must divide the world size 1" in run_cli("train", "--preset", "tiny", "--dp", "2")
    assert "--dp 2 --ep 3: dp * ep must equal the world size 1" in run_cli("train", "--preset", "tiny", "--dp", "2",
                                                                           "--ep", "3")
    assert "longcat sft --model DIR --data FILE" in run_cli("train", "--preset", "sft")  # not a pre-training recipe
    assert "is a directory" in run_cli("data", "tools", "--out", str(tmp_path), "--n", "2")
    assert run_cli("serve", "--model", str(tmp_path), "--port", "99999") == "2"  # a usage error, not another port
    assert "a TCP port is 0..65535, got 99999" in capsys.readouterr().err
    assert run_cli("serve", "--model", str(tmp_path), "--port", "abc") == "2"
    assert "argument --port: not an integer: 'abc'" in capsys.readouterr().err  # "invalid _port value"
    assert "seq_len must be >= 2 while the MTP head trains" in run_cli("train", "--preset", "tiny", "--set",
                                                                        "data.seq_len=1")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")  # a model or a run lives here: init must not overwrite it
    assert "not an empty directory" in run_cli("init", "--preset", "tiny", "--out", str(tmp_path / "run"))
    assert (tmp_path / "run" / "config.json").read_text() == "{}"


def test_a_run_directory_on_a_read_only_disk_is_one_line(tmp_path: Path, monkeypatch, capsys):
    """EROFS is a plain OSError, none of the subclasses the CLI turned into one line: a traceback (root ignores
    file modes, so the read-only mount is stood in for where the run takes its lock)."""
    import errno
    import os

    from longcat_flash.data.dataset_folders import RUN_LOCK_FILE
    from longcat_flash.train import run_lock

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(RUN_LOCK_FILE):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_lock.os, "open", read_only)
    message = run_cli("train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "1")
    assert message.startswith("longcat train: [Errno 30] Read-only file system:") and ".lock" in message
    assert "Traceback" not in capsys.readouterr().err


def test_a_device_error_under_torchrun_names_its_rank(monkeypatch, capsys):
    """Every rank prints a device error (devices are a node's own), and the lines said nothing of which rank."""
    monkeypatch.setenv("RANK", "3")
    assert run_cli("train", "--preset", "tiny", "--device", "meta") == "2"
    assert capsys.readouterr().err.startswith("longcat train (rank 3): --device meta: not a device")


def test_under_torchrun_settings_are_printed_by_rank_zero_alone(tmp_path: Path, monkeypatch, capsys):
    """Every rank printed --print-config's hundred lines, interleaved, and a missing --model (an OSError) once per
    rank (now once per node, by its first rank)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    main(["train", "--preset", "tiny", "--print-config"])
    assert capsys.readouterr().out == ""
    assert run_cli("sft", "--model", str(tmp_path / "nope"), "--data", "x.jsonl", "--out", str(tmp_path / "o")) == "1"
    monkeypatch.setenv("RANK", "0")
    assert f"--model {tmp_path / 'nope'}: model directory {tmp_path / 'nope'} does not exist" in run_cli(
        "sft", "--model", str(tmp_path / "nope"), "--data", "x.jsonl", "--print-config")
    main(["train", "--preset", "tiny", "--print-config"])
    assert "data.seq_len=" in capsys.readouterr().out


def test_one_process_commands_refuse_torchrun(tmp_path: Path, monkeypatch):
    """`torchrun ... longcat grow` had every rank grow into the same --out; one failed, the launcher exited 1."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert "longcat grow: runs in one process; start it without torchrun" in run_cli(
        "grow", str(tmp_path), "--out", str(tmp_path / "grown"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_cli("init", "--preset", "tiny", "--out", str(tmp_path / "init")) == "1"  # rank 0 says why
    assert not (tmp_path / "grown").exists() and not (tmp_path / "init").exists()


def test_the_first_rank_of_each_node_says_why_it_stopped(tmp_path: Path, monkeypatch):
    """A ValueError on a rank other than 0 left quietly: a node whose files differ from rank 0's (a relative --resume
    folder, resolved from another working directory) stopped, and its terminal said nothing. As torchrun starts the
    first rank of a second node, then the second rank of that node."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    for rank, local_rank, says in (("2", "0", True), ("3", "1", False)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        said = run_cli("generate", "--model", str(tmp_path), "--prompt", "x")
        line = f"longcat generate (rank {rank}): runs in one process; start it without torchrun"
        assert (said.startswith(line) if says else said == "1"), said


def test_a_run_into_the_folder_of_its_data_is_refused(tmp_path: Path, monkeypatch):
    """It trained once, then marked the folder a run's directory: every later run, and its resume, found no data."""
    corpus = make_corpus(tmp_path / "corpus")
    assert "is the folder of the data the run trains on" in run_cli(
        "train", "--preset", "tiny", "--data", str(corpus), "--out", str(corpus))
    monkeypatch.setenv("HOME", str(tmp_path))  # `--set data.source=~/corpus`: the shell expands only --out's ~
    assert "is the folder of the data the run trains on" in run_cli(
        "train", "--preset", "tiny", "--set", "data.source=~/corpus", "--out", str(corpus))
    assert not (corpus / "train_config.json").exists() and not (corpus / ".lock").exists()
    main(["init", "--preset", "tiny", "--out", str(tmp_path / "base")])
    rows = tmp_path / "rows"
    rows.mkdir()
    assert "is the folder of the data the run trains on" in run_cli(
        "sft", "--model", str(tmp_path / "base"), "--data", str(rows), "--out", str(rows))
    assert "is the folder of the data the run trains on" in run_cli(
        "sft", "--model", str(tmp_path / "base"), "--data", str(corpus), "--val-data", str(rows), "--out", str(rows))


def test_a_run_never_overwrites_a_model_it_did_not_write(tmp_path: Path):
    model = tmp_path / "model"
    main(["init", "--preset", "tiny", "--out", str(model)])
    before = (model / "model.safetensors").read_bytes()
    assert "is the model the run starts from" in run_cli("train", "--preset", "tiny", "--out", str(model), "--set",
                                                        f"init_from={model}")
    assert "already holds a model" in run_cli("train", "--preset", "tiny", "--out", str(model))
    assert (model / "model.safetensors").read_bytes() == before
    (model / "model.safetensors").unlink()  # its config.json and tokenizer stay, and were overwritten
    assert "holds config.json and tokenizer.json and tokenizer_config.json, which a run would overwrite" in run_cli(
        "train", "--preset", "tiny", "--out", str(model))
    failed = tmp_path / "failed"  # what a run that failed on its data leaves: it is started again in place
    failed.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", ".lock"):
        (failed / name).write_bytes((model / name).read_bytes() if name != ".lock" else b"")
    (failed / "train.log").write_text("the run's own output, as `tee` writes it: no data\n")
    main(["train", "--preset", "tiny", "--out", str(failed), "--max-steps", "1", "--no-progress",
          "--set", f"data.source={make_corpus(tmp_path / 'corpus')}", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert (failed / "config.json").is_file()
    for name in ("metrics.jsonl", "sample.txt", "train_config.json"):  # a user's own files, in no run's directory
        mine = tmp_path / f"mine_{name}"
        mine.mkdir()
        (mine / name).write_text("mine")
        assert f"holds {name}, which a run would overwrite" in run_cli("train", "--preset", "tiny", "--out", str(mine))
        assert (mine / name).read_text() == "mine"
    notes = tmp_path / "notes"  # a folder of the user's: once a run's, a corpus above it would no longer read it
    (notes / "drafts").mkdir(parents=True)
    (notes / "drafts" / "b.md").write_text("mine")
    (notes / "a.txt").write_text("mine")
    assert "notes holds a.txt, drafts/b.md, data no run wrote, which a corpus above it would no longer read" in (
        run_cli("train", "--preset", "tiny", "--out", str(notes)))
    assert sorted(p.name for p in notes.iterdir()) == ["a.txt", "drafts"]  # not even a lock


def test_a_resumed_run_keeps_its_model_and_the_preset_is_not_a_field(tmp_path: Path):
    from longcat_flash.train.config import recipe
    training.save(tmp_path / "run" / "checkpoints", 5, {"model": native_box()},
                  meta={"train_config": recipe("tiny").to_dict()})
    message = run_cli("train", "--resume", str(tmp_path / "run"), "--set", "model.num_layers=4")
    assert "a resumed run keeps its model" in message and "model.num_layers" in message and "longcat grow" in message
    message = run_cli("train", "--resume", str(tmp_path / "run"), "--set", "model.rope_theta=1e4")
    assert "changes model.rope_theta: start a new run from this one's checkpoint" in message
    assert "longcat sft --model RUN" in message and "grow" not in message  # growing changes depth, not RoPE
    message = run_cli("train", "--resume", str(tmp_path / "run"), "--set", "scaling.variance_alignment=off")
    assert "a resumed run keeps its model" in message and "model.mla_scale_q_lora" in message  # was accepted
    message = run_cli("train", "--resume", str(tmp_path / "run"), "--set", "data.seq_len=32")
    assert "data.seq_len=32 differs from the run's" in message  # was the sampler's "num_sequences=... but ..."
    message = run_cli("train", "--resume", str(tmp_path / "run"), "--set", f"init_from={tmp_path}")
    assert "a resumed run continues from its own checkpoint: init_from=" in message  # was recorded, not read
    assert "--set preset=... would only rename the run" in run_cli("train", "--preset", "tiny", "--set",
                                                                   "preset=small")


def test_a_resumed_run_keeps_its_initialisation_and_gets_no_controller_it_never_had(tmp_path: Path):
    """scaling.init_std was recorded and never read; proxy_width halved two groups' LRs without a word; the budget
    controller turned on failed once everything was built, naming no field ("... has no state for 'controller'")."""
    saved = apply_overrides(recipe("tiny"), ["budget.enabled=false"])
    training.save(tmp_path / "run" / "checkpoints", 5, {"model": native_box()}, meta={"train_config": saved.to_dict()})
    for override in ("scaling.init_std=0.5", "scaling.proxy_width=32"):
        message = run_cli("train", "--resume", str(tmp_path / "run"), "--set", override)
        assert ("a resumed run keeps its initialisation and width transfer, but the config changes "
                f"{override.split('=')[0]}") in message
    message = run_cli("train", "--resume", str(tmp_path / "run"), "--set", "budget.enabled=true")
    assert "a resumed run cannot turn the budget controller on: budget.enabled=true" in message
    message = run_cli("train", "--resume", str(tmp_path / "run"), "--set", "scaling.variance_alignment=on")
    assert "a resumed run keeps its model, but scaling.variance_alignment=on changes model." in message  # not grow


def test_the_schedule_note_compares_with_the_runs_own_schedule_at_the_same_step(tmp_path: Path):
    """Warmup's own climb was reported as the change's jump: a run stopped at step 2 of 4 in a 5-step warmup,
    resumed to 5 steps (warmup ignores the length), said "the LR goes from 0.0008 (step 2) to 0.0012 (step 3)"."""
    saved = apply_overrides(recipe("tiny"), ["max_steps=4", "schedule.warmup_steps=5", "optim.lr=0.002"])
    training.save(tmp_path / "run" / "checkpoints", 2, {"model": native_box()},
                  meta={"train_config": saved.to_dict(), "step": 2})
    assert schedule_notice(tmp_path / "run", apply_overrides(saved, ["max_steps=5"])) is None
    assert schedule_notice(tmp_path / "run", apply_overrides(saved, ["schedule.kind=wsd"])) is None
    assert schedule_notice(tmp_path / "run", apply_overrides(saved, ["optim.lr=0.004"])) == (
        "note: optim.lr 0.002 -> 0.004 reshapes the cosine LR schedule: step 3 runs at LR 0.0024, where the run's "
        "schedule had 0.0012")
    for kind in ("constant", "cosine"):  # a finished run made longer while still in its warmup: no reshape
        finished = apply_overrides(saved, ["max_steps=2", f"schedule.kind={kind}"])
        training.save(tmp_path / kind / "checkpoints", 2, {"model": native_box()},
                      meta={"train_config": finished.to_dict(), "step": 2})
        assert schedule_notice(tmp_path / kind, apply_overrides(finished, ["max_steps=3"])) is None, kind
    decayed = apply_overrides(saved, ["max_steps=2", "schedule.warmup_steps=0"])  # a cosine ended at its minimum
    training.save(tmp_path / "decayed" / "checkpoints", 2, {"model": native_box()},
                  meta={"train_config": decayed.to_dict(), "step": 2})
    assert "the LR goes from" in schedule_notice(tmp_path / "decayed", apply_overrides(decayed, ["max_steps=8"]))


def test_variance_alignment_shows_in_the_config_and_refuses_a_contradicting_model_value(capsys):
    """scaling.variance_alignment was applied at training time, after --set: --set model.routed_scaling_factor=3
    beside variance_alignment=off printed 3.0 in --print-config and trained (and saved) 1.0."""
    main(["train", "--preset", "tiny", "--print-config", "--set", "scaling.variance_alignment=off"])
    printed = capsys.readouterr().out
    assert "model.routed_scaling_factor=1.0\n" in printed and "model.mla_scale_q_lora=False\n" in printed
    assert recipe("tiny").model.mla_scale_q_lora  # so "off" changed them
    message = run_cli("train", "--preset", "tiny", "--print-config", "--set", "scaling.variance_alignment=off",
                      "--set", "model.routed_scaling_factor=3.0")
    assert "scaling.variance_alignment=off sets model.mla_scale_q_lora" in message
    assert "--set model.routed_scaling_factor contradicts or repeats it" in message
    aligned = dataclasses.replace(recipe("tiny"), scaling=ScalingConfig(variance_alignment="on"))
    with pytest.raises(ValueError, match="scaling.variance_alignment=on sets"):  # a resumed run's, not --set
        build_config(None, ["model.mla_scale_kv_lora=false"], aligned)


def test_a_budget_no_token_can_meet_is_refused(capsys):
    """With fewer zero experts than top-k less K_e, every token picks more FFN experts than the budget: the
    controller's biases fell without end and `info` printed an active count no token has."""
    message = run_cli("train", "--preset", "tiny", "--print-config", "--set", "model.zero_expert_num=1",
                      "--set", "model.moe_topk=4")
    assert "K_e=2.66667 FFN experts per token (the default, 2/3 of moe_topk) cannot be reached" in message
    assert "moe_topk - model.zero_expert_num = 3" in message
    main(["train", "--preset", "tiny", "--print-config", "--set", "model.zero_expert_num=1", "--set",
          "model.moe_topk=4", "--set", "budget.target=3.5"])
    assert "budget.target=3.5" in capsys.readouterr().out


def test_an_unknown_preset_lists_the_ones_train_takes():
    """The list named `sft`, which `longcat train --preset sft` then refused."""
    assert run_cli("train", "--preset", "nope") == ("longcat train: --preset nope: no such recipe; choose one of "
                                                     "tiny, small, bench")


def test_a_run_that_never_trains_the_mtp_head_says_so(tmp_path: Path, capsys):
    """With loss.mtp_weight=0 the head kept its random weights, was saved with the model, and speculative decoding
    drafted from it (acceptance 0) with no word anywhere."""
    make_corpus(tmp_path / "corpus")
    main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress",
          "--set", "loss.mtp_weight=0", *[a for o in tiny_overrides(tmp_path / "corpus", tmp_path / "cache")
                                          for a in ("--set", o)]])
    assert "note: the MTP head does not train in this run (loss.mtp_weight=0)" in capsys.readouterr().out


def test_a_metrics_file_cut_short_by_a_kill_reads_up_to_its_last_whole_line(tmp_path: Path):
    lines = ['{"step": 1, "loss": 7.0}', '{"step": 2, "loss": 6.5}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(tmp_path)


def native_box():
    import torch
    return torch.nn.Linear(1, 1)


def _rank_env(rank: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank `rank` of a world of two meeting at 127.0.0.1:`port`."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def test_a_rank_whose_partner_never_starts_stops_after_dist_timeout_with_one_line(tmp_path: Path):
    """One rank of two started (a mistyped --nproc-per-node, a node that never came): it waited 10 minutes without
    a word, then printed torch's traceback; a rank other than 0 waits for rank 0's store the same way."""
    from longcat_flash.serve.launch import free_port

    runs = [subprocess.Popen([sys.executable, "-m", "longcat_flash.cli", "train", "--preset", "tiny", "--out",
                              str(tmp_path / f"rank{rank}"), "--dist-timeout", "2"], env=_rank_env(rank, free_port()),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for rank, run in enumerate(runs):
        _, err = run.communicate(timeout=120)
        last = err.strip().splitlines()[-1]
        assert run.returncode == 1 and "Traceback" not in err, err[-3000:]
        assert last.startswith(f"longcat train{f' (rank {rank})' if rank else ''}: the 2 ranks did not all meet at "
                               "127.0.0.1:") and "within 2 s" in last and last.endswith("--dist-timeout"), last


RANK_ZERO_FIRST = """
import time
from longcat_flash import distributed
distributed.init("cpu", timeout_s=1)
with distributed.main_first():
    if distributed.is_main():
        time.sleep(4)  # training the tokenizer, tokenizing the corpus
print("rank", distributed.rank(), "went on")
distributed.teardown()
"""


def test_the_other_ranks_wait_for_rank_zeros_tokenization_past_dist_timeout():
    """They waited in a collective bound by --dist-timeout: the first start on a corpus of ~1 GB or more (10 minutes
    of tokenizing) died with "lost contact with the other ranks", and so did every retry."""
    from longcat_flash.serve.launch import free_port

    port = free_port()
    runs = [subprocess.Popen([sys.executable, "-c", RANK_ZERO_FIRST], env=_rank_env(rank, port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outs[1][1][-3000:]
    assert [out.strip() for out, _ in outs] == ["rank 0 went on", "rank 1 went on"]


def test_under_torchrun_a_tied_model_is_refused_before_its_tokenizer_and_rank_zero_alone_warns(tmp_path: Path):
    """FSDP cannot shard a tied head: refused only after the tokenizer and the data were built (24 s on 30 MB of
    text), without saying how to untie it; and every rank printed the loader's warnings (four times at world 4)."""
    from sft_support import write_conversations

    from longcat_flash.serve.launch import free_port

    main(["init", "--preset", "tiny", "--out", str(tmp_path / "model"), "--dtype", "float32"])
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps(  # SGLang's spelling of the layer count: a warning
        {**config, "tie_word_embeddings": True, "num_hidden_layers": config["num_layers"]}))
    command = [sys.executable, "-m", "longcat_flash.cli", "sft", "--model", str(tmp_path / "model"), "--data",
               str(write_conversations(tmp_path / "chat.jsonl", 4)), "--out", str(tmp_path / "run"), "--no-progress"]
    port = free_port()
    runs = [subprocess.Popen(command, env=_rank_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for rank in (0, 1)]
    errs = [run.communicate(timeout=120)[1] for run in runs]
    assert [run.returncode for run in runs] == [1, 1] and "Traceback" not in errs[0], errs[0][-3000:]
    last = errs[0].strip().splitlines()[-1]
    assert last.startswith("longcat sft: model.tie_word_embeddings is not supported with more than one process")
    assert "--set model.tie_word_embeddings=false" in last and not (tmp_path / "run" / "tokenizer.json").exists()
    assert "as many as num_layers" in errs[0] and errs[1] == ""


@pytest.mark.slow
def test_a_rank_that_loses_the_other_says_so_in_one_line(tmp_path: Path):
    """Rank 1 killed mid-run (the OOM killer, a lost node): rank 0 printed a 58-line gloo traceback."""
    from longcat_flash.serve.launch import free_port

    corpus, cache, port = make_corpus(tmp_path / "corpus"), tmp_path / "cache", free_port()
    command = _train_cmd(tmp_path / "run", corpus, cache, "--max-steps", "500", "--ep", "2")
    survivor = subprocess.Popen(command, env=_rank_env(0, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    victim = subprocess.Popen(command, env=_rank_env(1, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.kill()
    victim.wait()
    _, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("longcat train (rank 0): lost contact with the other ranks ("), err


@pytest.mark.parametrize("override, says", [
    ("model.moe_topk=20", "model.moe_topk=20 exceeds n_routed_experts"),  # was ModelConfig.moe_topk
    ("model.rope_scaling={'rope_type': 'yarn', 'factor': 4}", "model.rope_scaling.original_max_position_embeddings "
                                                              "must be a positive integer"),
    ("optim.lr=1e400", "optim.lr must be a finite number, got inf"),  # was "must be > 0, got inf"
    ("model.vocab_size=100", "model.vocab_size must be >= 261 when the run trains its tokenizer"),  # after the corpus
    ("seed=99999999999999999999999", "seed must be in [0, 2^63)"),  # torch's "Overflow when unpacking long long"
])
def test_a_refused_override_is_named_as_set_names_it(override, says):
    refusal = run_cli("train", "--preset", "tiny", "--set", override, "--print-config")
    assert refusal.startswith(f"longcat train: {says}"), refusal


def test_only_a_lost_peer_reads_as_one():
    """A bug's failed check inside gloo (a size mismatch) read as "lost contact" and lost its traceback, and an
    error of only a [file:line] prefix raised IndexError inside the handler."""
    from longcat_flash.distributed.env import peer_lost

    reset = "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:63699: Connection reset by peer. This is"
    assert peer_lost(RuntimeError(reset)) == "Read error [127.0.0.1]:63699: Connection reset by peer"
    assert peer_lost(RuntimeError("[x.cc:1] Timed out waiting 600 s for recv")) == "Timed out waiting 600 s for recv"
    assert peer_lost(RuntimeError("[../gloo/transport/tcp/pair.cc:446] op.preamble.length <= op.nbytes. 8 vs 4")) == ""
    assert peer_lost(RuntimeError("[x.cc:1] timeout")) == "timeout" and peer_lost(RuntimeError("a bug")) == ""


def test_a_resume_that_names_its_tokenizer_again_goes_on(tmp_path: Path, monkeypatch):
    """The saved config holds the tokenizer's absolute path; the same file named relatively was refused."""
    monkeypatch.chdir(tmp_path)
    saved = apply_overrides(recipe("tiny"), [f"data.tokenizer={tmp_path / 'tok.json'}"])
    assert build_config(None, ["data.tokenizer=tok.json"], saved).data.tokenizer == "tok.json"
    with pytest.raises(ValueError, match="keeps its tokenizer"):
        build_config(None, ["data.tokenizer=other.json"], saved)


def test_no_overlap_without_expert_parallelism_is_refused():
    """It was taken and ignored in one process (and with --ep 1 under torchrun): there is no all-to-all."""
    assert run_cli("train", "--preset", "tiny", "--no-overlap") == (
        "longcat train: --no-overlap: only expert parallelism (--ep > 1 under torchrun) has all-to-alls to overlap; "
        "drop the flag")


def test_flags_only_a_torchrun_launch_uses_are_refused_in_one_process(monkeypatch, capsys):
    """--dist-timeout was taken and ignored in one process. A usage error under torchrun is printed by rank 0
    alone (each rank printed the usage and the error)."""
    assert run_cli("train", "--preset", "tiny", "--dist-timeout", "5") == (
        "longcat train: --dist-timeout: only a torchrun launch has other ranks to wait for; drop the flag")
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        assert run_cli("train", "--preset", "tiny", "--dist-timeout", "0") == "2"
        err = capsys.readouterr().err
        assert ("argument --dist-timeout: must be > 0, got 0" in err) == printed, err
        assert run_cli("train", "--help") == "0"
        assert ("--dist-timeout SECONDS" in capsys.readouterr().out) == printed


LONG_STEPS, SAVE_EVERY = 16, 8  # runs killed after the step-8 checkpoint: router monitors (7, 14) on both sides


def _train_cmd(out: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    sets = [a for o in tiny_overrides(corpus, cache, "loss.monitor_every=7") for a in ("--set", o)]
    return [sys.executable, "-m", "longcat_flash.cli", "train", "--preset", "tiny", "--out", str(out),
            "--max-steps", str(LONG_STEPS), "--save-every", str(SAVE_EVERY), "--no-progress", *sets, *extra]


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_identical(tmp_path: Path):
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    main(_train_cmd(tmp_path / "full", corpus, cache)[3:])  # the same command in this process: ~5 s of imports less

    victim = subprocess.Popen(_train_cmd(tmp_path / "killed", corpus, cache), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / f"step_{SAVE_EVERY:08d}" / training.MANIFEST
    deadline = time.monotonic() + 120
    while not first.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = training.latest_checkpoint(tmp_path / "killed" / "checkpoints").name
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    done = subprocess.run([sys.executable, "-m", "longcat_flash.cli", "train", "--resume",
                           str(tmp_path / "killed"), "--no-progress"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    def losses(run: str) -> list[tuple]:
        return [(r["step"], r["loss"], r["lm_loss"], r["grad_norm"], r.get("val_loss"), r.get("router_grad_ratio"))
                for r in read_metrics(tmp_path / run)]

    assert losses("killed") == losses("full"), f"diverged after resuming from {killed_at}"
    assert len(losses("full")) == LONG_STEPS
    behind = run_cli("train", "--resume", str(tmp_path / "killed"), "--max-steps", "12", "--no-progress")
    assert f"checkpoint is at step {LONG_STEPS}, past max_steps=12" in behind  # sys.exit(message): status 1
    assert len(losses("killed")) == LONG_STEPS  # its metrics untouched


def test_a_flag_and_a_set_for_the_same_field_are_refused():
    """`--max-steps 20 --set max_steps=10` ran 10 steps, `--data X --set data.source=Y` read Y: one was ignored."""
    assert "--max-steps and --set max_steps=10 both set max_steps" in run_cli(
        "train", "--preset", "tiny", "--max-steps", "20", "--set", "max_steps=10")
    assert "--data and --set sft.data=y.jsonl both set sft.data" in run_cli(
        "sft", "--model", "m", "--data", "x.jsonl", "--set", "sft.data=y.jsonl")


def test_a_run_with_relative_paths_resumes_from_anywhere_with_the_right_command(tmp_path, monkeypatch, capsys):
    """train_config.json kept `--data corpus` as typed, so `--resume` from another directory could not find it;
    `longcat sft --resume` of a pre-training run continued it as one; a longer --max-steps reshapes the LR schedule
    without a word. A resume reads each checkpoint file through once (reading its settings hashed the whole
    checkpoint twice more before the load verified it)."""
    make_corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    main(["train", "--preset", "tiny", "--data", "corpus", "--out", "run", "--max-steps", "2", "--no-progress",
          "--set", "data.cache_dir=cache"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert "is a `longcat train` run: continue it with longcat train --resume" in run_cli(
        "sft", "--resume", str(tmp_path / "run"))
    capsys.readouterr()
    hashed = []
    monkeypatch.setattr(training, "_sha256", lambda path, sha256=training._sha256: hashed.append(path) or sha256(path))
    main(["train", "--resume", str(tmp_path / "run"), "--max-steps", "3", "--no-progress"])
    out = capsys.readouterr().out
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    read = sorted(path for path in hashed if checkpoint in path.parents)  # the others: the step-3 checkpoint's write
    assert read == sorted(checkpoint / e["file"] for e in training.read_manifest(checkpoint)["files"].values())
    assert "reshapes" not in out and "done: 3 steps" in out  # still in tiny's warmup: on the run's own curve
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 3
    last = read_metrics(tmp_path / "run")[-1]  # the line compares the LM loss with val_loss, not the total
    assert "the MTP head does not train" not in out
    assert f"step 3: lm_loss {last['lm_loss']:.4f}  val_loss {last['val_loss']:.4f}  (loss {last['loss']:.4f}" in out
    assert "past max_steps=2" in run_cli("train", "--resume", str(tmp_path / "run"), "--max-steps", "2")
    assert "reshapes" not in capsys.readouterr().out  # no note about a schedule the run never takes
    notice = schedule_notice(tmp_path / "run", apply_overrides(resume_config(tmp_path / "run"),
                                                                ["max_steps=4", "optim.lr=0.1"]))
    assert notice.startswith("note: max_steps 3 -> 4 and optim.lr 0.002 -> 0.1 reshape the cosine LR schedule")
    assert validation_notice(tmp_path / "run", resume_config(tmp_path / "run")) is None
    fewer = apply_overrides(resume_config(tmp_path / "run"), ["data.val_batches=1"])
    noted = validation_notice(tmp_path / "run", fewer)
    assert noted.startswith("note: data.val_batches 2 -> 1 may change which held-out windows val_loss averages over")
    # a resume in another dtype, or without the deterministic kernels, went on without a word: no longer bit for bit
    saved_cfg, cpu = resume_config(tmp_path / "run"), torch.device("cpu")
    assert exactness_notice(tmp_path / "run", saved_cfg, cpu) is None
    other = "bfloat16" if saved_cfg.dtype == "float32" else "float32"
    changed = apply_overrides(saved_cfg, [f"dtype={other}", "deterministic=false"])
    assert exactness_notice(tmp_path / "run", changed, cpu) == (
        f"note: dtype {saved_cfg.dtype} -> {other} and deterministic true -> false: the steps after 3 will not be "
        "bit for bit those of the run uninterrupted")
    # so did one with another loss weight or the budget controller off; what only logs or saves otherwise is no change
    weighed = apply_overrides(saved_cfg, ["loss.balance_alpha=0.5", "budget.enabled=false", "eval_every=7",
                                          "checkpoint.keep=1", "sample_tokens=3"])
    assert exactness_notice(tmp_path / "run", weighed, cpu) == (
        f"note: budget.enabled True -> False and loss.balance_alpha {saved_cfg.loss.balance_alpha} -> 0.5: the steps "
        "after 3 will not be bit for bit those of the run uninterrupted")
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["max_steps"] == 3  # the refused value was written into the run's config
    for flags, refusal in [(["--set", "data.val_fraction=0.2"], "keeps its train/val split: data.val_fraction=0.2"),
                           (["--seed", "5"], "keeps its seed: seed=5 differs from the run's 0"),
                           (["--set", f"data.tokenizer={tmp_path / 'run'}"],  # was recorded, and never read
                            "keeps its tokenizer (the run's tokenizer.json), but the config changes data.tokenizer")]:
        assert refusal in run_cli("train", "--resume", str(tmp_path / "run"), *flags)  # not the sampler's numbers
    # The corpus moved: a relative --data on resume is saved absolute too. Other data is refused naming the change.
    shutil.copytree(tmp_path / "corpus", elsewhere / "moved")
    main(["train", "--resume", str(tmp_path / "run"), "--data", "moved", "--max-steps", "4", "--no-progress"])
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["data"]["source"] == str(elsewhere / "moved")
    shutil.copytree(elsewhere / "moved", elsewhere / "other")
    first = sorted((elsewhere / "other").iterdir())[0]
    first.write_text(first.read_text() + "\nprint('one line more')\n")
    assert f"changed since: data.source: {elsewhere / 'moved'} -> {elsewhere / 'other'}" in run_cli(
        "train", "--resume", str(tmp_path / "run"), "--data", "other", "--max-steps", "5")



def test_a_run_goes_on_with_changed_data_only_when_asked(tmp_path, capsys):
    """A corpus edited (or tokenized differently by a newer version) left a run no way on but starting over: the
    resume was refused, naming no way through. --accept-changed-data continues it and says what changed."""
    make_corpus(tmp_path / "corpus")
    run, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    for out, steps in ((run, "2"), (straight, "3")):
        main(["train", "--preset", "tiny", "--data", str(tmp_path / "corpus"), "--out", out, "--max-steps", steps,
              "--no-progress", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    main(["train", "--resume", run, "--max-steps", "3", "--no-progress", "--accept-changed-data"])
    assert "changed data" not in capsys.readouterr().out  # the same data: nothing to say, and bit for bit
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == [r["loss"] for r in read_metrics(straight)]
    first = sorted((tmp_path / "corpus").iterdir())[0]
    first.write_text(first.read_text().replace("def ", "def  ", 1))
    assert "pass --accept-changed-data" in run_cli("train", "--resume", run, "--max-steps", "4", "--no-progress")
    main(["train", "--resume", run, "--max-steps", "4", "--no-progress", "--accept-changed-data"])
    out = capsys.readouterr().out
    assert "note: resumed on changed data (--accept-changed-data): the training windows" in out
    assert "no longer bit for bit" in out and "done: 4 steps" in out
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert "only applies when a run is resumed" in run_cli("train", "--preset", "tiny", "--out", str(tmp_path / "new"),
                                                           "--accept-changed-data")


@pytest.mark.parametrize("build, message", [
    (lambda cfg: dataclasses.replace(cfg, dtype="bf16"), "dtype must be 'auto' or 'float32' or 'bfloat16', got 'bf16'"),
    (lambda cfg: dataclasses.replace(cfg, max_steps=10.5), "max_steps must be int, got 10.5"),
    (lambda cfg: ScheduleConfig(kind="linear"), "schedule.kind must be 'cosine' or 'wsd' or 'constant'"),
    (lambda cfg: ScalingConfig(variance_alignment="true"), "scaling.variance_alignment must be 'preset' or 'on'"),
    (lambda cfg: dataclasses.replace(cfg, optim={"lr": 1e-3}), "optim must be OptimConfig"),
    (lambda cfg: apply_overrides(cfg, "optim.lr=1e-3"), "takes a list of 'key=value' strings, got the string"),
])
def test_a_config_built_in_python_is_checked_as_set_is(build, message):
    """Built by hand or with dataclasses.replace, a config skipped the type checks of --set: dtype="bf16" trained
    in fp32 under a header saying bf16, and saved a config that --resume then refused; kind="linear" ran cosine."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build(recipe("tiny"))


@pytest.mark.slow
def test_a_torchrun_restart_continues_the_run_with_the_command_that_started_it(tmp_path: Path):
    """torchrun --max-restarts reruns the command that started a run; without --auto-resume that rerun was refused
    (the directory holds checkpoints) and every restart failed alike. Rank 0 is killed after the first
    checkpoint: the restart goes on from it, on the uninterrupted run's curve."""
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def launch(out: Path) -> subprocess.Popen:
        cmd = _train_cmd(out, corpus, cache, "--auto-resume")
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 "--max-restarts=1", *cmd[1:]], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    whole = launch(tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stdout.read()[-3000:]
    restarted = launch(tmp_path / "restarted")
    first = tmp_path / "restarted" / "checkpoints" / f"step_{SAVE_EVERY:08d}" / training.MANIFEST
    deadline = time.monotonic() + 200
    while not first.exists() and restarted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    rank0 = int((tmp_path / "restarted" / ".lock").read_text())  # the lock names the process that trains
    os.kill(rank0, signal.SIGKILL)
    assert restarted.wait(timeout=300) == 0, restarted.stdout.read()[-3000:]
    log = restarted.stdout.read()
    assert "no checkpoint to resume in" in log and "resuming at step" in log
    assert (tmp_path / "restarted" / "model.safetensors").is_file()

    def losses(run: str) -> list[tuple]:
        return [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in read_metrics(tmp_path / run)]

    assert len(losses("whole")) == LONG_STEPS and losses("restarted") == losses("whole")


def test_auto_resume_is_refused_where_it_cannot_choose(tmp_path: Path):
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    assert "--auto-resume and --resume both choose" in run_cli("train", "--auto-resume", "--resume", "--out", "x")
    assert "--auto-resume needs --out RUN_DIR" in run_cli("train", "--preset", "tiny", "--auto-resume")
    main(_train_cmd(tmp_path / "run", corpus, cache, "--max-steps", "2", "--save-every", "1", "--auto-resume")[3:])
    assert "not a run directory: resume" in run_cli("train", "--preset", "tiny", "--auto-resume", "--out",
                                                    str(tmp_path / "run" / "checkpoints"))
    with pytest.raises(ValueError, match="resume='yes': give True, False or 'auto'"):
        train(tiny_config(corpus, cache), tmp_path / "other", resume="yes")


def test_the_python_api_resumes_only_what_the_run_can_honour(tmp_path: Path, capsys):
    """train(cfg, out, resume=...) took any config: a resumed top-3 run went on as top-2 and recorded it, where the
    CLI refuses the same change; and resume="auto" did not say when it started afresh."""
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    cfg = tiny_config(corpus, cache, "max_steps=2", "checkpoint.save_every=1")
    train(cfg, tmp_path / "run", resume="auto", progress=False)
    assert f"no checkpoint to resume in {tmp_path / 'run'} yet: starting" in capsys.readouterr().out
    longer = dataclasses.replace(cfg, max_steps=3)
    for changed, message in ((dataclasses.replace(longer, model=longer.model.replace(moe_topk=2)),
                              "a resumed run keeps its model, but the config changes model.moe_topk"),
                             (dataclasses.replace(longer, seed=1), "a resumed run keeps its seed")):
        for resume in (True, "auto"):
            with pytest.raises(ValueError, match=message):
                train(changed, tmp_path / "run", resume=resume, progress=False)
    assert train(longer, tmp_path / "run", resume="auto", progress=False)["steps"] == 3
    assert "resuming at step 2" in capsys.readouterr().out


def test_tensorboard_drops_the_steps_a_resumed_run_trains_again(tmp_path: Path):
    """metrics.jsonl was cut back to the checkpoint; TensorBoard showed the steps trained again twice."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    cfg = tiny_config(corpus, cache, "max_steps=4", "checkpoint.save_every=2", "tensorboard=true")
    train(cfg, tmp_path / "run", progress=False)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")  # as if killed before it was written
    train(cfg, tmp_path / "run", resume=True, progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("lm_loss")] == [1, 2, 3, 4]


def test_a_home_relative_path_given_again_on_resume_is_the_same_path(tmp_path, monkeypatch):
    """--auto-resume re-applies the first start's flags: `--set data.tokenizer=~/tok` was saved expanded, compared
    unexpanded, and every restart was refused as a change of tokenizer."""
    monkeypatch.setenv("HOME", str(tmp_path))
    flags = ["data.tokenizer=~/tok", "init_from=~/model"]
    saved = absolute_paths(apply_overrides(recipe("tiny"), flags))
    resumed = build_config("tiny", flags, saved)
    assert resumed.data.tokenizer == "~/tok" and saved.data.tokenizer == str(tmp_path / "tok")


def test_init_from_with_another_tokenizer_stops_only_at_that_tokenizers_eos(tmp_path: Path):
    """init_from's extra eos id (2, `</s>` there) was kept beside a GPT-2-style tokenizer's `<|endoftext|>` (id 0),
    where id 2 is `"`: generation stopped at every quote. Its generation_config.json carried the old ids too."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    base = tmp_path / "base"
    main(["init", "--preset", "tiny", "--out", str(base)])
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1], "temperature": 0.6}))
    gpt2 = tokenizers.Tokenizer(models.BPE())
    gpt2.pre_tokenizer, gpt2.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    corpus = make_corpus(tmp_path / "corpus")
    gpt2.train([str(p) for p in corpus.iterdir()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    gpt2.save(str(tmp_path / "gpt2.json"))
    assert gpt2.id_to_token(0) == "<|endoftext|>" and gpt2.id_to_token(2) == '"'
    main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress",
          "--set", f"init_from={base}", "--set", f"data.tokenizer={tmp_path / 'gpt2.json'}",
          "--set", f"data.source={corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["eos_token_id"] == 0
    defaults = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert defaults["eos_token_id"] == [0] and defaults["temperature"] == 0.6  # the defaults stay, not the ids


@pytest.mark.parametrize("override, by", [
    ("model.eos_token_id=9", "a run: its tokenizer's ids are the model's (data.tokenizer's, or the one trained"),
    ("model.bos_token_id=7", "a run: its tokenizer's ids are the model's"),
    ("model.pad_token_id=5", "a run: its tokenizer's ids are the model's"),
    ("schedule.decay_fraction=0.5", "schedule.kind=cosine (only wsd decays over a last share)"),
    ("data.tokenizer_sample_bytes=1000", "a run whose tokenizer comes from data.tokenizer or init_from"),
    ("budget.rate=2.0", "a run with budget.enabled=false"),
    ("budget.decay_every=50", "a model without zero experts (model.zero_expert_num=0)"),
    ("budget.enabled=true", "a model without zero experts"),
    ("loss.mtp_start_step=5", "a run with loss.mtp_weight=0 (the MTP head never trains)"),
    ("data.text_field=content", "the stdlib corpus (Python files, not records with a text field)")])
def test_fields_a_run_overwrites_or_never_reads_are_refused(tmp_path: Path, override, by):
    """They trained without a word and were recorded, then overwritten (the token ids: the tokenizer's) or unused."""
    given = [override, f"data.tokenizer={tmp_path / 'tok.json'}"] if "sample" in override else [override]
    given += ["budget.enabled=false"] if "budget.rate" in override else []
    given += ["model.zero_expert_num=0"] if "zero experts" in by else []
    given += ["loss.mtp_weight=0"] if "mtp_weight" in by else []
    with pytest.raises(ValueError, match=re.escape(f"{override.split('=')[0]} is not read by {by}")):
        build_config("tiny", given)
    assert build_config("tiny", ["schedule.kind=wsd", "schedule.decay_fraction=0.5"]).schedule.decay_fraction == 0.5
    assert build_config("tiny", ["data.tokenizer_sample_bytes=1000"]).data.tokenizer_sample_bytes == 1000
    assert build_config("tiny", ["budget.rate=2.0"]).budget.rate == 2.0  # the controller runs: read
    assert build_config("tiny", ["loss.mtp_start_step=5"]).loss.mtp_start_step == 5
    assert build_config("tiny", ["data.source=c.jsonl", "data.text_field=content"]).data.text_field == "content"
    assert not build_config("tiny", ["budget.enabled=false"]).budget.enabled
    assert build_config("tiny", ["budget.enabled=false", "budget.target=1.5"]).ffn_expert_target == 1.5  # the loss's


@pytest.mark.parametrize("given, by", [
    (["schedule.kind=constant", "schedule.min_lr_ratio=0.5"], "schedule.kind=constant (it never decays to a minimum)"),
    (["budget.decay_factor=1", "budget.min_rate_ratio=0.5"], "budget.decay_factor=1 (the rate never decays)"),
    (["budget.decay_factor=1", "budget.decay_every=5"], "budget.decay_factor=1 (the rate never decays)"),
    (["model.zero_expert_num=0", "model.zero_expert_type=drop"], "a model without zero experts"),
    (["sample_tokens=0", "sample_temperature=0.5"], "a run with sample_tokens=0 (it writes no sample)")])
def test_settings_their_run_would_not_read_are_refused(given, by):
    """Each was recorded and changed nothing: a run with it saved weights byte-identical to one without it."""
    field = given[-1].split("=")[0]
    with pytest.raises(ValueError, match=re.escape(f"{field} is not read by {by}")):
        build_config("tiny", given)


def test_the_same_settings_are_taken_where_the_run_reads_them():
    assert build_config("tiny", ["schedule.min_lr_ratio=0.5"]).schedule.min_lr_ratio == 0.5  # cosine: read
    assert build_config("tiny", ["budget.integral_limit=0.01"]).budget.integral_limit == 0.01  # kept for a later ki
    assert build_config("tiny", ["budget.min_rate_ratio=0.5"]).budget.min_rate_ratio == 0.5
    assert build_config("tiny", ["model.zero_expert_type=drop"]).model.zero_expert_type == "drop"
    assert build_config("tiny", ["sample_temperature=0.5"]).sample_temperature == 0.5


def test_a_run_from_init_from_refuses_an_initialisation(tmp_path: Path):
    """init_std and initializer_range drew weights that init_from's then replaced: the run was the same to the byte."""
    main(["init", "--preset", "tiny", "--out", str(tmp_path / "base")])
    for override in ("scaling.init_std=0.5", "model.initializer_range=0.3"):
        with pytest.raises(ValueError, match=re.escape(f"{override.split('=')[0]} is not read by a run from "
                                                       "init_from (its weights are loaded, not drawn")):
            build_config("tiny", [f"init_from={tmp_path / 'base'}", override])
    assert build_config("tiny", ["scaling.init_std=0.5"]).scaling.init_std == 0.5


@pytest.mark.parametrize("field", ["model.hidden_size", "model.num_layers", "model.vocab_size", "data.batch_size"])
def test_a_run_that_cannot_fit_in_memory_is_refused_before_anything_is_built(tmp_path: Path, field):
    """A 10^20-wide model failed deep in torch ('Overflow when unpacking long long'); 10^20 layers or rows hung."""
    message = run_cli("train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", f"{field}={10**20}")
    assert message.startswith("longcat train: this run cannot fit in memory: ") and "this machine has" in message
    assert not (tmp_path / "run").exists()


def test_the_memory_bound_counts_the_share_of_the_ranks_on_this_host(monkeypatch):
    """FSDP shards the state over every rank: a multi-node CPU run needs only its ranks' share of each host."""
    from longcat_flash.device import host_memory_bytes
    from longcat_flash.train.memory import TRAIN_BYTES_PER_PARAMETER, check_fits

    base = build_config("tiny", [])
    assert not base.model.tie_word_embeddings
    per_row = TRAIN_BYTES_PER_PARAMETER * 2 * base.model.hidden_size  # a vocabulary row: embedding and lm_head
    cfg = build_config("tiny", [f"model.vocab_size={int(1.5 * host_memory_bytes()) // per_row}"])  # 1.5x the host
    for local, fits in ((4, False), (2, True)):  # 4 ranks in all, 4 or 2 of them on this host
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        if fits:
            check_fits(cfg, torch.device("cpu"), world=4)
        else:
            with pytest.raises(ValueError, match="cannot fit in memory: .* \\(the share of 4 of its 4 ranks here\\)"):
                check_fits(cfg, torch.device("cpu"), world=4)


def test_a_tokenizer_trained_smaller_than_the_vocabulary_says_so(tmp_path: Path, capsys):
    """A small sample gave a BPE of 261 tokens for model.vocab_size=512 without a word: half the embedding unused."""
    from longcat_flash.train.datasets import build_tokenizer

    cfg = build_config("tiny", [f"data.source={make_corpus(tmp_path / 'corpus')}", "data.tokenizer_sample_bytes=300"])
    tokenizer = build_tokenizer(cfg, tmp_path, reuse=False, progress=False)
    assert tokenizer.vocab_size < cfg.model.vocab_size
    assert (f"the tokenizer trained on the corpus sample has {tokenizer.vocab_size} tokens of model.vocab_size="
            f"{cfg.model.vocab_size} (its sample held no more merges): "
            f"{cfg.model.vocab_size - tokenizer.vocab_size} embedding rows stay unused") in capsys.readouterr().out


def test_a_text_field_for_a_corpus_of_text_files_is_refused(tmp_path: Path):
    """data.text_field=body on a folder of .py files trained as if it were not there, and was recorded."""
    corpus = make_corpus(tmp_path / "corpus")
    message = run_cli("train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", f"data.source={corpus}",
                      "--set", "data.text_field=body")
    assert message.startswith(f"longcat train: data.text_field=body is not read by a corpus of text files ({corpus} "
                              "holds no .jsonl/")
    assert not (tmp_path / "run").exists()
    (corpus / "records.jsonl").write_text(json.dumps({"body": "def f():\n    return 1\n" * 50}) + "\n")
    main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress",
          *[a for o in tiny_overrides(corpus, tmp_path / "cache", "data.text_field=body") for a in ("--set", o)]])
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["data"]["text_field"] == "body"
    # a run saved with it before the refusal existed still resumes: the refusal is for a new run's settings
    saved = apply_overrides(recipe("tiny"), [f"data.source={corpus}", "data.text_field=body"])
    (corpus / "records.jsonl").unlink()
    training.save(tmp_path / "old" / "checkpoints", 5, {"model": native_box()}, meta={"train_config": saved.to_dict()})
    assert "is not read by a corpus" not in run_cli("train", "--resume", str(tmp_path / "old"))


def test_a_run_from_init_from_may_add_eos_ids(tmp_path: Path):
    """What sft's "the chat template ends the assistant turn without a token ..." advises: the added id is kept
    beside the tokenizer's eos (train/pretrained.run_eos_ids)."""
    main(["init", "--preset", "tiny", "--out", str(tmp_path / "base")])
    assert build_config("tiny", [f"init_from={tmp_path / 'base'}", "model.eos_token_id=[2, 7]"]).model.eos_token_ids \
        == (2, 7)


def test_under_torchrun_experts_that_ep_does_not_divide_are_refused_before_the_tokenizer(tmp_path: Path):
    """5 experts over --ep 2 were refused only when the experts were sharded, after rank 0 had trained the
    tokenizer and tokenized the corpus (37 s on the stdlib), in a message that named neither the field nor --ep."""
    from longcat_flash.serve.launch import free_port

    command = [sys.executable, "-m", "longcat_flash.cli", "train", "--preset", "tiny", "--ep", "2", "--set",
               "model.n_routed_experts=5", "--set", "loss.balance_groups=1", "--set",
               f"data.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "run"), "--no-progress"]
    port = free_port()
    runs = [subprocess.Popen(command, env=_rank_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for rank in (0, 1)]
    errs = [run.communicate(timeout=120)[1] for run in runs]
    assert [run.returncode for run in runs] == [1, 1] and "Traceback" not in errs[0], errs[0][-3000:]
    assert errs[0].strip().splitlines()[-1] == ("longcat train: model.n_routed_experts=5 is not divisible by the "
                                                "expert-parallel size 2 (--ep): each ep rank holds an equal share of "
                                                "the experts")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "tokenizer.json").exists()

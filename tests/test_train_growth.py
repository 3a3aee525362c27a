"""Model growth (report §3.1.2): stacked layers equal the source, the grown state loads and training resumes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_support import make_corpus, run_directory_held, tiny_config

from longcat_flash.checkpoint import sharded, training
from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.cli import main
from longcat_flash.model import Transformer
from longcat_flash.train.checkpoints import read_checkpoint, resume_config
from longcat_flash.train.config import apply_overrides
from longcat_flash.train.growth import (grow_controller_state, grow_model_config, grow_optimizer_state,
                                        grow_run, grow_state_dict, grown_names)
from longcat_flash.train.metrics import read_metrics
from longcat_flash.train.trainer import train


def test_names_repeat_the_whole_stack():
    assert grown_names("model.layers.1.mlp.router.classifier.weight", 2, 2) == [
        "model.layers.1.mlp.router.classifier.weight", "model.layers.3.mlp.router.classifier.weight"]
    assert grown_names("lm_head.weight", 2, 2) == ["lm_head.weight"]
    with pytest.raises(ValueError, match="source model has 2 layers"):
        grown_names("model.layers.2.mlps.0.up_proj.weight", 2, 2)


def test_grown_state_loads_and_copied_layers_equal_the_source(tiny_config):
    small = Transformer(tiny_config)
    for router in small.routers():
        router.e_score_correction_bias.normal_()
    grown = Transformer(grow_model_config(tiny_config, 2))
    grown.load_state_dict(grow_state_dict(small.state_dict(), tiny_config.num_layers, 2))  # strict
    src, dst = small.state_dict(), grown.state_dict()
    for name, tensor in src.items():
        for new in grown_names(name, tiny_config.num_layers, 2):
            assert torch.equal(dst[new], tensor), new
    assert dst["model.layers.2.mlp.router.e_score_correction_bias"].data_ptr() != \
        dst["model.layers.0.mlp.router.e_score_correction_bias"].data_ptr()  # copies, not shared storage


def test_optimizer_and_controller_state_are_stacked_like_the_layers():
    moments = {"exp_avg": torch.ones(2), "step": torch.tensor(5.0)}
    grown = grow_optimizer_state({"model.layers.0.w": moments, "lm_head.weight": moments}, n_layers=1, r=2)
    assert list(grown) == ["model.layers.0.w", "model.layers.1.w", "lm_head.weight"]
    assert torch.equal(grown["model.layers.1.w"]["exp_avg"], torch.ones(2))
    ctrl = grow_controller_state({"integral": torch.tensor([[1.0], [2.0]]), "steps": 9}, 2)
    assert ctrl["integral"].flatten().tolist() == [1.0, 2.0, 1.0, 2.0] and ctrl["steps"] == 9


@pytest.mark.slow
def test_grow_a_run_then_resume_it(tmp_path: Path, capsys, monkeypatch):
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    cfg = tiny_config(corpus, cache, "model.num_layers=1", "max_steps=6", "checkpoint.save_every=3")
    train(cfg, tmp_path / "small", progress=False)
    ckpt = grow_run(tmp_path / "small", tmp_path / "grown")
    capsys.readouterr()
    main(["info", str(tmp_path / "grown"), "--json"])  # a run without its config.json yet: its checkpoint's
    assert json.loads(capsys.readouterr().out)["num_layers"] == 2
    for where in (ckpt, ckpt.parent):  # one step's directory and the checkpoints folder, as grow takes them
        main(["info", str(where), "--json"])  # "no config.json at .../step_00000006/config.json"
        assert json.loads(capsys.readouterr().out)["num_layers"] == 2
    states, meta = read_checkpoint(ckpt)
    src_states, _ = read_checkpoint(tmp_path / "small")
    assert meta["step"] == 6 and meta["train_config"]["model"]["num_layers"] == 2
    for name, tensor in src_states["model"].items():
        for new in grown_names(name, 1, 2):
            assert torch.equal(states["model"][new], tensor)
            if name in src_states["optimizer"]:  # parameters (buffers have no Adam state)
                assert torch.equal(states["optimizer"][new]["exp_avg_sq"],
                                   src_states["optimizer"][name]["exp_avg_sq"])
    assert states["sampler"] == src_states["sampler"] and states["trainer"] == src_states["trainer"]
    with pytest.raises(ValueError, match=r"--factor 10000000000 grows a model of .* its fp32 weights and Adam's "
                                         r"two moments and the source's need \d+ GiB; this machine has"):
        grow_run(tmp_path / "small", tmp_path / "huge", 10**10)  # built layer by layer until memory ran out
    for held in ("metrics.jsonl", "model-00001-of-00002.safetensors"):  # a user's run file, a user's weights
        (tmp_path / held).mkdir()
        (tmp_path / held / held).write_text("mine")
        with pytest.raises(ValueError, match=f"holds {held}; the grown run or model goes into a new or empty"):
            grow_run(tmp_path / "small", tmp_path / held)  # it replaced (or deleted) a user's files without a word
        assert (tmp_path / held / held).read_text() == "mine"
    with run_directory_held(tmp_path / "small"):  # a run still training: its newest checkpoint may go mid-read
        with pytest.raises(ValueError, match=r"small is being trained \(pid \d+\): grow it once that run stops"):
            grow_run(tmp_path / "small", tmp_path / "while_trained")
        with pytest.raises(ValueError, match="small is being trained"):  # one of its checkpoints
            grow_run(training.latest_checkpoint(tmp_path / "small" / "checkpoints"), tmp_path / "while_trained")
        monkeypatch.chdir(tmp_path / "small" / "checkpoints")
        with pytest.raises(ValueError, match="small is being trained"):  # named from inside its checkpoints folder
            grow_run("step_00000006", tmp_path / "while_trained")
        monkeypatch.undo()
    assert not (tmp_path / "while_trained").exists()  # a refused grow leaves nothing behind
    (tmp_path / "racing").mkdir()
    with run_directory_held(tmp_path / "racing"):  # another grow writing there: two wrote one folder at once
        with pytest.raises(ValueError, match="is in use by another training process"):
            grow_run(tmp_path / "small", tmp_path / "racing")
    assert not (tmp_path / "grown" / ".lock").exists()  # the grown run holds what was grown

    class Interrupted(sharded.HuggingFaceStorageWriter):  # Ctrl-C (or SIGTERM) while the shards are written
        def write_data(self, *args, **kwargs):
            raise KeyboardInterrupt
    monkeypatch.setattr(sharded, "HuggingFaceStorageWriter", Interrupted)
    with pytest.raises(KeyboardInterrupt):  # it was "rank 0 could not write its shard: " (exit 1, not 130)
        grow_run(tmp_path / "small", tmp_path / "stopped")
    monkeypatch.undo()
    assert not (tmp_path / "stopped").exists()  # a half-written checkpoint there refused the same grow again
    train(apply_overrides(resume_config(tmp_path / "grown"), ["max_steps=8"]), tmp_path / "grown", resume=True,
          progress=False)
    steps = [r["step"] for r in read_metrics(tmp_path / "grown")]
    assert steps == list(range(1, 9))  # the small run's history, then the grown model's steps 7, 8
    model = LongcatFlash.from_pretrained(tmp_path / "grown")
    assert model.config.num_layers == 2
    assert json.loads((tmp_path / "grown" / "config.json").read_text())["num_layers"] == 2


def test_grow_an_hf_model_directory(tmp_path: Path, tiny_config):
    small = LongcatFlash(tiny_config)
    small.save_pretrained(tmp_path / "src")
    defaults = '{"eos_token_id": [2, 7], "temperature": 0.7, "do_sample": true}'  # serve starts requests from them
    (tmp_path / "src" / "generation_config.json").write_text(defaults)
    (tmp_path / "src" / "additional_chat_templates").mkdir()  # transformers 5's named templates: tool_use was lost
    (tmp_path / "src" / "additional_chat_templates" / "tool_use.jinja").write_text("T{{ tools | length }}")
    grow_run(tmp_path / "src", tmp_path / "dst")
    grown = LongcatFlash.from_pretrained(tmp_path / "dst")
    assert grown.config.num_layers == 4
    assert (tmp_path / "dst" / "generation_config.json").read_text() == defaults
    assert (tmp_path / "dst" / "additional_chat_templates" / "tool_use.jinja").read_text() == "T{{ tools | length }}"
    assert torch.equal(grown.model.layers[3].mlps[1].up_proj.weight, small.model.layers[1].mlps[1].up_proj.weight)
    with pytest.raises(ValueError, match="holds .*config.json, .*model.safetensors; the grown run or model goes"):
        grow_run(tmp_path / "src", tmp_path / "dst")
    for missing, says in ((tmp_path / "none", "does not exist"),
                          (tmp_path / "src" / "config.json", "is not a directory")):
        with pytest.raises(ValueError, match=f"{says}: grow a run directory, one of its checkpoints, or an HF model"):
            grow_run(missing, tmp_path / "other")  # it said "no checkpoint found at ..., expected .../manifest.json"
    with pytest.raises(ValueError, match=r"grows a model of .* its weights and the source's need \d+ GiB; this "
                                         r"machine has"):
        grow_run(tmp_path / "src", tmp_path / "huge", 10**10)
    assert not (tmp_path / "huge").exists()
    with pytest.raises(ValueError, match=r"growth factor r \(--factor\) must be an integer >= 2, got 1"):
        grow_run(tmp_path / "nowhere", tmp_path / "copy", 1)  # it wrote a copy and said "grown x1"; said first
    (tmp_path / "src" / "checkpoints").mkdir()  # a run directory whose checkpoints were pruned: its model grows
    grow_run(tmp_path / "src", tmp_path / "pruned")  # it said "no checkpoint found at ..."
    assert LongcatFlash.from_pretrained(tmp_path / "pruned").config.num_layers == 4
    small.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # was written in fp32: twice the bytes
    grow_run(tmp_path / "bf16", tmp_path / "bf16-grown")
    grown = LongcatFlash.from_pretrained(tmp_path / "bf16-grown")
    assert grown.lm_head.weight.dtype == torch.bfloat16  # the dtype the files hold


PEAK = """
import resource, sys
from pathlib import Path
from longcat_flash.checkpoint import hf
from longcat_flash.train.growth import grow_run
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
hf.from_pretrained(src)  # the imports and one load, which any grow costs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
grow_run(src, dst, 3)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print((after - before) / sum(f.stat().st_size for f in dst.glob("*.safetensors")))
"""


def test_growing_a_model_holds_about_the_grown_weights_once(tmp_path):
    """Growing a bf16 model directory built an fp32 model beside the grown copies and the source: 11.3 GiB at peak
    for the bench preset's 0.9B parameters grown x2 (its memory check counted 6.2), now 5.1. Here the peak's growth
    over a process that loaded the source once, in units of the grown files' bytes (2.58 before, 0.57 after)."""
    from longcat_flash.checkpoint.fresh import init_checkpoint
    from longcat_flash.presets import get_preset

    init_checkpoint(get_preset("small"), tmp_path / "src")
    run = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "src"), str(tmp_path / "grown")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout) < 1.5, run.stdout


def test_a_command_that_runs_out_of_memory_says_so_in_one_line(tmp_path, monkeypatch):
    """A grow whose weights did not fit (under a memory limit) ended in torch's traceback, "DefaultCPUAllocator:
    can't allocate memory". Here the source's load asks for 10 TB."""
    import longcat_flash.checkpoint.hf as hf_module
    from longcat_flash.checkpoint.fresh import init_checkpoint
    from longcat_flash.presets import get_preset

    init_checkpoint(get_preset("tiny"), tmp_path / "src")
    monkeypatch.setattr(hf_module, "from_pretrained", lambda *args, **kwargs: torch.empty(10**13, dtype=torch.uint8))
    with pytest.raises(SystemExit) as stop:
        main(["grow", str(tmp_path / "src"), "--out", str(tmp_path / "grown")])
    assert str(stop.value.code) == (
        "longcat grow: out of memory (can't allocate memory: you tried to allocate 10000000000000 bytes); it needs a "
        "smaller model, batch or sequence, or a machine with more memory")
    assert not (tmp_path / "grown").exists()

"""The training loop: determinism, resume, skipped steps, the metrics line and the final HF directory."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from train_support import make_corpus, run_directory_held, tiny_config

from safetensors import SafetensorError

from longcat_flash.checkpoint import safetensors_files, sharded, training
from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.checkpoint.training import CheckpointError
from longcat_flash.tokenizer import Tokenizer
from longcat_flash.train import run_lock, trainer
from longcat_flash.train.checkpoints import load_checkpoint, resume_config
from longcat_flash.train.config import apply_overrides
from longcat_flash.train.determinism import NoDeterministicKernel, set_deterministic
from longcat_flash.train.metrics import read_metrics
from longcat_flash.train.trainer import TrainingStopped, setup, train, train_step

REQUIRED = {"step", "loss", "lm_loss", "lr", "tokens_per_s", "ffn_experts_per_token", "ffn_experts_target",
            "ffn_experts_std", "z_loss", "balance_loss", "mtp_loss", "grad_norm", "skipped", "state_bytes"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return make_corpus(root / "corpus"), root / "cache"


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in read_metrics(run)]


def test_same_seed_is_bitwise_identical_and_resume_continues_exactly(corpus, tmp_path):
    cfg = tiny_config(*corpus, "max_steps=12", "checkpoint.save_every=4", "eval_every=4", "loss.monitor_every=5")
    summary = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    # lose the last checkpoint (as if killed just before it), resume from step 8: same losses again
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000012")
    train(resume_config(tmp_path / "b"), tmp_path / "b", resume=True, progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    records = read_metrics(tmp_path / "a")
    assert REQUIRED <= set(records[0]) and "val_loss" in records[3] and "router_grad_ratio" in records[5]
    assert summary["steps"] == 12
    sample = summary["sample"]  # the prompt and its continuation, in the run directory too
    assert (tmp_path / "a" / "sample.txt").read_text() == sample + "\n"
    assert len(sample) > len(cfg.sample_prompt) and sample.startswith(cfg.sample_prompt)
    other = train(tiny_config(*corpus, "max_steps=2", "seed=1"), tmp_path / "c", progress=False)
    assert other["steps"] == 2 and losses(tmp_path / "c")[0] != losses(tmp_path / "a")[0]


def test_a_tied_run_checkpoints_resumes_exactly_and_stays_tied(corpus, tmp_path):
    """tie_word_embeddings: the embedding and the lm_head are one parameter, stored once in a checkpoint (safetensors
    refuses two names on one storage) and one again after a resume, which continues the run to the bit."""
    cfg = tiny_config(*corpus, "max_steps=6", "checkpoint.save_every=3", "model.tie_word_embeddings=true")
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    train(resume_config(tmp_path / "b"), tmp_path / "b", resume=True, progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6
    model = LongcatFlash.from_pretrained(tmp_path / "b")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_copy_windows_mix_into_a_run_that_resumes_exactly(corpus, tmp_path, capsys):
    """data.copy_fraction: copy windows join the training batches (the losses change, the validation split does
    not), the header says how many, and a resume replays the same mixed batches."""
    cfg = tiny_config(*corpus, "max_steps=6", "checkpoint.save_every=3", "eval_every=3", "data.copy_fraction=0.5")
    train(cfg, tmp_path / "a", progress=True)
    assert "copy windows (50% of the train split" in capsys.readouterr().out
    train(cfg, tmp_path / "b", progress=False)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    train(resume_config(tmp_path / "b"), tmp_path / "b", resume=True, progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    train(tiny_config(*corpus, "max_steps=1"), tmp_path / "plain", progress=False)
    assert losses(tmp_path / "plain")[0][1] != losses(tmp_path / "a")[0][1]


def test_the_run_directory_is_an_hf_checkpoint(corpus, tmp_path):
    train(tiny_config(*corpus, "max_steps=2"), tmp_path, progress=False)
    model = LongcatFlash.from_pretrained(tmp_path)
    tok = Tokenizer.load(tmp_path)
    assert model.config.vocab_size >= tok.vocab_size and model.config.eos_token_id == tok.eos_id
    ids = torch.tensor([tok.encode("def f(x):")])
    assert torch.isfinite(model(ids).logits).all()
    assert (tmp_path / "sample.txt").read_text().startswith("def ")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny_config(*corpus, "max_steps=2"), tmp_path, progress=False)


def test_non_finite_step_is_skipped_and_nothing_changes(corpus, tmp_path):
    run = setup(tiny_config(*corpus), tmp_path, progress=False)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with torch.no_grad():
        run.model.lm_head.weight[0, 0] = math.nan
    metrics = train_step(run.model, run.optimizer, run.controller, run.sampler.next_batch(4), run.cfg, 0)
    assert metrics["skipped"] and not math.isfinite(metrics["loss"])
    assert not run.optimizer.state and run.controller.steps == 0  # no update, no controller step
    for name, tensor in run.model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        run.model.lm_head.weight[0, 0] = 0.0
    metrics = train_step(run.model, run.optimizer, run.controller, run.sampler.next_batch(4), run.cfg, 1)
    assert not metrics["skipped"] and run.controller.steps == 1


def test_train_step_drives_an_optimizer_of_the_users_own(corpus, tmp_path):
    """train_step sets the learning rate of the config's schedule on any optimizer (param groups without the
    trainer's per-group multipliers take the plain rate)."""
    run = setup(tiny_config(*corpus, "max_steps=2", "eval_every=0"), tmp_path, progress=False)
    optimizer = torch.optim.SGD(run.model.parameters(), lr=0.1)
    before = run.model.lm_head.weight.detach().clone()
    metrics = train_step(run.model, optimizer, run.controller, run.sampler.next_batch(4), run.cfg, 1)
    assert not metrics["skipped"] and optimizer.param_groups[0]["lr"] == metrics["lr"] > 0
    assert not torch.equal(run.model.lm_head.weight, before)

def test_repeated_failures_stop_with_a_clear_message(corpus, tmp_path, monkeypatch):
    real = trainer.training_losses

    def poisoned(*args, **kwargs):  # steps 3 and 6.. produce NaN
        terms = real(*args, **kwargs)
        poisoned.calls += 1
        if poisoned.calls == 3 or poisoned.calls >= 6:
            terms.total = terms.total * math.nan
        return terms

    poisoned.calls = 0
    monkeypatch.setattr(trainer, "training_losses", poisoned)
    cfg = tiny_config(*corpus, "max_steps=20", "max_consecutive_skips=3", "eval_every=0")
    with pytest.raises(TrainingStopped, match="3 consecutive steps had a non-finite loss"):
        train(cfg, tmp_path, progress=False)
    skipped = [r["skipped"] for r in read_metrics(tmp_path)]
    assert skipped == [False, False, True, False, False, True, True, True]


def test_memory_savers_leave_the_losses_unchanged(corpus, tmp_path):
    """Per-layer activation checkpointing and a chunked cross-entropy (LM and MTP) only trade compute for memory."""
    base = tiny_config(*corpus, "max_steps=3", "dtype=float32", "eval_every=0")
    saver = tiny_config(*corpus, "max_steps=3", "dtype=float32", "eval_every=0", "activation_checkpointing=true",
                        "loss.logits_chunk=40")
    train(base, tmp_path / "base", progress=False)
    train(saver, tmp_path / "saver", progress=False)
    for a, b in zip(read_metrics(tmp_path / "base"), read_metrics(tmp_path / "saver")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["mtp_loss"] == pytest.approx(b["mtp_loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_val_loss_scores_the_same_windows_whatever_the_gradient_accumulation(corpus, tmp_path):
    """data.grad_accum is a memory knob; validation took batch_size / grad_accum windows per batch, so raising it
    shrank the validation set and moved val_loss by ~0.1 nats."""
    cfg = tiny_config(*corpus, "dtype=float32", "data.val_batches=2")
    run = setup(cfg, tmp_path / "run", progress=False)
    losses = [trainer.evaluate(run.model, run.val, apply_overrides(cfg, [f"data.grad_accum={k}"])) for k in (1, 2, 4)]
    assert losses == pytest.approx([losses[0]] * 3, abs=1e-5)


def test_tensorboard_without_its_package_is_refused_before_any_work(corpus, tmp_path, monkeypatch):
    """It was an ImportError traceback at the first log line, after tokenizing (on every rank under torchrun)."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed, whether or not it is here
    with pytest.raises(ValueError, match="tensorboard=true needs the tensorboard package"):
        train(tiny_config(*corpus, "max_steps=1", "tensorboard=true"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_clear_error(corpus, tmp_path, monkeypatch):
    def full_disk(directory, state):
        raise OSError("rank 0 could not write its shard: [Errno 28] No space left on device")

    monkeypatch.setattr(sharded, "save", full_disk)
    with pytest.raises(CheckpointError, match="cannot write checkpoint step 2 in .*: rank 0 could not write"):
        train(tiny_config(*corpus, "max_steps=4", "checkpoint.save_every=2", "eval_every=0"), tmp_path / "run",
              progress=False)

    def immutable(root, step):  # rank 0 alone makes the directory: its error was a bare errno (under torchrun
        raise PermissionError(1, "Operation not permitted", f"{root}/.tmp-step_{step:08d}")  # a hang of the rest)

    monkeypatch.setattr(training, "temporary_dir", immutable)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint step 2 in .* \(rank 0\): \[Errno 1\]"):
        train(tiny_config(*corpus, "max_steps=4", "checkpoint.save_every=2", "eval_every=0"), tmp_path / "run2",
              progress=False)
    monkeypatch.undo()

    def full_on_state(tensors, filename, metadata=None):  # the shard fitted; the small state files did not
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors_files, "save_file", full_on_state)  # a traceback: safetensors' own error
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint step 2 in \S*/checkpoints \(rank 0\): "
                                              r"\w+\.safetensors: .*No space left on device"):
        train(tiny_config(*corpus, "max_steps=4", "checkpoint.save_every=2", "eval_every=0"), tmp_path / "run3",
              progress=False)


def test_an_op_without_a_deterministic_kernel_is_one_error_naming_it(corpus, tmp_path, monkeypatch):
    """deterministic=true is strict on every device (on a GPU, torch's warn-only mode would leave attention's
    backward non-deterministic); an op the device has no deterministic kernel for stops the run with one line
    naming it and the way out. put_ stands in for such an op here: it has none on the CPU either."""
    real = trainer.training_losses

    def with_put(*args, **kwargs):
        torch.zeros(4).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "training_losses", with_put)
    with pytest.raises(NoDeterministicKernel, match=r"^put_ has no deterministic kernel .* --set deterministic=false"):
        train(tiny_config(*corpus, "max_steps=2", "eval_every=0"), tmp_path / "strict", progress=False)
    train(tiny_config(*corpus, "max_steps=2", "eval_every=0", "deterministic=false"), tmp_path / "free",
          progress=False)
    assert len(read_metrics(tmp_path / "free")) == 2


def test_deterministic_mode_is_strict_on_a_gpu_too():
    """torch's warn-only mode keeps SDPA's non-deterministic flash / memory-efficient backward on a GPU."""
    try:
        set_deterministic(True, torch.device("cuda", 0))
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        set_deterministic(True, torch.device("cpu"))

def test_resuming_into_another_shape_names_the_field(corpus, tmp_path):
    train(tiny_config(*corpus, "max_steps=2", "eval_every=0"), tmp_path / "run", progress=False)
    saved = (tmp_path / "run" / "train_config.json").read_text()
    wider = apply_overrides(resume_config(tmp_path / "run"), ["max_steps=3", "model.expert_ffn_hidden_size=48"])
    with pytest.raises(ValueError, match=r"keeps its model, but the config changes model\.expert_ffn_hidden_size"):
        train(wider, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "train_config.json").read_text() == saved  # a refused resume changes nothing
    run = setup(wider, tmp_path / "other")  # a checkpoint loaded into another model by hand names the tensor
    try:
        with pytest.raises(CheckpointError, match=r"does not fit this model: model\.layers\.0\.mlp\.experts\.\w+ is"):
            load_checkpoint(run, training.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    finally:
        run_lock.release(tmp_path / "other")


def test_a_run_directory_another_live_process_trains_in_is_refused(corpus, tmp_path):
    """A --resume while the orphaned workers of a killed launcher still write, or one --out in two terminals, would
    interleave checkpoints: refused while the other process lives, free as soon as it is gone (even by kill -9)."""
    out = tmp_path / "run"
    out.mkdir()
    with run_directory_held(out) as holder:
        with pytest.raises(ValueError, match=rf"in use by another training process \(pid {holder.pid};"):
            train(tiny_config(*corpus, "max_steps=1", "eval_every=0"), out, progress=False)
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    train(tiny_config(*corpus, "max_steps=1", "eval_every=0"), out, progress=False)
    assert len(read_metrics(out)) == 1
    with run_directory_held(out) as holder:  # the live run is named, not its checkpoints ("pass --resume")
        with pytest.raises(ValueError, match=rf"in use by another training process \(pid {holder.pid};"):
            train(tiny_config(*corpus, "max_steps=1", "eval_every=0"), out, progress=False)


def test_a_run_that_fails_frees_its_directory_for_another_process(corpus, tmp_path, monkeypatch):
    """A script whose train() raised (a stopped run, a data error) goes on living: its lock must not keep every
    other process, a `--resume` in a terminal included, out of the directory until the script ends."""
    out = tmp_path / "run"

    def failing_step(run):
        raise TrainingStopped("a failure after the run took its directory")

    monkeypatch.setattr(trainer, "_timed_step", failing_step)
    with pytest.raises(TrainingStopped):
        train(tiny_config(*corpus, "max_steps=1", "eval_every=0"), out, progress=False)
    with run_directory_held(out):  # another process can take the lock (it fails "in use" while one holds it)
        pass


def test_ctrl_c_says_where_a_resume_goes_on_from(corpus, tmp_path, monkeypatch, capsys):
    """Ctrl-C stopped a run with an empty line: the steps since its newest checkpoint lost without a word."""
    real, steps = trainer._timed_step, []

    def interrupted_at_step_4(run):
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return real(run)

    monkeypatch.setattr(trainer, "_timed_step", interrupted_at_step_4)
    for save_every, says in ((2, "interrupted after step 3: resuming {out} goes on from step 2, its newest checkpoint"),
                             (5, "interrupted after step 3: no checkpoint yet (the first at step 5); a new run"),
                             (50, "no checkpoint yet (the first at step 10)")):  # the last step is always saved
        steps.clear()
        out = tmp_path / f"every_{save_every}"
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(*corpus, "max_steps=10", "eval_every=0", f"checkpoint.save_every={save_every}"), out,
                  progress=False)
        assert says.format(out=out) in capsys.readouterr().out


def test_a_save_stopped_midway_leaves_no_half_written_copy(corpus, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while a checkpoint was written left checkpoints/.tmp-step_N, a hidden partial copy of the
    weights that stayed until the same directory saved again."""
    def interrupted(tmp, *args, **kwargs):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "commit", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*corpus, "max_steps=2", "eval_every=0", "checkpoint.save_every=1"), out, progress=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == []


def test_train_leaves_the_callers_generators_and_deterministic_flags_as_it_found_them(corpus, tmp_path):
    """train() from a user's script reseeded the global generator and left use_deterministic_algorithms on."""
    torch.manual_seed(1234)
    torch.use_deterministic_algorithms(False)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    train(tiny_config(*corpus, "max_steps=1", "deterministic=true"), tmp_path / "run", progress=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.rand(3), expected)


def test_train_takes_devices_as_the_cli_does_and_refuses_what_is_no_run_directory(corpus, tmp_path):
    """`device="auto"` (the CLI's default) was torch's "Expected one of cpu, cuda, ..." and `cuda` without CUDA an
    AssertionError from inside torch; `train(cfg, "")` trained into the current directory; a dict for the config
    failed deep in setup."""
    from longcat_flash.device import DeviceError

    cfg = tiny_config(*corpus, "max_steps=1")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cuda: CUDA is not available on this machine"):
            train(cfg, tmp_path / "cuda", progress=False, device="cuda")
    with pytest.raises(ValueError, match="the run directory is empty"):
        train(cfg, " ", progress=False)
    with pytest.raises(TypeError, match="cfg must be a TrainConfig .*got dict"):  # AttributeError deep in setup
        train(cfg.to_dict(), tmp_path / "dict", progress=False)
    assert not (tmp_path / "dict").exists()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="the run directory .*notes.txt is a file"):
        train(cfg, tmp_path / "notes.txt", progress=False)
    summary = train(cfg, tmp_path / "auto", progress=False, device="auto")
    assert summary["steps"] == 1 and (tmp_path / "notes.txt").read_text() == "mine"

"""Training under torchrun (gloo) with FSDP2 and experts sharded over ep follows the single-process run.

One single-process tiny run (8 steps, float32, the MTP head joining at step 3) is the reference.
tests/dist_train_checks.py trains the same 8 steps at world 4 and at world 2 in every (dp, ep) layout; the world-2
launch also resumes the world-4 (dp 2, ep 2) run's step-4 checkpoint in each of its layouts, and this file resumes it
in one process. Every
loss curve must match the reference, and the state each rank holds must fall with the world size.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_train_checks import REFERENCE, STEPS
from test_distributed import torchrun
from train_support import make_corpus, run_directory_held, tiny_config

from longcat_flash.checkpoint import training
from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.train.metrics import read_metrics
from longcat_flash.train.checkpoints import resume_config
from longcat_flash.train.trainer import train

pytestmark = pytest.mark.dist
WORKER = Path(__file__).with_name("dist_train_checks.py")
FFN_EXPERTS = 8  # the tiny preset's


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist_train")
    corpus, cache = make_corpus(root / "corpus"), root / "cache"
    ref = root / "ref"
    train(tiny_config(corpus, cache, *REFERENCE), ref, progress=False)
    output = torchrun(4, WORKER, str(ref), str(root), str(corpus), str(cache))
    midway = root / "w4_ep2_midway"
    shutil.copytree(root / "w4_ep2", midway)
    shutil.rmtree(midway / "checkpoints" / f"step_{STEPS:08d}")  # its newest is now step SAVE_EVERY
    output += torchrun(2, WORKER, str(ref), str(root), str(corpus), str(cache), str(midway))
    (root / "torchrun.log").write_text(output)
    return root


def layouts(world: int) -> list[int]:
    return list(dict.fromkeys((world, world // 2, 1)))


def records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run)}


def assert_same_curve(run: Path, ref: Path) -> None:
    got, want = records(run), records(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s]["loss"] - want[s]["loss"]) for s in want) <= 1e-4, \
        [(s, got[s]["loss"], want[s]["loss"]) for s in want]
    for key in ("ffn_experts_per_token", "ffn_experts_std"):  # over all ranks' tokens, not a mean of ranks' own
        assert max(abs(got[s][key] - want[s][key]) for s in want) <= 0.01, [(got[s][key], want[s][key]) for s in want]


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_matches_one_process(runs, world):
    for ep in layouts(world):
        assert_same_curve(runs / f"w{world}_ep{ep}", runs / "ref")


def test_state_per_rank_falls_with_the_world(runs):
    one = records(runs / "ref")[STEPS]["state_bytes"]
    for world in (2, 4):
        for ep in layouts(world):
            held = records(runs / f"w{world}_ep{ep}")[STEPS]["state_bytes"]
            assert held <= (0.35 if world == 4 else 0.6) * one, (world, ep, held / one)


def test_each_rank_holds_its_share_of_the_experts_and_the_same_biases(runs):
    ref = [r.e_score_correction_bias for r in LongcatFlash.from_pretrained(runs / "ref").routers()]
    for world in (2, 4):
        for ep in layouts(world):
            ranks = [json.loads((runs / f"w{world}_ep{ep}" / f"rank{r}.json").read_text()) for r in range(world)]
            assert all(r["biases"] == ranks[0]["biases"] for r in ranks)
            assert [r["experts"] for r in ranks] == [FFN_EXPERTS // world] * world
            for got, want in zip(ranks[0]["biases"], ref):
                torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=0)


def test_world4_checkpoint_resumes_at_world2_in_every_layout(runs):
    for ep in layouts(2):
        assert_same_curve(runs / f"w2_ep{ep}_resumed", runs / "ref")  # the first half at world 4, the rest at world 2


def test_a_cli_resume_without_ep_keeps_the_runs_expert_parallelism(runs):
    """`longcat train --resume` of the world-4 ep-2 run at world 2, without --ep: it came back at ep 1, silently,
    and no longer bit for bit; it keeps ep 2 and says so."""
    run = runs / "w2_cli_resumed"
    assert_same_curve(run, runs / "ref")
    assert [json.loads((run / f"rank{r}.json").read_text())["experts"] for r in range(2)] == [FFN_EXPERTS // 2] * 2
    assert "resuming with the checkpoint's expert parallelism, --ep 2" in (runs / "torchrun.log").read_text()


def test_world4_checkpoint_resumes_in_one_process(runs):
    run = runs / "w1_resumed"
    shutil.copytree(runs / "w4_ep2_midway", run)
    train(resume_config(run), run, resume=True, progress=False)
    assert_same_curve(run, runs / "ref")


def test_checkpoints_are_sharded_per_rank(runs):
    files = training.read_manifest(runs / "w4_ep2" / "checkpoints" / f"step_{STEPS:08d}")["files"]
    shards = [entry["file"] for entry in files.values() if entry["file"].startswith("sharded/")]
    assert len(shards) == 4  # one file per rank, written in parallel


def test_distributed_run_writes_the_official_layout(runs):
    assert not list(runs.glob("w*/.shared-check"))  # the shared-directory check's token is not left behind
    got, ref = LongcatFlash.from_pretrained(runs / "w4_ep2"), LongcatFlash.from_pretrained(runs / "ref")
    assert got.model.layers[0].mlp.experts.gate_up_proj.shape[0] == got.config.n_routed_experts
    for (name, a), b in zip(got.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=name)


def rank_tracebacks(stderr: str) -> list[str]:
    """Tracebacks of the ranks themselves (torchrun prefixes their lines "[rankN]:"); the launcher's own
    ChildFailedError summary is torchrun's, not ours."""
    return [line for line in stderr.splitlines() if line.startswith("[rank") and "Traceback" in line]


def launch(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *cmd], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def train_args(corpus: Path, out: str, steps: int = 1) -> list[str]:
    return ["-m", "longcat_flash.cli", "train", "--preset", "tiny", "--device", "cpu", "--out", out, "--max-steps",
            str(steps), "--no-progress", "--set", f"data.source={corpus}", "--set", f"data.cache_dir={corpus.parent / 'c'}"]


def test_exporting_experts_sharded_over_dp_and_ep_warns_of_nothing(runs):
    """DTensor's warning of two sequential all_gathers "may give inconsistent results between ranks" came from every
    rank at every export with ep > 1 (a gather reduces nothing: the exported weights are the same)."""
    assert "While redistributing" not in (runs / "torchrun.log").read_text()


def test_nodes_that_do_not_share_the_run_directory_are_refused_before_any_work(tmp_path):
    """Two nodes (one process each, c10d rendezvous) given a relative --out from different directories: each
    wrote checkpoints into its own disk and the run ended "successfully" with no checkpoint holding every shard."""
    corpus = make_corpus(tmp_path / "corpus")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=shared-check"]
    nodes = [launch([*rdzv, *train_args(corpus, "run")], cwd=(tmp_path / f"node{n}")) for n in range(2)
             if (tmp_path / f"node{n}").mkdir() is None]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    errors = "".join(err for _, err in outputs)
    for _, err in outputs:  # each node's terminal says it once (its first rank)
        assert err.count("does not see the files rank 0 writes") == 1 and not rank_tracebacks(err), errors
    runs = [str((tmp_path / f"node{n}" / "run").resolve()) for n in range(2)]
    assert any(f"writes in {a} (here {b})" in errors for a, b in (runs, runs[::-1])), errors  # rank 0's, its own
    assert not any(Path(run).exists() for run in runs)  # not even the check's flag file and the lock


def test_a_rank_that_cannot_write_the_run_directory_is_refused_before_any_work(tmp_path):
    """A rank that saw --out read-only (a read-only mount on its node) trained until the first checkpoint."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs root and unshare(1) to give one rank a read-only mount")
    corpus, out = make_corpus(tmp_path / "corpus"), tmp_path / "run"
    out.mkdir()
    rank = tmp_path / "rank.sh"  # rank 1 runs in a mount namespace of its own, where --out is mounted read-only
    rank.write_text(f'if [ "$RANK" = 1 ]; then exec unshare -m sh -c \'mount --bind {out} {out} && mount -o '
                    f'remount,ro,bind {out} && exec "$0" "$@"\' "$@"; fi\nexec "$@"\n')
    cmd = ["--standalone", "--nproc-per-node=2", "--no-python", "sh", str(rank), sys.executable,
           *train_args(corpus, str(out), steps=4)]
    node = launch(cmd, cwd=tmp_path)
    _, errors = node.communicate(timeout=300)
    assert node.returncode != 0
    assert errors.count(f"cannot write in {out}: Read-only file system") == 1 and not rank_tracebacks(errors), errors
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_a_run_directory_in_use_is_one_line_under_torchrun(tmp_path):
    """Rank 0's refusal left rank 1 in a broadcast rank 0 never joined: a gloo traceback on every other rank."""
    corpus, out = make_corpus(tmp_path / "corpus"), tmp_path / "run"
    out.mkdir()
    with run_directory_held(out):
        node = launch(["--standalone", "--nproc-per-node=2", *train_args(corpus, str(out))], cwd=tmp_path)
        _, errors = node.communicate(timeout=300)
    assert node.returncode != 0 and errors.count("in use by another training process") == 1, errors
    assert not rank_tracebacks(errors) and "Connection closed" not in errors, errors


RANK_ZERO_SPEAKS_LATE = """import os, sys, time
from longcat_flash.cli import main


class Late:  # rank 0's stderr: its first `longcat train` line (usage, or the error) is written a second late
    def __init__(self, stream):
        self.stream, self.waited = stream, False

    def write(self, text):
        if "longcat train" in text and not self.waited:
            time.sleep(1)
            self.waited = True
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


if os.environ["RANK"] == "0":
    sys.stderr = Late(sys.stderr)
main(sys.argv[1:])
"""


def test_an_error_every_rank_hits_is_printed_though_the_other_ranks_leave_first(tmp_path):
    """The other ranks left the line to rank 0 and exited at once; torchrun then stopped rank 0 before it printed
    (5 of 9 launches at world 3 showed nothing but torchrun's summary). Rank 0's line comes a second late here, so
    that the race goes the bad way every time; a settings error and a usage error."""
    corpus = make_corpus(tmp_path / "corpus")
    late = tmp_path / "rank_zero_late.py"
    late.write_text(RANK_ZERO_SPEAKS_LATE)
    for flags, line in [(["--set", "data.batch_size=4"], "data.batch_size=4 is the global batch: it must be a "
                                                         "multiple of the world size 3"),
                        (["--ep", "two"], "argument --ep: invalid int value: 'two'")]:
        node = launch(["--standalone", "--nproc-per-node=3", str(late), *train_args(corpus, str(tmp_path / "run"))[2:],
                       *flags], cwd=tmp_path)
        _, errors = node.communicate(timeout=300)
        assert node.returncode != 0 and errors.count(line) == 1 and not rank_tracebacks(errors), errors


def test_a_run_that_cannot_continue_says_so_once(tmp_path):
    """Every rank stops on the same averaged non-finite losses; each printed the same line (8 on 8 GPUs)."""
    corpus = make_corpus(tmp_path / "corpus")
    diverge = ["--set", "optim.lr=1e4", "--set", "optim.grad_clip=0", "--set", "schedule.warmup_steps=0", "--set",
               "max_consecutive_skips=2"]
    node = launch(["--standalone", "--nproc-per-node=2", *train_args(corpus, str(tmp_path / "run"), 20), *diverge],
                  cwd=tmp_path)
    _, errors = node.communicate(timeout=300)
    assert node.returncode != 0 and errors.count("consecutive steps had a non-finite loss") == 1, errors

"""Training under torchrun (gloo, 2 ranks) follows the single-process run of the same command line.

One single-process tiny run (20 steps, float32) is the reference; tests/dist_train_checks.py then trains on two
ranks three ways (EP=2 through the CLI, --dp 2, and EP=2 resuming the reference's step-10 checkpoint), and
this file resumes the EP run's step-10 checkpoint in one process. Every loss curve must match the reference.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_distributed import torchrun
from train_support import make_corpus, tiny_config

from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.train.metrics import read_metrics
from longcat_flash.train.trainer import resume_config, train

pytestmark = pytest.mark.dist
WORKER = Path(__file__).with_name("dist_train_checks.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist_train")
    corpus, cache = make_corpus(root / "corpus"), root / "cache"
    ref = root / "ref"
    train(tiny_config(corpus, cache, "max_steps=20", "dtype=float32", "checkpoint.save_every=10"), ref,
          progress=False)
    torchrun(2, WORKER, str(ref), str(root), str(corpus), str(cache))
    return {"ref": ref, "ep": root / "ep", "dp": root / "dp", "ep_resumed": root / "ep_resumed", "root": root}


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def assert_same_curve(run: Path, ref: Path, steps: range) -> None:
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(steps)
    assert max(abs(got[s] - want[s]) for s in steps) <= 1e-4, [(s, got[s], want[s]) for s in steps]


def test_ep2_through_the_cli_matches_one_process(runs):
    assert_same_curve(runs["ep"], runs["ref"], range(1, 21))


def test_dp2_matches_one_process(runs):
    assert_same_curve(runs["dp"], runs["ref"], range(1, 21))


def test_biases_identical_on_every_rank_and_equal_to_one_process(runs):
    ref = [r.e_score_correction_bias for r in LongcatFlash.from_pretrained(runs["ref"]).routers()]
    for run, experts in (("ep", 4), ("dp", 8), ("ep_resumed", 4)):  # tiny: 8 FFN experts
        ranks = [json.loads((runs[run] / f"rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0]["biases"] == ranks[1]["biases"], run
        assert [r["experts"] for r in ranks] == [experts, experts], run
        for got, want in zip(ranks[0]["biases"], ref):
            torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=0)


def test_single_process_checkpoint_resumes_under_ep(runs):
    assert_same_curve(runs["ep_resumed"], runs["ref"], range(1, 21))  # steps 1-10 copied, 11-20 trained at EP=2


def test_ep_checkpoint_resumes_in_one_process(runs):
    run = runs["root"] / "sp_resumed"
    shutil.copytree(runs["ep"], run)
    shutil.rmtree(run / "checkpoints" / "step_00000020")
    train(resume_config(run), run, resume=True, progress=False)
    assert_same_curve(run, runs["ref"], range(1, 21))


def test_ep_run_writes_the_official_layout(runs):
    ep, ref = LongcatFlash.from_pretrained(runs["ep"]), LongcatFlash.from_pretrained(runs["ref"])
    assert ep.model.layers[0].mlp.experts.gate_up_proj.shape[0] == ep.config.n_routed_experts
    for (name, a), b in zip(ep.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=name)

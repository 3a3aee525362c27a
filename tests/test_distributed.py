"""Expert and data parallelism in real processes (torchrun, gloo): equal to the one-process model.

tests/dist_checks.py runs once per world size (2 and 4 ranks) and covers every (dp, ep) layout of that world,
with the ScMoE overlap on and off, plus the inference engine with sharded experts; each test below asserts
one property of what it recorded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import make_corpus

pytestmark = pytest.mark.dist
CHECKS = Path(__file__).with_name("dist_checks.py")


def torchrun(nproc: int, script: Path, *args: str, timeout: float = 300) -> str:
    """Launch `script` under torchrun on this machine; fail with the ranks' output if any rank fails, else return
    it (stdout, then stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def ranks(request, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp(f"world{request.param}")
    torchrun(request.param, CHECKS, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(request.param)]


def layouts(ranks: list[dict]) -> list[dict]:
    return [layout for rank in ranks for layout in rank["layouts"]]


def test_every_layout_runs_with_sharded_experts(ranks):
    world = ranks[0]["world"]
    seen = {(l["dp"], l["ep"]) for l in layouts(ranks)}
    assert seen == {(world // ep, ep) for ep in (world, world // 2, 1)}
    assert all(l["expert_rows"] == 8 // world for l in layouts(ranks))  # tiny: 8 FFN experts, E / W per rank


def test_forward_equals_one_process(ranks):
    assert max(l["logits_diff"] for l in layouts(ranks)) <= 1e-5


def test_gradients_equal_one_process(ranks):
    for l in layouts(ranks):
        assert l["grad_diff"] <= 1e-5 * max(1.0, l["grad_scale"]), l


def test_overlap_changes_nothing_numerically(ranks):
    off = [l for l in layouts(ranks) if not l["overlap"]]
    assert off and all(l["bitwise_equal_to_overlap"] for l in off)


def test_sharded_grad_norm_and_clipping(ranks):
    for l in layouts(ranks):
        assert l["norm_rel_diff"] <= 1e-6
        assert l["clipped_rel"] == pytest.approx(0.5, rel=1e-5)


def test_router_counts_reduce_to_the_global_batch(ranks):
    assert all(l["counts_equal"] for l in layouts(ranks))


def test_zero_expert_slots_send_no_bytes(ranks):
    mixed, all_zero = ranks[0]["traffic"]
    assert mixed["zero_slots"] > 0 and mixed["rows"] == mixed["expected_rows"] > 0
    assert mixed["bytes"] == mixed["rows"] * mixed["row_bytes"]
    assert all_zero["zero_slots"] == 3 * all_zero["tokens"]  # every slot of every token (tiny: top-3)
    assert all_zero["bytes"] == all_zero["rows"] == 0


def test_checkpoint_from_sharded_model_loads_in_one_process(ranks):
    for rank in ranks:
        assert rank["checkpoint"] == {"exact": True, "restored_shards": True}


def test_engine_generates_the_same_tokens_with_sharded_experts(ranks):
    for rank in ranks:
        fused_refused = rank["engine"].pop("fused_refused")
        for mode, result in rank["engine"].items():
            assert result == {"equal": True, "tokens": 12}, (mode, result)
        assert "shard the model first, then build the Engine on it" in fused_refused


def test_an_error_is_reported_once_by_rank_0_and_no_rank_dies_in_a_collective(tmp_path):
    """Every rank printed the same message (two could share a line), and a rank waiting for rank 0 in a barrier
    died with a gloo traceback when rank 0 stopped on bad data."""
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "longcat_flash.cli", "train", "--preset", "tiny", "--max-steps", "1", "--no-progress",
           "--out", str(tmp_path / "run"), "--set", f"data.source={tmp_path / 'empty'}",
           "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert [line for line in output.splitlines() if "longcat train:" in line] == [
        f"longcat train: corpus directory {tmp_path / 'empty'} holds no .txt/.md/.py/.jsonl/.jsonl.gz/.json.gz/.parquet files"]
    assert "Connection closed" not in output and "RankZeroFailed" not in output


@pytest.mark.parametrize("extra, named", [(["--set", "optim.lr=0.01"], "optim.lr: rank 1 0.01, rank 0 0.002"),
                                           (["--ep", "2"], "--dp: rank 1 1, rank 0 2; --ep: rank 1 2, rank 0 1")])
def test_ranks_given_different_settings_are_refused_before_any_work(tmp_path, extra, named):
    """A node started with another command line trained on silently (only rank 0's learning rate was recorded),
    or, given another --ep, hung building another mesh until the timeout named no cause."""
    launcher = tmp_path / "launcher.py"  # rank 1 alone gets `extra`, as a node given another line would
    launcher.write_text("import os, sys\nfrom longcat_flash.cli import main\n"
                        f"main(sys.argv[1:] + ({extra!r} if os.environ['RANK'] == '1' else []))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(launcher),
           "train", "--preset", "tiny", "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "run"),
           "--dist-timeout", "60", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert [line for line in output.splitlines() if "longcat train" in line] == [
        f"longcat train: the ranks were given different settings ({named}): every rank must run the same command "
        "line (on every node the same torchrun ... longcat line)"], output[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists() and "terminate called" not in output  # no abort


def test_auto_resume_on_a_run_directory_some_ranks_do_not_see_says_so(tmp_path):
    """--out on node-local disks, one holding the run: --auto-resume resumed on rank 0 and started afresh on rank 1,
    and the refusal blamed different command lines."""
    for node in ("a", "b"):
        (tmp_path / node).mkdir()
    data = ["--set", f"data.source={make_corpus(tmp_path / 'corpus')}", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    subprocess.run([sys.executable, "-m", "longcat_flash.cli", "train", "--preset", "tiny", "--max-steps", "1",
                    "--no-progress", "--out", str(tmp_path / "a" / "run"), *data],
                   check=True, capture_output=True, timeout=300)
    launcher = tmp_path / "launcher.py"  # each rank in its own node's directory, as with a node-local --out
    launcher.write_text("import os, sys\nfrom longcat_flash.cli import main\n"
                        "os.chdir(sys.argv[1] if os.environ['RANK'] == '0' else sys.argv[2])\nmain(sys.argv[3:])\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(launcher),
           str(tmp_path / "a"), str(tmp_path / "b"), "train", "--preset", "tiny", "--max-steps", "2", "--no-progress",
           "--out", "run", "--auto-resume", "--dist-timeout", "60", *data]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert [line for line in output.splitlines() if "longcat train" in line] == [
        "longcat train: with --auto-resume the ranks disagree on whether --out holds a checkpoint (a checkpoint in "
        "--out: rank 1 False, rank 0 True): every rank needs --out on one shared filesystem (all nodes see the files "
        "rank 0 writes there)"], output[-3000:]


def test_a_restarted_group_meets_though_torchruns_store_still_holds_the_last_attempts_addresses():
    """torchrun keeps one store for every restart of a job (its ranks are told so: TORCHELASTIC_USE_AGENT_STORE),
    and the process groups' keys did not name the attempt: a restarted rank that came before rank 0 read the
    address of the killed attempt's rank 0 and failed to connect, so `torchrun --max-restarts` retries failed.
    torchrun's part is played here with a real store, so that rank 0 can come last for certain."""
    import socket
    import time

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # torchrun's, for the test
    # both of a run's groups: the collectives', and rank 0's own (main_first)
    worker = ("import torch.distributed as dist\nfrom longcat_flash.distributed import env\nenv.init('cpu', 30)\n"
              "dist.barrier()\nwith env.main_first():\n    pass\nprint('met')\nenv.teardown()")  # as the CLI leaves

    def attempt(n: int, rank_0_after: float) -> list[subprocess.CompletedProcess]:
        procs = {}
        for rank in (1, 0):
            if rank == 0:
                time.sleep(rank_0_after)
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "TORCHELASTIC_USE_AGENT_STORE": "True",
                   "TORCHELASTIC_RESTART_COUNT": str(n), "OMP_NUM_THREADS": "1"}
            procs[rank] = subprocess.Popen([sys.executable, "-c", worker], env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
        try:
            return [subprocess.CompletedProcess(p.args, p.wait(timeout=60), *p.communicate()) for p in procs.values()]
        finally:
            for p in procs.values():
                p.kill()

    for n, rank_0_after in ((0, 0.0), (1, 4.0)):  # the first attempt leaves its addresses in the store
        for done in attempt(n, rank_0_after):
            assert done.returncode == 0 and "met" in done.stdout, f"attempt {n}: {done.stderr[-2000:]}"
    del store


STALLED_PEER = """
import os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
from longcat_flash import distributed as D
D.init("cpu", timeout_s=6)
mesh, rank = D.build_mesh(2, 2), dist.get_rank()
dist.barrier()  # all started: the stall below is the only wait
group = {0: mesh.get_group("ep"), 3: mesh.get_group("dp")}.get(rank)  # (0, 1) share ep, (1, 3) share dp
if rank == 1:  # stalled: it never joins, and leaves once the others gave up (after 25 s at most)
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and not all(Path(sys.argv[1], f"rank{r}.txt").exists() for r in (0, 3)):
        time.sleep(0.2)
elif group is not None:
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
        outcome = "all_reduce returned"
    except Exception as err:
        outcome = f"gave up after {time.monotonic() - start:.1f} s: {type(err).__name__}"
    Path(sys.argv[1], f"rank{rank}.txt").write_text(outcome)  # a file each: two ranks' prints interleave
os._exit(0)
"""


def test_the_mesh_groups_wait_the_dist_timeout_not_torchs_thirty_minutes(tmp_path):
    """--dist-timeout bounded only the world group's collectives: the mesh's dp and ep groups (the FSDP
    reduce-scatters, the experts' all-to-alls) took torch's default, so a stalled rank hung the others for half
    an hour instead of failing them after the timeout."""
    script = tmp_path / "stalled_peer.py"
    script.write_text(STALLED_PEER)
    torchrun(4, script, str(tmp_path), timeout=120)
    for rank in (0, 3):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert "gave up" in outcome and float(outcome.split("after ")[1].split(" s")[0]) < 15, (rank, outcome)

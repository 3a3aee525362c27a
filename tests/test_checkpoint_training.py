"""Training checkpoints: round trip, keep-last-k, atomic replacement, and clear errors for damaged ones."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longcat_flash.checkpoint import training
from longcat_flash.checkpoint.training import CheckpointError


class Box:
    """The smallest stateful object."""

    def __init__(self, value: float) -> None:
        self.value = torch.tensor([value])

    def state_dict(self) -> dict:
        return {"value": self.value.clone(), "note": ("a", 1)}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"].clone()


def test_round_trip_and_meta(tmp_path: Path):
    path = training.save(tmp_path, 7, {"a": Box(1.0), "b": Box(2.0)}, meta={"step": 7})
    assert path.name == "step_00000007"
    a, b = Box(0.0), Box(0.0)
    assert training.load(path, {"a": a, "b": b}) == {"step": 7}
    assert a.value.item() == 1.0 and b.value.item() == 2.0


def test_states_keep_their_structure_and_nothing_is_pickled(tmp_path: Path):
    weight = torch.randn(3, 4)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))])
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    state = {"tied": {"embed": weight, "head": weight}, "optimizer": opt.state_dict(),
             "rng": torch.get_rng_state(), "misc": [("x", 1, 2.5, None, True), float("inf")], "bf16": weight.bfloat16()}
    path = training.save_states(tmp_path, 1, {"s": state})
    got = training.load_states(path)[0]["s"]
    torch.testing.assert_close(got["tied"]["head"], weight, rtol=0, atol=0)
    assert list(got["optimizer"]["state"]) == [0]  # int keys stay ints
    torch.testing.assert_close(got["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert got["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert torch.equal(got["rng"], state["rng"]) and got["bf16"].dtype == torch.bfloat16
    assert got["misc"] == [("x", 1, 2.5, None, True), float("inf")]
    from safetensors import safe_open  # a plain safetensors file: tensors plus a JSON skeleton
    with safe_open(path / "s.safetensors", "pt") as f:
        assert training.SKELETON in f.metadata()


def test_keeps_the_newest_k_and_resolves_run_directories(tmp_path: Path):
    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        training.save(root, step, {"a": Box(step)}, keep=2)
    assert [p.name for p in training.list_checkpoints(root)] == ["step_00000020", "step_00000030"]
    assert training.resolve(tmp_path / "run") == root / "step_00000030"
    assert training.resolve(root) == root / "step_00000030"
    assert training.resolve(root / "step_00000020") == root / "step_00000020"


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    training.save(tmp_path, 1, {"a": Box(1.0)})

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for SIGKILL between two files

    monkeypatch.setattr(training, "write_safetensors", dies)
    with pytest.raises(KeyboardInterrupt):
        training.save(tmp_path, 2, {"a": Box(2.0)})
    monkeypatch.undo()
    assert training.latest_checkpoint(tmp_path).name == "step_00000001"  # the half-written one is invisible
    box = Box(0.0)
    training.load(training.resolve(tmp_path), {"a": box})
    assert box.value.item() == 1.0
    training.prune(tmp_path, keep=5)  # removes the temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_a_kill_while_pruning_leaves_no_step_directory_missing_files(tmp_path: Path, monkeypatch):
    """prune deleted an old checkpoint where it stood: a kill mid-delete left a step directory holding some of its
    files, which no later prune removed (it lists complete checkpoints only) and errors called a killed write."""
    for step in (1, 2, 3):
        training.save(tmp_path, step, {"a": Box(float(step))}, keep=5)

    def killed(path, *args, **kwargs):
        if files := [p for p in sorted(Path(path).rglob("*")) if p.is_file()]:  # (none: a name cleared first)
            files[0].unlink()  # one file gone, then SIGKILL
            raise KeyboardInterrupt

    monkeypatch.setattr(training.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        training.prune(tmp_path, keep=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_00000002",
                                                                                       "step_00000003"]
    training.prune(tmp_path, keep=2)  # the next save's prune clears what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    (tmp_path / ".tmp-old-step_00000002").mkdir()  # left by a prune killed before step 2 was saved again
    (tmp_path / ".tmp-old-step_00000002" / "rng.safetensors").write_bytes(b"")
    training.prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


def test_saving_the_same_step_again_swaps_it(tmp_path: Path):
    training.save(tmp_path, 3, {"a": Box(1.0)})
    training.save(tmp_path, 3, {"a": Box(5.0)})
    box = Box(0.0)
    training.load(tmp_path / "step_00000003", {"a": box})
    assert box.value.item() == 5.0 and len(list(tmp_path.iterdir())) == 1


def test_corrupt_file_is_a_clear_error(tmp_path: Path):
    training.save(tmp_path, 1, {"model": Box(1.0)})
    path = training.save(tmp_path, 2, {"model": Box(1.0)})
    data = bytearray((path / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt: model.safetensors \(model\) does not match its sha256"):
        training.load(path, {"model": Box(0.0)})
    only = training.save(tmp_path / "alone", 1, {"model": Box(1.0)})
    (only / "model.safetensors").write_bytes(bytes(data))  # the advice to go back one pointed nowhere
    with pytest.raises(CheckpointError, match="there is no earlier checkpoint: move step_00000001 out of"):
        training.load(only, {"model": Box(0.0)})
    (path / "model.safetensors").write_bytes(bytes(data[:100]))  # truncated: said so, not as a checksum
    with pytest.raises(CheckpointError, match=rf"model.safetensors \(model\) is 100 bytes where manifest.json says "
                                              rf"{len(data)}; to resume from the checkpoint before it"):
        training.load(path, {"model": Box(0.0)})
    (path / "model.safetensors").unlink()  # a node's shard lost with its disk: the same way back
    with pytest.raises(CheckpointError, match=r"model.safetensors \(model\) is missing; to resume from the checkpoint "
                                              "before it, move step_00000002 out of"):
        training.load(path, {"model": Box(0.0)})


@pytest.mark.parametrize("manifest", ["[1, 2]", '"x"', '{"files": [], "meta": {}}', '{"files": {"m": 3}, "meta": {}}',
                                      '{"files": {"m": {"file": "model.safetensors"}}, "meta": {}}'])
def test_a_manifest_of_another_shape_is_corrupt(tmp_path: Path, manifest):
    """Valid JSON of another shape raised AttributeError ('list' object has no attribute 'keys') from inside."""
    path = training.save(tmp_path, 1, {"model": Box(1.0)})
    (path / training.MANIFEST).write_text(manifest)
    with pytest.raises(CheckpointError, match=r"manifest.json is corrupt \("):
        training.load(path, {"model": Box(0.0)})


def test_missing_pieces_are_clear_errors(tmp_path: Path):
    path = training.save(tmp_path, 1, {"model": Box(1.0)})
    with pytest.raises(CheckpointError, match=r"has no state for \['optimizer'\]"):
        training.load(path, {"model": Box(0.0), "optimizer": Box(0.0)})
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors .model. is missing"):
        training.load(path, {"model": Box(0.0)})
    (path / training.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        training.resolve(path)
    with pytest.raises(CheckpointError, match=f"{path.name} has no manifest.json .an interrupted write"):
        training.resolve(tmp_path)  # the root: only an interrupted write there, and the error says so
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        training.resolve(tmp_path / "elsewhere")


def test_state_that_does_not_fit_names_the_object(tmp_path: Path):
    path = training.save(tmp_path, 1, {"model": torch.nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match="'model' state does not fit"):
        training.load(path, {"model": torch.nn.Linear(3, 2)})


def test_a_shard_that_cannot_be_written_is_one_error_naming_the_rank(tmp_path: Path, monkeypatch):
    """DCP reports a full disk as a CheckpointException (a BaseException, past every `except Exception`) holding
    each failed rank's error and traceback; the sharded save raises one OSError that says what happened where."""
    from torch.distributed.checkpoint.api import CheckpointException

    from longcat_flash.checkpoint import sharded

    def full_disk(*args, **kwargs):
        raise CheckpointException("failed", {0: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(sharded.dcp, "save", full_disk)
    with pytest.raises(OSError, match=r"rank 0 could not write its shard: \[Errno 28\] No space left on device"):
        sharded.save(tmp_path / "shards", {"model": {"w": torch.ones(2)}})

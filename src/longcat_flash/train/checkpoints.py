"""Training checkpoints as the trainer lays them out: the small states (sampler, controller, RNG, counters) and the
manifest through checkpoint/training.py (atomic, checksummed), the model's and Adam's tensors through
torch.distributed.checkpoint in SHARDED. Every rank saves and restores its own pieces (`save_checkpoint`,
`load_checkpoint`, any world size and layout on resume); `read_checkpoint` / `write_checkpoint` hold the whole state
in one process (model growth, analysis)."""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .. import distributed
from ..device import compute_dtype
from ..checkpoint import sharded, training
from .config import CHECKPOINTS, SHARDED, TrainConfig, absolute_paths, settings
from .optim import lr_factor, param_name

if TYPE_CHECKING:
    from .trainer import Run


def _data_changes(path: Path, cfg: TrainConfig) -> str:
    """The data settings `cfg` changes against those checkpoint `path` was trained with, as "key: old -> new"
    (empty when none did: the files themselves changed)."""
    saved = saved_train_config(path)
    pairs = [(f"data.{key}", getattr(saved.data, key), getattr(cfg.data, key))
             for key in ("source", "text_field", "max_bytes", "tokenizer", "seq_len", "copy_fraction", "val_fraction")]
    pairs += [(f"sft.{key}", getattr(saved.sft, key), getattr(cfg.sft, key))
              for key in ("data", "val_data", "ignore_columns", "overlong")]
    return ", ".join(f"{key}: {old} -> {new}" for key, old, new in pairs if old != new)


def save_checkpoint(run: Run) -> Path:
    """Every rank writes its shards of the model and optimizer into one temporary directory in parallel; rank 0
    adds the small states and the manifest and renames it into place (checkpoint/training.py)."""
    root, step = run.out / CHECKPOINTS, run.state.step

    def failure(err: OSError, by: str = " (rank 0)") -> str:  # DCP's errors name their ranks themselves
        return f"cannot write checkpoint step {step} in {root}{by}: {err}"

    failed = ""
    if distributed.is_main():
        try:
            training.temporary_dir(root, step)
        except OSError as err:
            failed = failure(err)
    distributed.raise_if_any(failed, training.CheckpointError)  # the directory exists, empty, before any write
    tmp = training.temporary_path(root, step)
    try:
        try:
            sharded.save(tmp / SHARDED, run.sharded_state())  # raises on every rank alike
        except OSError as err:
            raise training.CheckpointError(failure(err, by="")) from None
        distributed.barrier()  # every shard is written before rank 0's manifest covers them
        if distributed.is_main():
            meta = {"step": step, "train_config": run.cfg.to_dict(), "val_digest": run.val.digest,
                    "ep": run.mesh["ep"].size() if run.mesh is not None else 1}  # the layout a resume takes again
            states = {name: obj.state_dict() for name, obj in run.stateful().items()}
            try:
                training.commit(tmp, step, states, meta, keep=run.cfg.checkpoint.keep)
            except OSError as err:
                failed = failure(err)
        distributed.raise_if_any(failed, training.CheckpointError)  # no rank left waiting for rank 0
    except BaseException as err:  # Ctrl-C or SIGTERM mid-write, a full disk: no hidden half-written copy stays
        # behind; under torchrun only when every rank has stopped writing (the CheckpointErrors above are raised on
        # all of them together), else the next save clears it
        if distributed.is_main() and (distributed.world_size() == 1 or isinstance(err, training.CheckpointError)):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return training.step_dir(root, step)


def load_checkpoint(run: Run, path: Path, same_data: bool = True) -> str:
    """Restore `run` from checkpoint `path`, whatever world size and layout wrote it. Each rank verifies a share
    of the files' checksums (all ranks stop together on a bad one) and reads only its own pieces. The training and
    validation data must be those it was checkpointed on, unless same_data=False (--accept-changed-data); returns
    a note of what differs then ("" if nothing)."""
    try:
        states, meta = training.load_states(path, share=(distributed.rank(), distributed.world_size()))
        failed = ""
    except training.CheckpointError as err:
        states, meta, failed = {}, {}, str(err)
    distributed.raise_if_any(failed, training.CheckpointError)
    for name in run.stateful():
        if name not in states:
            raise training.CheckpointError(f"checkpoint {path} has no state for {name!r}")
    note = _restore_data(run, path, states, meta, same_data)
    for name, obj in run.stateful().items():
        if obj is not run.sampler:
            obj.load_state_dict(states[name])
    tensors = run.sharded_state()  # allocated (the optimizer's moments too) and sharded as this run wants them
    saved = sharded.shapes(path / SHARDED)
    missing = [k for k in tensors["model"] if f"model.{k}" not in saved]
    if missing:
        raise training.CheckpointError(f"checkpoint {path} does not fit this model: no weights for {missing[:5]}")
    for name, tensor in tensors["model"].items():  # DTensors report their full shape
        if saved[f"model.{name}"] != tensor.shape:
            raise training.CheckpointError(f"checkpoint {path} does not fit this model: {name} is "
                                           f"{tuple(saved[f'model.{name}'])} there, {tuple(tensor.shape)} here")
    # A parameter that had no gradient before the checkpoint (the MTP head before loss.mtp_start_step) has no
    # Adam state in it, and gets none now either.
    fresh = [name for name in tensors["optimizer"] if f"optimizer.{name}.exp_avg" not in saved]
    for name in fresh:
        del tensors["optimizer"][name]
    sharded.load(path / SHARDED, tensors)
    set_model_state_dict(run.model, tensors["model"], options=StateDictOptions(strict=False))  # a tied head
    groups = get_optimizer_state_dict(run.model, run.optimizer)["param_groups"]
    set_optimizer_state_dict(run.model, run.optimizer, {"state": tensors["optimizer"], "param_groups": groups},
                             options=StateDictOptions(strict=False))
    by_name = {param_name(n): p for n, p in run.model.named_parameters()}
    for name in fresh:
        run.optimizer.state.pop(by_name[name], None)
    return note


def _restore_data(run: Run, path: Path, states: dict[str, Any], meta: dict[str, Any], same_data: bool) -> str:
    """The sampler's state, once the training and validation data are found to be those checkpoint `path` was
    taken on; with same_data=False, whatever they are now, and a note of what differs ("" if nothing)."""
    try:
        windows = run.sampler.load_state_dict(states["sampler"], same_data)
    except ValueError as err:
        changed = _data_changes(path, run.cfg)
        raise ValueError(f"{err}; changed since: {changed}" if changed else str(err)) from None
    held_out = meta.get("val_digest", run.val.digest) != run.val.digest  # checkpoints before it lack it
    if not (windows or held_out):
        return ""
    changed = _data_changes(path, run.cfg)  # the settings behind the difference, where they changed
    if held_out and same_data:
        raise ValueError(f"a resumed run keeps its held-out data, but the validation conversations (or windows) "
                         f"differ from those checkpoint {path} was evaluated on, so val_loss would change meaning "
                         f"midway{f'; changed since: {changed}' if changed else ''} (--accept-changed-data goes on "
                         f"with them as they are now)")
    notes = ([windows] if windows else []) + ([f"the validation data differs: val_loss after step {meta['step']} "
                                               "does not compare with the values before it"] if held_out else [])
    after = ("the run goes on from there, no longer bit for bit the run it would have been" if windows else
             "the training steps are those the run would have taken")
    return (f"note: resumed on changed data (--accept-changed-data{f'; changed since: {changed}' if changed else ''}"
            f"): {'; '.join(notes)}; {after}")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(states, meta) of a training checkpoint, every state whole, in one process (model growth, analysis):
    the small objects' states, "model" {name: tensor} and "optimizer" {name: {"exp_avg", "exp_avg_sq", "step"}}."""
    path = training.resolve(path)
    states, meta = training.load_states(path)
    model: dict[str, torch.Tensor] = {}
    optimizer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sharded.read_full(path / SHARDED).items():
        part, _, rest = key.partition(".")
        if part == "model":
            model[rest] = tensor
        else:
            name, _, field_name = rest.rpartition(".")
            optimizer.setdefault(name, {})[field_name] = tensor
    return {**states, "model": model, "optimizer": optimizer}, meta


def write_checkpoint(root: Path, step: int, states: dict[str, Any], meta: dict[str, Any]) -> Path:
    """The inverse of `read_checkpoint`, in one process: a checkpoint any world size can resume from."""
    tmp = training.temporary_dir(root, step)
    sharded.save(tmp / SHARDED, {"model": states["model"], "optimizer": states["optimizer"]})
    small = {k: v for k, v in states.items() if k not in ("model", "optimizer")}
    return training.commit(tmp, step, small, meta)


def newest_checkpoint(out: str | Path) -> Path:
    """The checkpoint a resumed run in directory `out` continues from: its newest (a checkpoint, or a run's
    checkpoints folder, given in its place is refused: _check_run_directory)."""
    _check_run_directory(out)
    return training.resolve(out)


def has_checkpoint(out: str | Path) -> bool:
    """Whether run directory `out` holds a checkpoint to resume (`--auto-resume`: the command that started a run
    also continues it, as torchrun --max-restarts or a requeued job reruns it); a checkpoint, or a run's checkpoints
    folder, given in its place is refused as newest_checkpoint refuses it."""
    _check_run_directory(out)
    return bool(training.list_checkpoints(Path(out) / CHECKPOINTS))


def _check_run_directory(out: str | Path) -> None:
    """Refuse a checkpoint, or a run's checkpoints folder, where a run directory belongs: the run would go on inside
    it (its metrics, weights and later checkpoints written there, the run itself left as it was)."""
    out = Path(out)
    if (out / CHECKPOINTS).is_dir() and not (out / training.MANIFEST).is_file() and training.list_checkpoints(out):
        stray = training.list_checkpoints(out)[-1].name  # moved there out of its checkpoints folder, most likely
        raise ValueError(f"{out} holds the checkpoint {stray} beside its {CHECKPOINTS} folder: move {stray} to a "
                         "place outside the run directory")
    if (out / training.MANIFEST).is_file() or training.list_checkpoints(out):
        inside = out.parent if (out / training.MANIFEST).is_file() else out
        run = inside.parent if inside.name == CHECKPOINTS else inside
        raise ValueError(f"{out} is {'a checkpoint' if inside is not out else 'the checkpoints folder'} of the run "
                         f"in {run}, not a run directory: resume {run}, which continues from its newest checkpoint "
                         f"(to go back to an earlier one, first move the later ones out of {inside})")


def saved_train_config(checkpoint: str | Path) -> TrainConfig:
    """The TrainConfig `checkpoint` was saved with (from its manifest, the files' sizes checked: their checksums are
    verified when it is loaded)."""
    return TrainConfig.from_dict(training.read_meta(checkpoint)["train_config"])


def resume_config(out: str | Path) -> TrainConfig:
    """The TrainConfig saved with the newest checkpoint of run directory `out`."""
    return saved_train_config(newest_checkpoint(out))


def _newest_config_and_step(out: str | Path) -> tuple[TrainConfig, int]:
    """The TrainConfig and step of run directory `out`'s newest checkpoint (its manifest, sizes checked)."""
    meta = training.read_meta(newest_checkpoint(out))
    return TrainConfig.from_dict(meta["train_config"]), meta["step"]


def resumed_ep(out: str | Path, world: int) -> tuple[int | None, str | None]:
    """The expert-parallel degree a resume of run directory `out` over `world` processes takes when neither --ep
    nor --dp is given: the checkpoint's where it divides the world (at the world that wrote it, the same layout:
    bit for bit), else none; and a note saying which."""
    ep = training.read_meta(newest_checkpoint(out)).get("ep", 1)  # written before it was recorded: taken as 1
    if ep == 1:
        return None, None
    if world % ep == 0:
        return ep, f"note: resuming with the checkpoint's expert parallelism, --ep {ep} (--ep or --dp changes it)"
    return None, (f"note: the checkpoint was written with --ep {ep}, which does not divide the world size {world}: "
                  "resuming without expert parallelism (the losses go on as in any other layout, not bitwise)")


def validation_notice(out: str | Path, cfg: TrainConfig) -> str | None:
    """A note when resuming run directory `out` with `cfg` changes which held-out windows val_loss averages over
    (data.val_batches whole global batches of data.batch_size windows each); None when it keeps them."""
    saved, step = _newest_config_and_step(out)
    changes = [f"data.{key} {getattr(saved.data, key)} -> {getattr(cfg.data, key)}"
               for key in ("batch_size", "val_batches") if getattr(saved.data, key) != getattr(cfg.data, key)]
    if not changes:
        return None
    return (f"note: {' and '.join(changes)} may change which held-out windows val_loss averages over: compare "
            f"val_loss after step {step} with the values before it with care")


# Fields a resumed run may change without changing its steps (what it logs, samples, saves, or how it computes the
# same numbers; where its data files moved, whose contents are checked on their own), or whose change has a note
# of its own (the LR schedule's; dtype and deterministic: below)
SAME_STEPS = ("max_steps", "optim.lr", "schedule.", "eval_every", "tensorboard", "sample_", "max_consecutive_skips",
              "activation_checkpointing", "loss.monitor_every", "data.val_batches", "data.cache_dir", "checkpoint.",
              "data.source", "data.tokenizer", "sft.data", "sft.val_data", "init_from", "preset", "dtype",
              "deterministic")


def exactness_notice(out: str | Path, cfg: TrainConfig, device: torch.device) -> str | None:
    """A note when resuming run directory `out` with `cfg` on `device` changes what its steps compute (a loss
    weight, the budget controller, the optimizer, the batch: any field but SAME_STEPS), the compute dtype, or
    turns the deterministic kernels off: the run goes on, but its steps are no longer bit for bit those it would
    have taken uninterrupted. None when nothing of that changes."""
    saved, step = _newest_config_and_step(out)
    # a path as given or resolved; the model a resumed run keeps (check_resumable)
    before, after = (settings(absolute_paths(c), omit=("model",)) for c in (saved, cfg))
    changes = [f"{key} {before[key]} -> {after[key]}" for key in after
               if before.get(key) != after[key] and not key.startswith(SAME_STEPS)]
    dtype = compute_dtype(cfg.dtype, device)
    changes += [f"dtype {saved.dtype} -> {dtype}"] if dtype != saved.dtype else []
    changes += ["deterministic true -> false"] if saved.deterministic and not cfg.deterministic else []
    if not changes:
        return None
    return (f"note: {' and '.join(changes)}: the steps after {step} will not be bit for bit those of the run "
            "uninterrupted")


def schedule_notice(out: str | Path, cfg: TrainConfig) -> str | None:
    """What resuming run directory `out` with `cfg` does to the LR where the schedule changed (its length, peak
    or shape), naming the changes: the schedule is a function of (step, max_steps), so a longer run resumes on
    the longer schedule's curve (as torchtitan does), which can jump. None when the LR continues as it was, or
    when the run cannot continue (its checkpoint past max_steps: the trainer refuses it)."""
    saved, step = _newest_config_and_step(out)
    fields = [("max_steps", saved.max_steps, cfg.max_steps), ("optim.lr", saved.optim.lr, cfg.optim.lr)]
    fields += [(f"schedule.{f.name}", getattr(saved.schedule, f.name), getattr(cfg.schedule, f.name))
               for f in dataclasses.fields(cfg.schedule)]
    changes = [f"{key} {old} -> {new}" for key, old, new in fields if old != new]
    if not changes or step > cfg.max_steps:
        return None
    after = lr_factor(cfg.schedule, step, cfg.max_steps) * cfg.optim.lr  # logged step + 1 (lr_factor's 0-based)
    if step < saved.max_steps:  # the run's own schedule at the same step: the LR's own movement is no change
        before = lr_factor(saved.schedule, step, saved.max_steps) * saved.optim.lr
        effect = f"step {step + 1} runs at LR {after:.3g}, where the run's schedule had {before:.3g}"
    else:  # a finished run made longer: its schedule ended at its last step
        if math.isclose(lr_factor(saved.schedule, step, saved.max_steps) * saved.optim.lr, after, rel_tol=0.05):
            return None  # the step after its end on its own curve (a warmup still climbing, a constant LR)
        before = lr_factor(saved.schedule, step - 1, saved.max_steps) * saved.optim.lr
        effect = f"the LR goes from {before:.3g} (step {step}, the run's last) to {after:.3g} (step {step + 1})"
    if math.isclose(before, after, rel_tol=0.05):
        return None
    return (f"note: {' and '.join(changes)} reshape{'s' if len(changes) == 1 else ''} the {cfg.schedule.kind} LR "
            f"schedule: {effect}")

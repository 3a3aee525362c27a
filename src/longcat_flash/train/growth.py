"""Model growth by layer stacking (report §3.1.2): an L-layer model from a trained L/r-layer one, r = 2 in the report.

The whole small stack is repeated, not each layer: layers [0..n-1] become [0..n-1, 0..n-1, ...] (block
repeat). Everything else (embeddings, final norm, lm_head, MTP head) is copied once. The training state is
kept: Adam moments are stacked exactly like the weights, the budget controller's per-layer state and the
router biases too, and the step, sampler position and RNG are untouched, so the LR schedule and the data
stream continue where the small model stopped. Pure functions over state dicts, and `grow_run`, which applies
them to a run directory for `longcat grow SRC --out DST`.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..chat_template import CONFIG_FILE, TEMPLATE_DIR, TEMPLATE_FILE
from ..checkpoint import hf, training
from ..config import ModelConfig
from ..data.dataset_folders import RUN_CONFIG_FILE, RUN_LOCK_FILE
from ..device import host_memory_bytes
from ..model import Transformer
from ..tokenizer import TOKENIZER_FILE
from . import run_lock
from .checkpoints import read_checkpoint, saved_train_config, write_checkpoint
from .config import CHECKPOINTS, TrainConfig
from .metrics import METRICS_FILE, keep_metrics_until

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def grown_names(name: str, n_layers: int, r: int) -> list[str]:
    """The names `name` is copied to: r names for a trunk layer's tensor, itself otherwise."""
    match = LAYER_KEY.match(name)
    if not match:
        return [name]
    layer, rest = int(match.group(1)), match.group(2)
    if layer >= n_layers:
        raise ValueError(f"{name!r} has layer {layer}, but the source model has {n_layers} layers")
    return [f"model.layers.{layer + k * n_layers}.{rest}" for k in range(r)]


def check_factor(r: int) -> None:
    """The growth factor r, refused before any weights are read."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 2:  # 1 would copy the model and call it grown
        raise ValueError(f"growth factor r (--factor) must be an integer >= 2, got {r!r}")


def grow_model_config(cfg: ModelConfig, r: int = 2) -> ModelConfig:
    check_factor(r)
    return cfg.replace(num_layers=cfg.num_layers * r)


def grow_state_dict(state: dict[str, torch.Tensor], n_layers: int, r: int = 2) -> dict[str, torch.Tensor]:
    """Model weights and buffers of an n_layers model -> those of an n_layers * r model (copies, not views)."""
    return {new: tensor.clone() for name, tensor in state.items() for new in grown_names(name, n_layers, r)}


def grow_optimizer_state(state: dict[str, dict[str, Any]], n_layers: int, r: int = 2) -> dict[str, Any]:
    """Adam state by parameter name ({name: {"exp_avg", "exp_avg_sq", "step"}}) for the grown model."""
    return {new: {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items()}
            for name, entry in state.items() for new in grown_names(name, n_layers, r)}


def grow_controller_state(state: dict[str, Any], r: int = 2) -> dict[str, Any]:
    """Budget controller state: per-layer rows (L, E) repeated as whole stacks, like the layers."""
    return {k: v.repeat(r, 1) if torch.is_tensor(v) else v for k, v in state.items()}


# ---- on disk: a run directory (or an HF model directory) in, a grown one out ----

def grow_run(src: str | Path, dst: str | Path, r: int = 2, device: torch.device | str = "cpu") -> Path:
    """Grow `src` (a run directory or checkpoint, or an HF model directory) into `dst`; returns the new
    checkpoint (or model) directory. A grown run continues with `longcat train --resume DST`. An HF model is
    grown on `device`; a training checkpoint's state is rewritten on the CPU, one tensor at a time."""
    src, dst = Path(src), Path(dst)
    check_factor(r)  # before any weights are read
    if not src.is_dir():
        raise ValueError(f"{src} {'is not a directory' if src.exists() else 'does not exist'}: grow a run "
                         "directory, one of its checkpoints, or an HF model directory")
    _check_empty(dst, but=RUN_LOCK_FILE)  # (a lock file alone: a grow killed there, or one going on now)
    run = src.resolve().parent.parent if (src / training.MANIFEST).is_file() else src  # a checkpoint's run
    live = run if (run / RUN_LOCK_FILE).exists() else None  # a run directory that is, or was, trained
    made = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    run_lock.hold(dst)  # a second grow into DST at the same time is refused, not interleaved with this one
    try:
        _check_empty(dst, but=RUN_LOCK_FILE)  # the other grow may have finished before this one held DST
        if live is not None:
            _hold_source(live)
        try:
            return _grow(src, dst, r, device)
        except BaseException:  # a failed or stopped write (Ctrl-C, SIGTERM): DST ends empty, to run again
            for path in dst.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.name != RUN_LOCK_FILE:
                    path.unlink()
            raise
    finally:
        (dst / RUN_LOCK_FILE).unlink(missing_ok=True)  # DST holds what was grown, or (refused) nothing
        if made and not any(dst.iterdir()):
            dst.rmdir()
        for held in (dst, live):
            if held is not None:
                run_lock.release(held)


def _hold_source(run: Path) -> None:
    """The source run's lock while it is read: not while it trains, as its newest checkpoint could go (pruned)
    mid-read. A run this user cannot write to (a colleague's, a read-only mount) is read without it."""
    try:
        run_lock.hold(run)
    except run_lock.RunDirectoryInUse as err:
        raise run_lock.RunDirectoryInUse(f"{run} is being trained (pid {err.owner}): grow it once that run stops (a "
                                         "checkpoint may be pruned while it is read)", err.owner) from None
    except OSError:  # EACCES, EROFS: nobody this process could lock out either
        pass


def _check_empty(dst: Path, but: str | None = None) -> None:
    """Weights, shards, a run in `dst`: the writer would replace or delete them."""
    if dst.is_dir() and (held := sorted(path.name for path in dst.iterdir() if path.name != but)):
        raise ValueError(f"--out {dst} holds {', '.join(held[:4])}{' ...' if len(held) > 4 else ''}; the grown "
                         "run or model goes into a new or empty directory")


def _grow(src: Path, dst: Path, r: int, device: torch.device | str) -> Path:
    if (src / "config.json").is_file() and not training.list_checkpoints(src / CHECKPOINTS):  # pruned: the model
        device = torch.device(device)
        if device.type == "cpu":  # the bytes per parameter of its files (bf16: ~2, fp32 with fp32 routers: 4)
            files = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            _check_fits(ModelConfig.from_json(src), r, "weights", source_files=files)
        return _grow_hf_model(src, dst, r, device)
    checkpoint = training.resolve(src)
    saved = saved_train_config(checkpoint).model
    _check_fits(saved, r, "fp32 weights and Adam's two moments", bytes_per_parameter=12)
    states, meta = read_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(meta["train_config"])
    n = cfg.model.num_layers
    cfg = dataclasses.replace(cfg, model=grow_model_config(cfg.model, r))
    states = {**states, "model": grow_state_dict(states["model"], n, r),
              "optimizer": grow_optimizer_state(states["optimizer"], n, r)}
    if "controller" in states:
        states["controller"] = grow_controller_state(states["controller"], r)
    meta = {**meta, "train_config": cfg.to_dict(), "grown_from": str(checkpoint)}
    out = write_checkpoint(dst / CHECKPOINTS, meta["step"], states, meta)
    (dst / RUN_CONFIG_FILE).write_text(cfg.to_json())
    _copy_run_files(checkpoint.parent.parent, dst, meta["step"])
    return out


def _check_fits(cfg: ModelConfig, r: int, holds: str, bytes_per_parameter: float | None = None,
                source_files: int = 0) -> None:
    """Refuse a grown model this machine's memory cannot hold, before building anything (a large --factor ran
    until memory ran out). Counted on the meta device: the layers it adds are copies of the source's, and the
    source's state stays in memory while they are made. Without bytes_per_parameter: the source files' own."""
    with torch.device("meta"):
        model = Transformer(cfg)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    source = model.num_parameters()
    grown = source + (r - 1) * cfg.num_layers * per_layer
    need, have = (source + grown) * (bytes_per_parameter or source_files / source), host_memory_bytes()
    if need > have:
        raise ValueError(f"--factor {r} grows a model of {grown / 1e9:.1f}B parameters: its {holds} and the "
                         f"source's need {need / 2**30:.0f} GiB; this machine has {have / 2**30:.0f} GiB")


def _grow_hf_model(src: Path, dst: Path, r: int, device: torch.device) -> Path:
    """The grown model holds the grown copies themselves, in the source's dtypes: it built an fp32 model beside
    them and the source (11.3 GiB at peak for the bench preset's 0.9B bf16 weights grown x2, against 5.1)."""
    small = hf.from_pretrained(src, device=device)
    cfg, dtype = small.config, small.lm_head.weight.dtype
    state = grow_state_dict(small.state_dict(), cfg.num_layers, r)
    del small
    with torch.device("meta"):
        grown = Transformer(grow_model_config(cfg, r))
    grown.load_state_dict(state, assign=True)
    hf.save_pretrained(grown, dst, dtype=dtype)  # the source's (a bf16 model stays bf16)
    _copy_run_files(src, dst, None)
    return dst


def _copy_run_files(src: Path, dst: Path, step: int | None) -> None:
    """The tokenizer, the generation defaults (eos ids, sampling: what `serve` starts requests from), and the
    metrics up to the growth step, so the grown run's history continues."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE, hf.GENERATION_CONFIG):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / TEMPLATE_DIR).is_dir():  # transformers 5's named chat templates (tool_use, ...)
        shutil.copytree(src / TEMPLATE_DIR, dst / TEMPLATE_DIR)
    if step is not None and (src / METRICS_FILE).is_file():
        keep_metrics_until(src / METRICS_FILE, dst / METRICS_FILE, step)

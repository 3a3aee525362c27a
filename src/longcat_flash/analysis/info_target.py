"""What `longcat info` describes: a preset, a model directory, a training run's directory or one of its
checkpoints, read as its model config, and the K_e a run held."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from ..presets import PRESETS, get_preset


def config_of(target: str) -> ModelConfig:
    """A preset name, a checkpoint directory holding config.json (a name that is both is refused), or a run
    directory before its model is exported (running, or grown and not yet resumed): its newest checkpoint's."""
    if not target:  # Path("") is the current directory
        raise ValueError(f"no model given: name a preset ({', '.join(sorted(PRESETS))}) or a model or run directory")
    path = Path(target)
    if target in PRESETS:
        if (path / "config.json").is_file():
            raise ValueError(f"{target!r} is both a preset and a checkpoint directory here; write "
                             f"./{target} for the directory")
        return get_preset(target)
    if (checkpoint := _training_checkpoint(path)) is not None:
        from ..train.checkpoints import saved_train_config

        return saved_train_config(checkpoint).model
    if path.is_dir():
        from ..checkpoint.hf import checkpoint_config

        try:  # its shape, whatever its weights' format (the official FP8 release's too)
            return checkpoint_config(path, prequantized=True)  # as its files hold it (no MTP head where none was saved)
        except FileNotFoundError:  # a config.json without weights
            return ModelConfig.from_json(path, prequantized=True)
    raise ValueError(f"{target!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     "nor a directory with config.json")


def run_budget_target(target: str) -> float | None:
    """The K_e a training run's budget controller held (its budget.target), for a run directory; None for a preset,
    a model directory or a run at the default target."""
    from ..data.dataset_folders import RUN_CONFIG_FILE

    saved = Path(target) / RUN_CONFIG_FILE
    if target in PRESETS:
        return None
    if not saved.is_file():  # one of a run's checkpoints: the settings it was saved with
        if (checkpoint := _training_checkpoint(Path(target))) is None:
            return None
        from ..train.checkpoints import saved_train_config

        return saved_train_config(checkpoint).budget.target
    try:
        budget = json.loads(saved.read_text()).get("budget")
    except (OSError, ValueError, AttributeError):  # unreadable: the model's default, as for a model directory
        return None
    target = budget.get("target") if isinstance(budget, dict) else None
    return float(target) if isinstance(target, (int, float)) and not isinstance(target, bool) else None


def _training_checkpoint(path: Path) -> Path | None:
    """The training checkpoint a directory without config.json names: a run's newest (a run still training, or
    grown and not yet resumed), its `checkpoints/` folder's newest, or one step's own; None for anything else."""
    from ..checkpoint import training

    if not path.is_dir() or (path / "config.json").exists():
        return None
    if (path / "checkpoints").is_dir() or (path / training.MANIFEST).is_file() or training.latest_checkpoint(path):
        return training.resolve(path)
    return None

"""Metrics sinks: OUT/metrics.jsonl (one JSON object per step), the console progress bar, and TensorBoard.

On resume the JSONL file is cut back to the checkpoint's step, so a resumed run's file reads exactly like an
uninterrupted one (timings aside).
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"  # in the run directory, with --tensorboard
# What the progress bar shows, in order, with its short label.
CONSOLE = (("loss", "loss"), ("val_loss", "val"), ("lr", "lr"), ("tokens_per_s", "tok/s"),
           ("ffn_experts_per_token", "ffn/tok"), ("ffn_experts_std", "std"))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of the one in run directory `path`). A last line cut short (the run
    was killed, or the disk filled, mid-write) is left out; a bad line before it is an error naming it."""
    path = Path(path)
    file = path / METRICS_FILE if path.is_dir() else path
    lines = [(number, line) for number, line in enumerate(file.read_text().splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{file}:{number}: not a JSON record ({err.msg})") from None
    return records


def keep_metrics_until(src: Path, dst: Path, step: int) -> None:
    """Write the records of metrics file `src` up to `step` to `dst` (which may be `src`), atomically: a kill
    keeps the old file."""
    kept = [r for r in read_metrics(src) if r["step"] <= step] if src.exists() else []
    atomic_write_text(dst, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsLog:
    def __init__(self, out: Path, start_step: int, total_steps: int, *, tensorboard: bool = False,
                 progress: bool = True) -> None:
        """start_step: optimizer steps already done (lines for later steps, from a killed run, are dropped)."""
        self.path = out / METRICS_FILE
        keep_metrics_until(self.path, self.path, start_step)
        self.file = self.path.open("a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not progress,
                        dynamic_ncols=True)
        self.writer = _tensorboard(out, start_step) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.bar.set_postfix_str(_short(record), refresh=False)  # before the update draws step n: its figures
        self.bar.update(1)
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def note(self, text: str) -> None:
        """A line above the progress bar (validation results, checkpoints)."""
        self.bar.write(text)

    def close(self) -> None:
        self.file.close()
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _short(record: dict[str, Any]) -> str:
    parts = []
    for key, label in CONSOLE:
        value = record.get(key)
        if isinstance(value, float) and math.isfinite(value):
            parts.append(f"{label}={value:.3g}" if key != "tokens_per_s" else f"{label}={value:.0f}")
    return " ".join(parts) + (" SKIPPED" if record.get("skipped") else "")


def require_tensorboard() -> None:
    """A run asked for tensorboard: fail before any work (not at the first log line) when it is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("tensorboard=true needs the tensorboard package: pip install tensorboard")


def _tensorboard(out: Path, start_step: int) -> Any:
    """The run's event writer; the events of steps after `start_step` that a killed run wrote are dropped, as its
    metrics.jsonl lines are (TensorBoard showed the steps trained again twice)."""
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=start_step + 1)

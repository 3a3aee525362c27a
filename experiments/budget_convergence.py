"""Budget-control convergence of a training run (report §2.1.1, Fig. 3b/3c), from its metrics.jsonl.

    python experiments/budget_convergence.py RUN [--window 10] [--tolerance 0.03] [--out DIR]

RUN: a `longcat train` run directory, or its metrics.jsonl; the run's model needs zero experts (else every token
gets all top-k FFN experts and there is no budget to control: its train_config.json says). Reports when the rolling
mean of FFN experts per token enters, and stays within, ±tolerance of K_e; the mean, worst single step and
per-layer means over the tail (the last 50 steps, or every step of a shorter run: `tail_steps` says how many; a
layer added mid-run by `longcat grow` is averaged over the tail steps that have it: `tail_layer_steps`); and the
per-token std (tokens keep getting different compute). Writes budget_convergence.json and, with matplotlib,
budget_convergence.png into --out (default: the run's directory).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from common import directory_problem, positive_float, positive_int

from longcat_flash.data.dataset_folders import RUN_CONFIG_FILE
from longcat_flash.train.config import TrainConfig
from longcat_flash.train.metrics import METRICS_FILE, read_metrics

TAIL = 50  # steps summarised at the end of the run
KEYS = ("step", "skipped", "ffn_experts_target", "ffn_experts_per_token", "ffn_experts_per_layer", "ffn_experts_std")


def load(run: Path) -> list[dict]:
    """The budget records (skipped steps left out) of the `longcat train` run at `run`, a run directory or its
    metrics.jsonl; ValueError, naming the file, for anything else or a model without zero experts."""
    file = run / METRICS_FILE if run.is_dir() else run
    if not run.exists():
        raise ValueError(f"{run} does not exist: give a `longcat train` run directory or its {METRICS_FILE}")
    if not file.is_file():
        raise ValueError(f"{run} holds no {METRICS_FILE}: give a `longcat train` run directory or its {METRICS_FILE}")
    records = read_metrics(file)  # a malformed line: ValueError naming it
    for number, record in enumerate(records, 1):
        if missing := [key for key in KEYS if not isinstance(record, dict) or key not in record]:
            raise ValueError(f"{file}: record {number} lacks {', '.join(missing)}: not a `longcat train` run's metrics")
    if not (records := [r for r in records if not r["skipped"]]):
        raise ValueError(f"{file} holds no completed training step")
    if zero_experts(file.parent / RUN_CONFIG_FILE) == 0:
        raise ValueError(f"{run}: the run's model has no zero experts (model.zero_expert_num=0), so every token gets "
                         "all top-k FFN experts: there is no budget to control")
    return records


def zero_experts(config: Path) -> int:
    """model.zero_expert_num of the run whose train_config.json is `config`."""
    if not config.is_file():
        raise ValueError(f"{config} is missing: it says whether the run's model has zero experts")
    try:
        return TrainConfig.from_json(config).model.zero_expert_num
    except ValueError as err:
        raise ValueError(f"{config}: {err}") from None


def per_layer(records: list[dict]) -> list[tuple[list[int], list[float]]]:
    """(steps, FFN experts per token) of each layer, over the records that have it: a run grown mid-way (`longcat
    grow`, then resumed) logs its added layers from the growth step on."""
    layers: list[tuple[list[int], list[float]]] = []
    for r in records:
        for layer, value in enumerate(r["ffn_experts_per_layer"]):
            if layer == len(layers):
                layers.append(([], []))
            layers[layer][0].append(r["step"])
            layers[layer][1].append(value)
    return layers


def summarize(records: list[dict], window: int, tolerance: float) -> dict:
    target = records[0]["ffn_experts_target"]
    ffn = [r["ffn_experts_per_token"] for r in records]
    rolling = [statistics.fmean(ffn[max(0, i - window + 1): i + 1]) for i in range(len(ffn))]
    inside = [abs(v - target) / target <= tolerance for v in rolling]
    settled = next((i for i in range(len(inside)) if all(inside[i:])), None)
    tail = records[-TAIL:]
    tail_ffn = [r["ffn_experts_per_token"] for r in tail]
    layers = [values for _, values in per_layer(tail)]
    return {
        "target": target, "steps": len(records), "window": window, "tolerance": tolerance,
        "settled_step": None if settled is None else records[settled]["step"], "tail_steps": len(tail),
        "tail_mean": statistics.fmean(tail_ffn),
        "tail_mean_rel_error": statistics.fmean(tail_ffn) / target - 1,
        "tail_worst_step_rel_error": max(abs(v / target - 1) for v in tail_ffn),
        "tail_worst_rolling_rel_error": max(abs(v / target - 1) for v in rolling[-TAIL:]),
        "tail_layer_means": [statistics.fmean(v) for v in layers], "tail_layer_steps": [len(v) for v in layers],
        "tail_std_over_tokens": statistics.fmean(r["ffn_experts_std"] for r in tail),
        "first_step_ffn": ffn[0], "first_step_std": records[0]["ffn_experts_std"],
    }


def plot(records: list[dict], target: float, path: Path) -> Any:
    """Per-layer FFN experts per token and the per-token std over the steps, saved to `path`; the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for layer, (layer_steps, values) in enumerate(per_layer(records)):
        a.plot(layer_steps, values, lw=0.8, label=f"layer {layer}")
    a.axhline(target, color="k", ls="--", lw=1, label="K_e")
    a.set(xlabel="step", ylabel="FFN experts / token", title="budget (Fig. 3b)")
    a.legend(fontsize=7)
    b.plot(steps, [r["ffn_experts_std"] for r in records])
    b.set(xlabel="step", ylabel="std over tokens", title="per-token spread (Fig. 3c)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a `longcat train` run directory, or its metrics.jsonl")
    parser.add_argument("--window", type=positive_int, default=10, help="steps in the rolling mean")
    parser.add_argument("--tolerance", type=positive_float, default=0.03, help="relative band around K_e")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON and PNG go (default: RUN's directory)")
    args = parser.parse_args()
    try:
        records = load(args.run)
    except ValueError as err:
        parser.error(str(err))
    out = args.out or (args.run if args.run.is_dir() else args.run.parent)
    if args.window > len(records):  # every mean would be over fewer steps than the window it is reported as
        parser.error(f"--window {args.window} is longer than the run's {len(records)} logged steps")
    if (problem := directory_problem(out)) is not None:
        parser.error(f"--out {out}: {problem}")
    summary = summarize(records, args.window, args.tolerance)
    written = [out / "budget_convergence.json"]
    written[0].write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot(records, summary["target"], out / "budget_convergence.png")
        written.append(out / "budget_convergence.png")
    except ImportError:
        pass
    print(json.dumps(summary))
    print(f"[budget_convergence] wrote {' and '.join(map(str, written))}")


if __name__ == "__main__":
    main()

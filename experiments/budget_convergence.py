"""Budget-control convergence of a training run (report §2.1.1, Fig. 3b/3c), from its metrics.jsonl.

    python experiments/budget_convergence.py RUN_DIR [--window 10] [--tolerance 0.03] [--out DIR]

Reports when the rolling mean of FFN experts per token enters, and stays within, ±tolerance of K_e; the mean,
worst single step and per-layer means over the tail (the last 50 steps, or every step of a shorter run:
`tail_steps` says how many); and the per-token std (tokens keep getting different compute). Writes
budget_convergence.json and, with matplotlib, budget_convergence.png into --out (default: RUN_DIR).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import directory_problem, positive_float, positive_int

from longcat_flash.train.metrics import read_metrics

TAIL = 50  # steps summarised at the end of the run


def summarize(records: list[dict], window: int, tolerance: float) -> dict:
    target = records[0]["ffn_experts_target"]
    ffn = [r["ffn_experts_per_token"] for r in records]
    rolling = [statistics.fmean(ffn[max(0, i - window + 1): i + 1]) for i in range(len(ffn))]
    inside = [abs(v - target) / target <= tolerance for v in rolling]
    settled = next((i for i in range(len(inside)) if all(inside[i:])), None)
    tail = records[-TAIL:]
    tail_ffn = [r["ffn_experts_per_token"] for r in tail]
    layers = list(zip(*(r["ffn_experts_per_layer"] for r in tail)))
    return {
        "target": target, "steps": len(records), "window": window, "tolerance": tolerance,
        "settled_step": None if settled is None else records[settled]["step"], "tail_steps": len(tail),
        "tail_mean": statistics.fmean(tail_ffn),
        "tail_mean_rel_error": statistics.fmean(tail_ffn) / target - 1,
        "tail_worst_step_rel_error": max(abs(v / target - 1) for v in tail_ffn),
        "tail_worst_rolling_rel_error": max(abs(v / target - 1) for v in rolling[-TAIL:]),
        "tail_layer_means": [statistics.fmean(v) for v in layers],
        "tail_std_over_tokens": statistics.fmean(r["ffn_experts_std"] for r in tail),
        "first_step_ffn": ffn[0], "first_step_std": records[0]["ffn_experts_std"],
    }


def plot(records: list[dict], target: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for layer, values in enumerate(zip(*(r["ffn_experts_per_layer"] for r in records))):
        a.plot(steps, values, lw=0.8, label=f"layer {layer}")
    a.axhline(target, color="k", ls="--", lw=1, label="K_e")
    a.set(xlabel="step", ylabel="FFN experts / token", title="budget (Fig. 3b)")
    a.legend(fontsize=7)
    b.plot(steps, [r["ffn_experts_std"] for r in records])
    b.set(xlabel="step", ylabel="std over tokens", title="per-token spread (Fig. 3c)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--window", type=positive_int, default=10, help="steps in the rolling mean")
    parser.add_argument("--tolerance", type=positive_float, default=0.03, help="relative band around K_e")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON and PNG go (default: RUN)")
    args = parser.parse_args()
    if not (args.run / "metrics.jsonl").is_file():
        parser.error(f"{args.run} holds no metrics.jsonl: give a `longcat train` run directory")
    out = args.out or args.run
    if (problem := directory_problem(out)) is not None:
        parser.error(f"--out {out}: {problem}")
    records = [r for r in read_metrics(args.run) if not r["skipped"]]
    if not records or "ffn_experts_target" not in records[0]:
        parser.error(f"{args.run} logged no budget figures (no steps, or a model without zero experts)")
    summary = summarize(records, args.window, args.tolerance)
    (out / "budget_convergence.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot(records, summary["target"], out / "budget_convergence.png")
    except ImportError:
        pass
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

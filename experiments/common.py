"""What every experiment shares: one corpus, tokenizer and token shard for all its runs, a micro LongCat-Flash
recipe sized for 2 CPU cores, a run helper over the real trainer, and the JSON + PNG output.

Each experiment is `python experiments/<name>.py [--quick] [--out DIR] [--work DIR] [--data SOURCE]`:
  --quick  the CI mode (seconds): a tinier model, a capped corpus, a few steps; its numbers mean nothing
  --out    where <name>.json and <name>.png go (default docs/experiments, or runs/experiments-quick with --quick)
  --work   run directories, tokenizer and token cache (default runs/experiments/<name>; reused between runs)
Every variant is a list of `--set`-style overrides on one base recipe, so a reader sees exactly what differs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from longcat_flash.data import sample_texts
from longcat_flash.runtime import tune_cpu_allocator
from longcat_flash.tokenizer import train_tokenizer
from longcat_flash.train.config import TrainConfig, apply_overrides, recipe
from longcat_flash.train.metrics import read_metrics
from longcat_flash.train.trainer import train

REPO = Path(__file__).resolve().parents[1]

# The micro model: the small preset's shape with every width halved and 2 layers; ~0.15 s per step on 2 cores.
MICRO = ["model.vocab_size=4096", "model.hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4",
         "model.q_lora_rank=64", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
         "model.v_head_dim=16", "model.ffn_hidden_size=384", "model.expert_ffn_hidden_size=64",
         "model.n_routed_experts=16", "model.zero_expert_num=8", "model.moe_topk=6", "model.routed_scaling_factor=2.0",
         "data.seq_len=128", "data.batch_size=16", "data.val_batches=8", "loss.mtp_weight=0.0",
         "eval_every=25", "checkpoint.save_every=100000", "sample_tokens=8", "schedule.warmup_steps=20",
         "budget.decay_every=200"]
# --quick: the same structure, as small as it goes.
QUICK = ["model.vocab_size=512", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.expert_ffn_hidden_size=32",
         "model.n_routed_experts=8", "model.zero_expert_num=4", "model.moe_topk=3", "data.seq_len=32",
         "data.batch_size=4", "data.val_batches=2", "data.max_bytes=1500000", "eval_every=5",
         "schedule.warmup_steps=2"]


@dataclasses.dataclass
class Setup:
    """The parsed command line and the shared data of one experiment."""

    name: str
    quick: bool
    out: Path
    work: Path
    base: TrainConfig
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def config(self, overrides: Sequence[str] = (), steps: int | None = None) -> TrainConfig:
        """The base recipe with `overrides` (--set syntax) and, optionally, a step count."""
        cfg = apply_overrides(self.base, list(overrides))
        return cfg if steps is None else dataclasses.replace(cfg, max_steps=steps)

    def steps(self, full: int, quick: int = 8) -> int:
        return quick if self.quick else full


def parse(name: str, doc: str, add_arguments: Any = None) -> tuple[Setup, argparse.Namespace]:
    """Parse the common flags (plus the experiment's own, through `add_arguments(parser)`), prepare the data."""
    parser = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI mode: seconds, numbers meaningless")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON and PNG go")
    parser.add_argument("--work", type=Path, default=None, help="run directories and data caches")
    parser.add_argument("--data", default="stdlib", help="corpus (default: the Python standard library)")
    parser.add_argument("--seed", type=int, default=0)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    tune_cpu_allocator()
    out = args.out or (REPO / ("runs/experiments-quick" if args.quick else "docs/experiments"))
    work = args.work or (REPO / "runs" / ("experiments-quick" if args.quick else "experiments") / name)
    base = apply_overrides(recipe("small"), MICRO + (QUICK if args.quick else []) +
                           [f"data.source={args.data}", f"seed={args.seed}"])
    setup = Setup(name, args.quick, out, work, base)
    setup.base = prepare_data(setup)
    return setup, args


def prepare_data(setup: Setup) -> TrainConfig:
    """Train the BPE once per work directory (shared by every run) and point the recipe at it and the cache."""
    cfg = setup.base
    shared = setup.work.parent / f"_data-{cfg.model.vocab_size}-{Path(cfg.data.source).name}"
    tokenizer = shared / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        sample = 1_000_000 if setup.quick else 8_000_000
        print(f"[{setup.name}] training a {cfg.model.vocab_size}-token BPE on {sample / 1e6:.0f} MB of "
              f"{cfg.data.source}", flush=True)
        train_tokenizer(sample_texts(cfg.data.source, sample), cfg.model.vocab_size).save(tokenizer)
    return apply_overrides(cfg, [f"data.tokenizer={tokenizer}", f"data.cache_dir={shared / 'tokens'}"])


def run(setup: Setup, label: str, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train `cfg` from scratch in WORK/label; its metrics, one dict per step."""
    out = setup.work / label
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    train(cfg, out, progress=False)
    records = read_metrics(out)
    final = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), float("nan"))
    print(f"[{setup.name}] {label}: {cfg.max_steps} steps, val_loss {final:.4f}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return records


# ---- reading runs ----

def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` where it was logged."""
    kept = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def final_val(records: list[dict[str, Any]]) -> float:
    return series(records, "val_loss")[1][-1]


def tail_mean(records: list[dict[str, Any]], key: str, fraction: float = 0.2) -> float:
    """Mean of `key` over the last `fraction` of the logged steps."""
    values = series(records, key)[1]
    return statistics.fmean(values[-max(1, int(len(values) * fraction)):])


def smooth(values: Sequence[float], window: int = 10) -> list[float]:
    """Trailing moving average."""
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


# ---- output ----

def save(setup: Setup, claim: str, setup_text: str, results: dict[str, Any], verdict: str,
         reproduced: bool | None, fig: Any) -> Path:
    """Write OUT/<name>.json (claim, setup, results, verdict) and OUT/<name>.png; print the JSON's path."""
    setup.out.mkdir(parents=True, exist_ok=True)
    record = {"experiment": setup.name, "claim": claim, "setup": setup_text, "quick": setup.quick,
              "reproduced": reproduced, "verdict": verdict, "results": _finite(results),
              "seconds": round(time.perf_counter() - setup.started, 1)}
    path = setup.out / f"{setup.name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    fig.tight_layout()
    fig.savefig(setup.out / f"{setup.name}.png", dpi=110)
    print(f"[{setup.name}] {verdict}\n[{setup.name}] wrote {path} and {path.with_suffix('.png')} "
          f"({record['seconds']:.0f} s)", flush=True)
    return path


def _finite(obj: Any) -> Any:
    """JSON without NaN/inf (they become null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def figure(ncols: int = 2, width: float = 5.0, height: float = 3.6) -> tuple[Any, Any]:
    """A matplotlib figure (Agg backend) with `ncols` axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


if __name__ == "__main__":
    sys.exit("experiments/common.py is a library; run one of the experiments beside it")

"""What every experiment shares: one corpus, tokenizer and token shard for all its runs, a micro LongCat-Flash
recipe sized for 2 CPU cores, a run helper over the real trainer, and the JSON + PNG output.

Each experiment is `python experiments/<name>.py [--quick] [--out DIR] [--work DIR] [--data SOURCE]`:
  --quick  the CI mode (seconds): a tinier model, a capped corpus, a few steps; its numbers mean nothing. It sets
           the step and seed counts (and the like) itself: giving one of those flags with it is refused
  --out    where <name>.json and <name>.png go (default docs/experiments, the committed reference results, which a
           run with non-default flags may not overwrite: it needs --out; runs/experiments-quick with --quick)
  --work   run directories, tokenizer and token cache (default runs/experiments/<name>; reused between runs: the
           tokenizer is keyed by the corpus's fingerprint, so an edited or different corpus gets its own). Each
           variant's run directory WORK/<label> is replaced on every run, so a --work given must be new, empty, or
           one the experiments used before
Every argument is checked before any tokenizer or training work: a bad one stops the script with one line.
Every variant is a list of `--set`-style overrides on one base recipe, so a reader sees exactly what differs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from longcat_flash.data import sample_texts
from longcat_flash.data.corpus import Corpus
# the scripts' argument types, imported from here
from longcat_flash.flag_types import (  # noqa: F401
    distinct, non_negative_float, non_negative_int, positive_float, positive_int, seed)
from longcat_flash.runtime import tune_cpu_allocator
from longcat_flash.tokenizer import train_tokenizer
from longcat_flash.train import run_lock
from longcat_flash.train.config import TrainConfig, apply_overrides, recipe
from longcat_flash.train.metrics import METRICS_FILE, read_metrics
from longcat_flash.train.trainer import TrainingStopped, train

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


WORK_MARKER = ".longcat-experiments"  # in a --work directory the experiments own (claim_work_directory)

# --quick's own step and seed counts, for the experiments whose only such flags are --steps and --seeds
QUICK_RUNS = {"steps": 8, "seeds": 1}


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




def steps_and_seeds(parser: argparse.ArgumentParser, steps: int, per: str = "variant", seeds: int = 2) -> None:
    """--steps and --seeds, as most experiments take them (--quick sets both: QUICK_RUNS)."""
    parser.add_argument("--steps", type=positive_int, default=steps, help=f"optimizer steps per run (default {steps})")
    parser.add_argument("--seeds", type=positive_int, default=seeds, help=f"seeds per {per} (seed, seed+1, ...)")


def seed_list(args: argparse.Namespace) -> list[int]:
    """--seed, --seed + 1, ... (--seeds of them)."""
    return list(range(args.seed, args.seed + args.seeds))


def parse(name: str, doc: str, add_arguments: Any = None, quick: dict[str, Any] | None = None,
          check: Any = None) -> tuple[Setup, argparse.Namespace]:
    """Parse the common flags (plus the experiment's own, through `add_arguments(parser)`), check them all, prepare
    the data. `quick`: the values --quick gives the experiment's flags (by dest); `check(args, setup)` raises
    ValueError for a bad combination (setup.base is the recipe, before the data). Every check runs here, before any
    tokenizer or training work, so a long run never fails at its end on a bad argument."""
    parser = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI mode: seconds, numbers meaningless")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the JSON and PNG go (default: the repo's docs/experiments, the committed results; "
                             "with --quick, runs/experiments-quick)")
    parser.add_argument("--work", type=Path, default=None,
                        help=f"run directories, tokenizer and token cache (default: runs/experiments/{name}, or "
                             f"runs/experiments-quick/{name} with --quick, in the repo)")
    parser.add_argument("--data", default="stdlib", help="corpus (default: the Python standard library)")
    parser.add_argument("--seed", type=seed, default=0)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    stop_children_on_sigterm()
    given = _given(parser, args)
    if args.quick:
        _apply_quick(parser, args, given, quick or {})
    out = args.out or (REPO / ("runs/experiments-quick" if args.quick else "docs/experiments"))
    work = args.work or (REPO / "runs" / ("experiments-quick" if args.quick else "experiments") / name)
    if args.out is None and not args.quick:
        _refuse_reference_overwrite(parser, args, given, out)
    tune_cpu_allocator()
    try:
        base = apply_overrides(recipe("small"), MICRO + (QUICK if args.quick else []) +
                               [f"data.source={args.data}", f"seed={args.seed}"])
        setup = Setup(name, args.quick, out, work, base)
        data = data_directory(setup)  # fingerprints the corpus: a missing or empty one stops here
        if check is not None:
            check(args, setup)
        if args.work is not None:
            claim_work_directory(work)
        for flag, path in (("--out", out), ("--work", work)):  # last: this creates them
            if (problem := directory_problem(path)) is not None:
                raise ValueError(f"{flag} {path}: {problem}")
        (work / WORK_MARKER).touch()
        print(f"[{name}] results go to {out}", flush=True)
        setup.base = prepare_data(setup, data)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    return setup, args


def _given(parser: argparse.ArgumentParser, args: argparse.Namespace) -> set[str]:
    """The dests the command line set (argparse leaves an attribute that is already on the namespace alone)."""
    unset = object()
    probe = parser.parse_args(namespace=argparse.Namespace(**{dest: unset for dest in vars(args)}))
    return {dest for dest, value in vars(probe).items() if value is not unset}


def _flags(dests: Sequence[str]) -> str:
    return ", ".join("--" + dest.replace("_", "-") for dest in dests)


def _apply_quick(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str],
                 quick: dict[str, Any]) -> None:
    """Set --quick's values; refuse a flag the user gave that --quick would silently replace."""
    if clash := sorted(given & quick.keys()):
        parser.error(f"--quick sets {_flags(clash)} itself; leave {_flags(clash)} out, or drop --quick")
    vars(args).update(quick)


def _refuse_reference_overwrite(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str],
                                out: Path) -> None:
    """The default --out holds the committed reference results: only the reference settings may rewrite them."""
    changed = sorted(d for d in given - {"out", "work", "quick"} if getattr(args, d) != parser.get_default(d))
    if changed:
        parser.error(f"{_flags(changed)} {'differs' if len(changed) == 1 else 'differ'} from the reference run "
                     f"whose results {out} holds; give --out DIR to write this run's elsewhere")


def claim_work_directory(work: Path) -> None:
    """An experiment replaces its run directories in --work (WORK/base, WORK/yarn, ...): a directory given there
    must be new, empty, or one the experiments have used before (it holds WORK_MARKER), so that no one's own
    `runs/base` is deleted."""
    if work.is_dir() and any(work.iterdir()) and not (work / WORK_MARKER).is_file():
        raise ValueError(f"--work {work} already holds files no experiment wrote, and an experiment replaces its "
                         f"run directories there ({work}/base, ...): give a new or empty directory")


def directory_problem(path: Path) -> str | None:
    """Why `path` cannot be (made) a writable directory, or None when it can: then it exists."""
    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot be created ({err.strerror or err})"
    return None if os.access(path, os.W_OK | os.X_OK) else "is not writable"


def data_directory(setup: Setup) -> Path:
    """WORK/_data/<corpus>-<vocab>-<fingerprint>: the tokenizer and token cache of this corpus, as it is now (the
    fingerprint covers the corpus's path, files, sizes and mtimes, and the tokenizer sample's cap)."""
    cfg = setup.base
    corpus = Corpus(cfg.data.source, cfg.data.text_field, max_bytes=tokenizer_sample_bytes(setup))
    return setup.work / "_data" / f"{corpus.name}-{cfg.model.vocab_size}-{corpus.fingerprint()[:16]}"


def tokenizer_sample_bytes(setup: Setup) -> int:
    return 1_000_000 if setup.quick else 8_000_000


def prepare_data(setup: Setup, shared: Path) -> TrainConfig:
    """Train the BPE once per corpus fingerprint (shared by every run) and point the recipe at it and the cache."""
    cfg = setup.base
    tokenizer = shared / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        sample = tokenizer_sample_bytes(setup)
        print(f"[{setup.name}] training a {cfg.model.vocab_size}-token BPE on {sample / 1e6:.0f} MB of "
              f"{cfg.data.source}", flush=True)
        texts = [t for t in sample_texts(cfg.data.source, sample, text_field=cfg.data.text_field) if t]
        if not texts:  # a BPE trained on nothing, kept in WORK, before the trainer said so with a traceback
            raise SystemExit(f"[{setup.name}] --data {cfg.data.source}: the corpus holds no text")
        train_tokenizer(texts, cfg.model.vocab_size).save(tokenizer)
    return apply_overrides(cfg, [f"data.tokenizer={tokenizer}", f"data.cache_dir={shared / 'tokens'}"])


def stop_children_on_sigterm() -> None:
    """SIGTERM (`kill`, `timeout`) stops the experiment as Ctrl-C does: the `longcat` command it runs is killed
    with it (subprocess.run kills its child on any exception), not left training on in WORK."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cleared(out: Path) -> Path:
    """`out` removed for a new run; refused while a live process trains there (one a killed experiment left
    running), which the new run would otherwise share the directory with."""
    if out.is_dir():
        try:
            run_lock.hold(out)
        except run_lock.RunDirectoryInUse as err:
            raise SystemExit(f"[experiments] {err}") from None
        run_lock.release(out)
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    return out


def run(setup: Setup, label: str, cfg: TrainConfig, may_diverge: bool = False) -> list[dict[str, Any]]:
    """Train `cfg` from scratch in WORK/label; its metrics, one dict per step. A run that diverges (the trainer
    stops after repeated non-finite steps) ends the experiment with one line; in an experiment whose analysis
    reads NaN (`may_diverge`: one that drives the LR high on purpose) it ends with a record of NaN figures
    (`diverged_record`) instead, so that each figure taken from it reads NaN (null in the JSON) and the
    experiment finishes and says what it measured."""
    out = cleared(setup.work / label)
    start = time.perf_counter()
    try:
        train(cfg, out, progress=False)
    except ValueError as err:  # the corpus too small for a validation window, and the like: the trainer's words
        raise SystemExit(f"[{setup.name}] {label}: {err}") from None
    except TrainingStopped as err:
        if not may_diverge:
            raise SystemExit(f"[{setup.name}] {label} diverged ({err})") from None
        print(f"[{setup.name}] {label}: diverged ({err})", flush=True)
        records = read_metrics(out) if (out / METRICS_FILE).exists() else []
        return records + [diverged_record(records)]
    records = read_metrics(out)
    final = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), float("nan"))
    print(f"[{setup.name}] {label}: {cfg.max_steps} steps, val_loss {final:.4f}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return records


def diverged_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The record a diverged run ends with: its last record's figures as NaN (lists of them as lists of NaN), the
    losses NaN whether or not logged yet, not a skipped step (analyses that leave those out keep it)."""
    def nan(value: Any) -> Any:
        if isinstance(value, list):
            return [nan(v) for v in value]
        return math.nan if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    last = records[-1] if records else {}
    return {**{k: nan(v) for k, v in last.items()}, **dict.fromkeys(("loss", "lm_loss", "val_loss"), math.nan),
            "step": last.get("step", 0) + 1, "skipped": False, "diverged": True}


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

"""Acceptance rate of the MTP draft on held-out text as training proceeds (report §6.1.2, Table 5).

    python experiments/mtp_acceptance.py [--quick] [--steps 800] [--checkpoints 10] [--seeds 2]

One micro model per seed is trained with its single MTP head on (loss.mtp_weight=0.3; the micro recipe turns it
off) and a training checkpoint every ceil(steps / checkpoints) steps and at the last. Each checkpoint's weights are
loaded into a fresh `Transformer` and measured on text it never trained on, this package's own sources
(src/longcat_flash, not in the stdlib corpus):
  engine acceptance   the real inference engine with one MTP draft per step (EngineConfig(speculative=1)), greedy:
                      accepted / proposed drafts while generating --new-tokens after each of --prompts prompts
                      of --prompt-tokens tokens (the engine's DraftStats, as bench/bench_mtp.py reads them)
  teacher-forced      on held-out windows of seq_len tokens: how often the MTP argmax at t (its guess for token
  agreement           t+2) equals the main head's argmax at t+1, i.e. what greedy verification would accept if
                      the context were the real text; with the MTP's and main head's top-1 accuracy beside it
The claim tested is the trend: acceptance rises with training (the report's ~90% is for LongCat-Flash at scale; the
level at micro scale is reported, not claimed). It counts as reproduced when, in every seed, the engine acceptance
has a Spearman rank correlation of at least 0.6 with the training step and ends at least 0.05 above the first
checkpoint, counting only checkpoints whose greedy outputs are not degenerate (mean fraction of distinct tokens
>= 0.25: a model that repeats one token has its draft "accepted" trivially, which the earliest checkpoints do);
None when a seed has fewer than 3 such checkpoints. The trend over all checkpoints is reported beside it. The
teacher-forced agreement's trend is judged by the same rule and reported, not counted in `reproduced`.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
from common import (
    REPO,
    figure,
    parse,
    positive_float,
    positive_int,
    run,
    save,
    seed_list,
    series,
    smooth,
    steps_and_seeds,
)

from longcat_flash.checkpoint import training
from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.fused import fuse_for_inference
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.model import Transformer
from longcat_flash.tokenizer import Tokenizer
from longcat_flash.train.checkpoints import read_checkpoint
from longcat_flash.train.config import TrainConfig

CLAIM = ("A single MTP head drafts tokens that greedy verification accepts at a high rate (~90% at scale, Table 5); "
         "tested here: the acceptance on held-out text rises as training proceeds.")
SOURCES = REPO / "src" / "longcat_flash"
MIN_RHO, MIN_RISE = 0.6, 0.05
DEGENERATE = 0.25  # mean distinct-token fraction of the greedy outputs below which a checkpoint just repeats itself
MIN_JUDGED = 3  # non-degenerate checkpoints needed per seed to judge a trend
MIN_NEW_TOKENS = int(1 / DEGENERATE) + 1  # the fewest generated tokens whose one-token repetition reads degenerate
FIGURES = {"acceptance": "engine acceptance (greedy, 1 MTP draft, held-out code)",
           "agreement": "teacher-forced agreement"}  # per-checkpoint key -> name; each trend judged by one rule
RISES = {True: "rises", False: "does not rise", None: "is not judged"}


QUICK = {"steps": 8, "seeds": 1, "checkpoints": 2, "prompts": 2, "prompt_tokens": 16, "new_tokens": 8, "windows": 2}


def arguments(parser) -> None:
    steps_and_seeds(parser, 800, per="run")
    parser.add_argument("--checkpoints", type=positive_int, default=10,
                        help="evenly spaced checkpoints to measure (at most; the last at the final step)")
    parser.add_argument("--mtp-weight", type=positive_float, default=0.3)
    parser.add_argument("--prompts", type=positive_int, default=12)
    parser.add_argument("--prompt-tokens", type=positive_int, default=48)
    parser.add_argument("--new-tokens", type=positive_int, default=32)
    parser.add_argument("--windows", type=positive_int, default=16,
                        help="held-out windows for the teacher-forced figures")


def check(args, setup) -> None:
    """A prompt and its greedy continuation fit the model's positions."""
    if args.checkpoints > args.steps:  # one checkpoint per step at most: fewer would be measured than asked
        raise ValueError(f"--checkpoints {args.checkpoints} is more than --steps {args.steps}: a run of "
                         f"{args.steps} steps has at most {args.steps} checkpoints")
    if args.new_tokens < MIN_NEW_TOKENS:  # a reply of one repeated token must read as degenerate
        raise ValueError(f"--new-tokens {args.new_tokens} is too few to tell a degenerate output (one token repeated "
                         f"has 1/{args.new_tokens} distinct, not below {DEGENERATE}): give at least {MIN_NEW_TOKENS}")
    most = setup.base.model.max_position_embeddings
    if args.prompt_tokens + args.new_tokens > most:
        raise ValueError(f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceed the model's "
                         f"{most} positions")
    setup.config([f"loss.mtp_weight={args.mtp_weight}"])


# ---- held-out text ----

def held_out_ids(tokenizer: Tokenizer) -> list[int]:
    """This package's sources, tokenized as one stream."""
    return tokenizer.encode("\n".join(p.read_text() for p in sorted(SOURCES.rglob("*.py"))))


def spread(ids: list[int], n: int, length: int, phase: float) -> list[list[int]]:
    """n windows of `length` tokens evenly spread over `ids`, each starting `phase` of a stride into its slot."""
    stride = (len(ids) - length) // n
    return [ids[int((i + phase) * stride): int((i + phase) * stride) + length] for i in range(n)]


# ---- one checkpoint ----

def load_model(checkpoint: Path) -> Transformer:
    """The checkpoint's model weights in a fresh Transformer built from the config saved with them."""
    states, meta = read_checkpoint(checkpoint)
    model = Transformer(TrainConfig.from_dict(meta["train_config"]).model)
    model.load_state_dict(states["model"])
    return model.eval()


@torch.no_grad()
def teacher_forced(model: Transformer, windows: torch.Tensor) -> dict[str, float]:
    """windows (B, S) of held-out ids -> MTP/main agreement and top-1 accuracies."""
    out = model(windows, with_mtp=True)
    main = out.logits.argmax(-1)  # (B, S): position t's guess for token t+1
    draft = out.mtp_logits.argmax(-1)  # (B, S-1): position t's guess for token t+2
    return {"agreement": (draft == main[:, 1:]).float().mean().item(),
            "mtp_accuracy": (draft[:, :-1] == windows[:, 2:]).float().mean().item(),
            "main_accuracy": (main[:, :-1] == windows[:, 1:]).float().mean().item()}


def engine_acceptance(model: Transformer, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Greedy generation with one MTP draft per step; the engine's acceptance figures (fuses `model` in place)."""
    fuse_for_inference(model)
    engine = Engine(model, EngineConfig(speculative=1, max_running=len(prompts)))
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    d = engine.stats.drafts
    return {"acceptance": d.acceptance_rate, "mean_accepted_length": d.mean_accepted_length, "drafted": d.drafted,
            "distinct_token_fraction": statistics.fmean(len(set(o)) / len(o) for o in outputs)}


def measure(run_dir: Path, prompts: list[list[int]], windows: torch.Tensor, new_tokens: int) -> list[dict]:
    """Both figures for every checkpoint of a run, oldest first."""
    rows = []
    for checkpoint in training.list_checkpoints(run_dir / "checkpoints"):
        model = load_model(checkpoint)
        step = training.read_meta(checkpoint)["step"]
        rows.append({"step": step, **teacher_forced(model, windows), **engine_acceptance(model, prompts, new_tokens)})
        print(f"[mtp_acceptance] {run_dir.name} step {step}: engine acceptance {rows[-1]['acceptance']:.3f}, "
              f"teacher-forced agreement {rows[-1]['agreement']:.3f}", flush=True)
    return rows


# ---- the trend ----

def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (ties get their average rank); NaN when either side is constant."""
    def ranks(v: list[float]) -> list[float]:
        ordered = sorted(v)
        return [ordered.index(a) + (ordered.count(a) - 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    return statistics.correlation(rx, ry) if len(set(rx)) > 1 and len(set(ry)) > 1 else float("nan")


def trend(rows: list[dict], key: str = "acceptance") -> dict:
    """The trend of figure `key` over all checkpoints, and over the judged (non-degenerate) ones."""
    kept = [r for r in rows if r["distinct_token_fraction"] >= DEGENERATE]
    out = {"spearman_all": spearman([r["step"] for r in rows], [r[key] for r in rows]),
           "judged_steps": [r["step"] for r in kept], "spearman": float("nan"), f"first_{key}": float("nan"),
           f"last_{key}": rows[-1][key], "rise": float("nan")}
    if len(kept) >= MIN_JUDGED:
        values = [r[key] for r in kept]
        out.update({"spearman": spearman(out["judged_steps"], values), f"first_{key}": values[0],
                    "rise": values[-1] - values[0]})
    return out


def trends_of(measured: dict[int, list[dict]]) -> dict[str, dict[int, dict]]:
    """Every figure's trend, per seed."""
    return {key: {seed: trend(rows, key) for seed, rows in measured.items()} for key in FIGURES}


def decide(trends: list[dict]) -> bool | None:
    """Rises in every seed; None when some seed has too few non-degenerate checkpoints to tell."""
    if any(len(t["judged_steps"]) < MIN_JUDGED for t in trends):
        return None
    return all(t["spearman"] >= MIN_RHO and t["rise"] >= MIN_RISE for t in trends)


def plot(measured: dict[int, list[dict]], records: dict[int, list[dict]]):
    fig, (a, b) = figure()
    for i, (seed, rows) in enumerate(measured.items()):
        first, ls = i == 0, "-" if i == 0 else ":"
        steps = [r["step"] for r in rows]
        a.plot(steps, [r["acceptance"] for r in rows], color="C0", lw=1, ls=ls,
               label="engine, greedy, 1 draft" if first else None)
        a.plot(steps, [r["agreement"] for r in rows], color="C1", marker="s", ms=3, lw=1, ls=ls,
               label="teacher-forced agreement" if first else None)
        for r in rows:  # hollow: a checkpoint whose greedy output only repeats itself (not judged)
            a.plot(r["step"], r["acceptance"], "o", ms=4, color="C0",
                   mfc="C0" if r["distinct_token_fraction"] >= DEGENERATE else "none")
        b.plot(*series(records[seed], "val_loss"), color="C2", marker="o", ms=2.5, lw=1, ls=ls,
               label="val LM loss" if first else None)
        mtp_steps, mtp = series(records[seed], "mtp_loss")
        b.plot(mtp_steps, smooth(mtp), color="C3", lw=1, ls=ls,
               label="train MTP loss (10-step mean)" if first else None)
    a.set(xlabel="training step", ylabel="MTP draft acceptance on held-out code", ylim=(0, 1),
          title=acceptance_title(list(measured)))
    b.set(xlabel="training step", ylabel="loss", title="losses")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    return fig


def acceptance_title(seeds: list[int]) -> str:
    """The first seed is drawn solid, the others dotted: the title names them."""
    others = [str(seed) for seed in seeds[1:]]
    dotted = f"; dotted: seed{'s' if len(others) > 1 else ''} {', '.join(others)}" if others else ""
    return f"acceptance (hollow: degenerate output{dotted})"


def describe_seed(seed: int, t: dict, rows: list[dict], key: str = "acceptance") -> str:
    """One seed's measured figure `key`, first to last checkpoint, and its judged trend or why it was not judged."""
    measured = (f"seed {seed}: {rows[0][key]:.3f} at step {rows[0]['step']} -> {rows[-1][key]:.3f} "
                f"at step {rows[-1]['step']} (Spearman {t['spearman_all']:.2f} over all {len(rows)} checkpoints; ")
    judged = len(t["judged_steps"])
    if judged < MIN_JUDGED:
        return measured + f"not judged: {judged} non-degenerate, {MIN_JUDGED} needed)"
    first = t[f"first_{key}"]
    return measured + (f"judged over the {judged} non-degenerate from step {t['judged_steps'][0]}: "
                       f"{first:.3f} -> {first + t['rise']:.3f}, Spearman {t['spearman']:.2f})")


def describe(trends: dict[str, dict[int, dict]], measured: dict[int, list[dict]]) -> str:
    """Each figure's verdict by the one rule, with every seed's numbers behind it (trends: trends_of(measured))."""
    parts = [f"{name} {RISES[decide(list(trends[key].values()))]}: "
             + "; ".join(describe_seed(seed, t, measured[seed], key) for seed, t in trends[key].items())
             for key, name in FIGURES.items()]
    return "; ".join(parts) + (f" (rises: Spearman >= {MIN_RHO} and +{MIN_RISE} over the non-degenerate checkpoints, "
                               "in every seed)")


def main() -> None:
    setup, args = parse("mtp_acceptance", __doc__, arguments, QUICK, check)
    steps, seeds = args.steps, seed_list(args)
    n_prompts, prompt_len, new_tokens, n_windows = args.prompts, args.prompt_tokens, args.new_tokens, args.windows
    every = -(-steps // args.checkpoints)  # at most --checkpoints of them, the last at the final step
    overrides = [f"loss.mtp_weight={args.mtp_weight}", f"checkpoint.save_every={every}", f"eval_every={every}",
                 f"checkpoint.keep={steps // every + 1}"]
    ids = held_out_ids(Tokenizer.load(Path(setup.base.data.tokenizer)))
    prompts = spread(ids, n_prompts, prompt_len, 0.0)
    windows = torch.tensor(spread(ids, n_windows, setup.base.data.seq_len, 0.5))  # (W, seq_len)
    records, measured = {}, {}
    for seed in seeds:
        records[seed] = run(setup, f"seed{seed}", setup.config([*overrides, f"seed={seed}"], steps))
        measured[seed] = measure(setup.work / f"seed{seed}", prompts, windows, new_tokens)
    trends = trends_of(measured)
    results = {f"seed{seed}": {**trends["acceptance"][seed], "agreement_trend": trends["agreement"][seed],
                               "final_val_loss": series(records[seed], "val_loss")[1][-1],
                               "per_checkpoint": measured[seed]} for seed in seeds}
    results["held_out"] = {"tokens": len(ids), "prompts": n_prompts, "prompt_tokens": prompt_len,
                           "new_tokens": new_tokens, "windows": n_windows}
    m = setup.base.model
    save(setup, CLAIM, f"micro model ({m.hidden_size}d, {m.num_layers} layers) + 1 dense MTP layer, mtp_weight "
         f"{args.mtp_weight}, {steps} steps of {setup.base.data.batch_size}x{setup.base.data.seq_len} tokens, a "
         f"checkpoint every {every} steps; held-out text: src/longcat_flash/**/*.py ({n_prompts} prompts x "
         f"{prompt_len} tokens + {new_tokens} greedy; {n_windows} windows x {setup.base.data.seq_len}); seeds "
         f"{list(seeds)}", results, describe(trends, measured), decide(list(trends["acceptance"].values())),
         plot(measured, records))


if __name__ == "__main__":
    main()

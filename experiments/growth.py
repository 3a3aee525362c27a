"""Model growth by layer stacking vs random init at equal training tokens (report §3.1.2, Fig. 5b).

    python experiments/growth.py [--quick] [--steps 360] [--grow-at 120] [--depth 4] [--seeds 2]
                                                                      (defaults: ~10 min on 2 idle cores)

Grown: a depth/2-layer model (the micro recipe otherwise unchanged) trains from random init for --grow-at steps;
`grow_run(small, grown, r=2)` stacks its whole layer stack twice (layers [0..n-1, 0..n-1]) and keeps the
optimizer moments, budget controller, step, sampler position and RNG; the grown run then resumes to --steps.
Baseline: the depth-layer model from random init for --steps. Same seed, so both read the same batches at the
same step, and equal total tokens (the grown model spends fewer FLOPs: its first phase is half as deep).

LR schedule. The trainer's LR is a pure function lr_factor(step, max_steps), and the small phase must end at
--grow-at (the trainer runs to max_steps and checkpoints there), so a cosine over each phase's max_steps would
decay the small model to its minimum and then jump back up. Instead every run follows ONE warmup-stable-decay
curve over --steps: warmup, constant peak LR, then a linear decay over the last schedule.decay_fraction of
--steps. The small phase runs with schedule.kind=constant (identical to WSD before its decay starts, which must
not begin before the growth step: checked), the grown phase and the baseline with schedule.kind=wsd and
max_steps=--steps. The experiment asserts that the grown run's logged LR equals the baseline's at every step.
The decay gives the final comparison a settled loss instead of a noisy peak-LR one.

Claims and rules, from the measured numbers:
  bump    stacking raises the loss: the grown model's validation loss right after growth (before any step)
          exceeds the small model's at the growth step, and it is transient: a later evaluation of the grown
          run falls back below that pre-growth loss (every seed).
  lower   the grown run ends with a lower validation loss than the baseline at equal tokens (every seed).
`reproduced` is True when both parts hold; each part is reported on its own.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from common import Setup, cleared, figure, final_val, parse, positive_int, run, save, seed_list, series, smooth

from longcat_flash.train import checkpoints, trainer
from longcat_flash.train.config import apply_overrides
from longcat_flash.train.growth import grow_run
from longcat_flash.train.metrics import read_metrics
from longcat_flash.train.optim import decay_start

CLAIM = ("A model grown by stacking a half-depth model shows a transient loss increase right after growth, then "
         "reaches a lower loss than the same model from random init at equal training tokens (Fig. 5b).")
WSD = ["schedule.kind=wsd"]
QUICK = {"steps": 8, "grow_at": 4, "depth": 2, "seeds": 1}  # --quick: 1 layer grown to 2


def arguments(parser) -> None:
    parser.add_argument("--steps", type=positive_int, default=360, help="total optimizer steps of both models")
    parser.add_argument("--grow-at", type=positive_int, default=120, help="steps of the half-depth model before growth")
    parser.add_argument("--depth", type=positive_int, default=4, help="layers of the grown and baseline models (even)")
    parser.add_argument("--seeds", type=positive_int, default=2, help="seeds (seed, seed+1, ...)")


# ---- the runs ----

def check(args, setup: Setup) -> None:
    """An even depth, steps after the growth step (measure() reads the grown run's loss there), and a WSD decay
    that starts at or after the growth step, so the constant small phase matches it (ValueError otherwise)."""
    if args.depth % 2:
        raise ValueError(f"--depth must be even, got {args.depth}")
    if args.grow_at >= args.steps:
        raise ValueError(f"--grow-at {args.grow_at} must be below --steps {args.steps}: the grown model needs steps "
                         "after growth to be measured")
    cfg = setup.config([f"model.num_layers={args.depth}", *WSD], args.steps)
    s = cfg.schedule
    decays_at = decay_start(s, cfg.max_steps)
    if not s.warmup_steps <= args.grow_at <= decays_at:
        raise ValueError(f"--grow-at {args.grow_at} must lie between the warmup ({s.warmup_steps}) and the start of "
                         f"the LR decay (step {decays_at} of {cfg.max_steps})")


def grown_run(setup: Setup, seed: int, depth: int, grow_at: int, steps: int) -> tuple[list[dict], float]:
    """Small phase, growth, grown phase. Returns the grown run's metrics (small phase included) and the grown
    model's validation loss at the growth step, before any update."""
    small = setup.config([f"model.num_layers={depth // 2}", "schedule.kind=constant", f"seed={seed}"], grow_at)
    run(setup, f"small-seed{seed}", small)
    dst = cleared(setup.work / f"grown-seed{seed}")
    grow_run(setup.work / f"small-seed{seed}", dst, r=2)
    cfg = dataclasses.replace(apply_overrides(checkpoints.resume_config(dst), WSD), max_steps=steps)
    loaded = trainer.setup(cfg, dst, resume=True, progress=False)  # the grown model at step grow_at
    val_at_growth = trainer.evaluate(loaded.model, loaded.val, loaded.cfg)
    del loaded
    try:
        trainer.train(cfg, dst, resume=True, progress=False)
    except trainer.TrainingStopped as err:
        raise SystemExit(f"[{setup.name}] grown-seed{seed} diverged ({err}): no grown run to measure") from None
    records = read_metrics(dst)
    print(f"[{setup.name}] grown-seed{seed}: val_loss {final_val(records):.4f} (right after growth "
          f"{val_at_growth:.4f})", flush=True)
    return records, val_at_growth


def measure(grown: list[dict], base: list[dict], val_at_growth: float, grow_at: int) -> dict[str, Any]:
    """The bump and the final gap of one seed."""
    lr_grown, lr_base = series(grown, "lr"), series(base, "lr")
    assert lr_grown == lr_base, "the grown run and the baseline did not follow the same LR schedule"
    val_steps, val = series(grown, "val_loss")
    before = val[val_steps.index(grow_at)]  # the small model at the growth step
    later = [(s, v) for s, v in zip(val_steps, val) if s > grow_at]
    recovered = next((s for s, v in later if v < before), None)
    steps, loss = series(grown, "loss")
    i = steps.index(grow_at)
    loss5 = smooth(loss, 5)
    base_val = dict(zip(*series(base, "val_loss")))
    below = [v < base_val[s] for s, v in later if s in base_val]
    return {"val_before_growth": before, "val_right_after_growth": val_at_growth,
            "val_bump": val_at_growth - before, "recovered_at_step": recovered,
            "train_loss_peak_bump": max(loss5[i + 1: i + 26]) - statistics.fmean(loss[max(0, i - 9): i + 1]),
            "final_val_grown": final_val(grown), "final_val_baseline": final_val(base),
            "final_gap_baseline_minus_grown": final_val(base) - final_val(grown),
            "fraction_of_later_evals_grown_below_baseline": statistics.fmean(below) if below else None}


# ---- the experiment ----

def main() -> None:
    setup, args = parse("growth", __doc__, arguments, QUICK, check)
    depth, steps, grow_at, seeds = args.depth, args.steps, args.grow_at, seed_list(args)
    runs, per_seed = {}, {}
    for seed in seeds:
        runs["grown", seed], val_at_growth = grown_run(setup, seed, depth, grow_at, steps)
        runs["baseline", seed] = run(setup, f"baseline-seed{seed}",
                                     setup.config([f"model.num_layers={depth}", *WSD, f"seed={seed}"], steps))
        per_seed[seed] = measure(runs["grown", seed], runs["baseline", seed], val_at_growth, grow_at)
    bump = all(r["val_bump"] > 0 and r["recovered_at_step"] is not None for r in per_seed.values())
    lower = all(r["final_gap_baseline_minus_grown"] > 0 for r in per_seed.values())
    mean = {key: statistics.fmean(r[key] for r in per_seed.values())
            for key in ("val_bump", "train_loss_peak_bump", "final_val_grown", "final_val_baseline",
                        "final_gap_baseline_minus_grown")}
    results = {"per_seed": per_seed, "mean": mean, "bump_reproduced": bump, "lower_loss_reproduced": lower,
               "growth_step": grow_at, "growth_tokens": grow_at * setup.base.data.batch_size * setup.base.data.seq_len}
    gaps = ", ".join(f"{r['final_gap_baseline_minus_grown']:+.4f}" for r in per_seed.values())
    verdict = (f"stacking {depth // 2}->{depth} layers at step {grow_at}: val loss jumps by {mean['val_bump']:+.4f} "
               f"(bump {'reproduced' if bump else 'not reproduced'}); final val loss grown "
               f"{mean['final_val_grown']:.4f} vs random init {mean['final_val_baseline']:.4f}, gap (baseline - "
               f"grown) per seed {gaps} (lower loss {'reproduced' if lower else 'not reproduced'})")
    m, d = setup.base.model, setup.base.data
    save(setup, CLAIM, f"micro model ({m.hidden_size}d, {m.n_routed_experts} FFN + {m.zero_expert_num} zero "
         f"experts): {depth // 2} layers for {grow_at} steps, stacked to {depth} and trained to {steps} steps, vs "
         f"{depth} layers from random init for {steps} steps; {d.batch_size}x{d.seq_len} tokens/step, one WSD LR "
         f"schedule over {steps} steps, seeds {seeds}", results, verdict, bump and lower,
         plot(runs, per_seed, seeds, grow_at))


def plot(runs: dict, per_seed: dict, seeds: list[int], grow_at: int):
    """(a) validation loss vs tokens over the whole run, (b) training loss around the growth point."""
    fig, (a, b) = figure()
    tokens_per_step = runs["grown", seeds[0]][0]["tokens"] // runs["grown", seeds[0]][0]["step"]
    grow_tokens = grow_at * tokens_per_step / 1e6
    for (kind, seed), r in runs.items():
        color, first = ("C0" if kind == "grown" else "C1"), seed == seeds[0]
        label = "grown (stacked)" if kind == "grown" else "random init"
        ls = "-" if first else ":"
        val_steps, val = series(r, "val_loss")
        if kind == "grown":  # the stacked model's loss before its first update, drawn into the curve
            at = val_steps.index(grow_at) + 1
            val_steps, val = val_steps[:at] + [grow_at] + val_steps[at:], val[:at] + [per_seed[seed][
                "val_right_after_growth"]] + val[at:]
        a.plot([s * tokens_per_step / 1e6 for s in val_steps], val, color=color, ls=ls, marker="o", ms=2, lw=1,
               label=f"{label}, seed {seed}")
        steps, loss = series(r, "loss")
        near = [(s, v) for s, v in zip(steps, smooth(loss, 5)) if grow_at - 30 < s <= grow_at + 80]
        b.plot([s * tokens_per_step / 1e6 for s, _ in near], [v for _, v in near], color=color, ls=ls, lw=1,
               label=f"{label}, seed {seed}")
    for ax in (a, b):
        ax.axvline(grow_tokens, color="k", ls="--", lw=0.8, label="growth")
        ax.set_xlabel("training tokens (M)")
    a.set(ylabel="validation loss", title="loss at equal tokens")
    b.set(ylabel="training loss (5-step mean)", title="around the growth point")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    return fig


if __name__ == "__main__":
    main()

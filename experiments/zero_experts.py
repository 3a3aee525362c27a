"""Zero-computation experts vs a baseline with the same average compute (report §2.1, Fig. 3a).

    python experiments/zero_experts.py [--quick] [--steps 800] [--seeds 2]

Both models have the same N FFN experts of the same width. Ours routes top-K over N FFN + Z zero experts with the
budget controller holding the mean at K_e FFN experts per token; the baseline routes top-K_e over the N FFN
experts only. Same data, seeds and steps, so the expected training FLOPs are equal (the realised FFN experts per
token are measured to check). The claim is a lower validation loss for the zero-expert model; it counts as
reproduced when every seed shows it.
"""
from __future__ import annotations

import statistics

from common import (
    QUICK_RUNS,
    figure,
    final_val,
    parse,
    run,
    save,
    seed_list,
    series,
    smooth,
    steps_and_seeds,
    tail_mean,
)

CLAIM = "With zero-computation experts the model reaches a lower loss at the same average compute (Fig. 3a)."


def arguments(parser) -> None:
    steps_and_seeds(parser, 800)


def main() -> None:
    setup, args = parse("zero_experts", __doc__, arguments, QUICK_RUNS)
    m, k_e = setup.base.model, setup.base.ffn_expert_target
    steps, seeds = args.steps, seed_list(args)
    variants = {
        f"zero experts (top-{m.moe_topk} of {m.n_routed_experts}+{m.zero_expert_num}, K_e={k_e:g})": [],
        f"baseline (top-{k_e:g} of {m.n_routed_experts}, no zero experts)":
            ["model.zero_expert_num=0", f"model.moe_topk={int(k_e)}", "budget.enabled=False"],
    }
    runs = {(label, seed): run(setup, f"v{i}-seed{seed}", setup.config([*o, f"seed={seed}"], steps))
            for i, (label, o) in enumerate(variants.items()) for seed in seeds}
    ours, base = variants
    results = {label: {
        "final_val_loss": statistics.fmean(final_val(runs[label, s]) for s in seeds),
        "final_val_loss_per_seed": [final_val(runs[label, s]) for s in seeds],
        "ffn_experts_per_token": statistics.fmean(tail_mean(runs[label, s], "ffn_experts_per_token") for s in seeds),
    } for label in variants}
    gaps = [b - o for b, o in zip(results[base]["final_val_loss_per_seed"], results[ours]["final_val_loss_per_seed"])]
    # > 0: zero experts are better (the other experiments' gaps are ours minus the baseline: > 0 is worse)
    compute_ratio = results[ours]["ffn_experts_per_token"] / results[base]["ffn_experts_per_token"]
    results.update(val_loss_gap_per_seed=gaps, val_loss_gap_mean=statistics.fmean(gaps),
                   ffn_compute_ratio_zero_vs_baseline=compute_ratio)
    reproduced = all(g > 0 for g in gaps) and abs(compute_ratio - 1) < 0.03
    verdict = (f"final val loss: zero experts {results[ours]['final_val_loss']:.4f} vs baseline "
               f"{results[base]['final_val_loss']:.4f} (baseline minus zero experts, per seed: "
               f"{', '.join(f'{g:+.4f}' for g in gaps)}) "
               f"at {compute_ratio:.3f}x the FFN compute")

    fig, (a, b) = figure()
    for (label, seed), r in runs.items():
        color = "C0" if label == ours else "C1"
        a.plot(*series(r, "val_loss"), color=color, marker="o", ms=2, lw=1, label=label if seed == args.seed else None)
        steps_, ffn = series(r, "ffn_experts_per_token")
        b.plot(steps_, smooth(ffn), color=color, lw=1, label=label if seed == args.seed else None)
    a.set(xlabel="step (equal tokens and FFN FLOPs)", ylabel="validation loss", title="loss at equal compute")
    b.axhline(k_e, color="k", ls="--", lw=1, label="K_e")
    b.set(xlabel="step", ylabel="FFN experts / token (10-step mean)", title="realised compute")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    save(setup, CLAIM, f"micro model ({m.hidden_size}d, {m.num_layers} layers, {m.n_routed_experts} FFN experts of "
         f"width {m.expert_ffn_hidden_size}), {steps} steps of {setup.base.data.batch_size}x"
         f"{setup.base.data.seq_len} tokens, seeds {list(seeds)}", results, verdict, reproduced, fig)


if __name__ == "__main__":
    main()

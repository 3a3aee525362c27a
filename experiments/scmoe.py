"""ScMoE vs the same layer with the MoE after the second attention (report §2.2, Fig. 4).

    python experiments/scmoe.py [--quick] [--steps 600] [--seeds 2]      (defaults: ~9 min on 2 idle cores)

Both models have exactly the same modules and parameters (two MLAs, two dense FFNs, one MoE per layer); only
the input the MoE reads differs:
    ScMoE (ours)   out = x3 + FFN_1(norm_f1(x3)) + MoE(s),   s = norm_f0(x1)   the shortcut after MLA_0
    plain          out = x3 + FFN_1(h) + MoE(h),             h = norm_f1(x3)   MoE after MLA_1, beside FFN_1
with x1 = x + MLA_0(norm_a0(x)), x2 = x1 + FFN_0(s), x3 = x2 + MLA_1(norm_a1(x2)) in both. The plain layer is
the ordinary "MoE after the attention, with a dense FFN beside it" placement (a shared-expert-like layer); the
trainer builds the model itself, so the baseline is a context manager that swaps `ScMoELayer.forward` for the
run and restores it. Same data, seeds, initial weights and steps.

The claim is that the shortcut is quality-neutral: the loss curves nearly overlap. It counts as reproduced when
the paired (same-seed) final validation-loss gap, averaged over seeds, is within the noise or negligible:
|gap| <= the seed-to-seed spread of the final loss (two seeds cannot resolve a smaller effect), or
|gap| < 1% of the loss (at Fig. 4's scale such curves lie on top of each other).
"""
from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator

import torch
from common import QUICK_RUNS, figure, final_val, parse, run, save, seed_list, series, smooth, steps_and_seeds

from longcat_flash.model import Transformer
from longcat_flash.model.block import ScMoELayer
from longcat_flash.train.config import TrainConfig

CLAIM = ("Feeding the MoE from the shortcut after the first attention (ScMoE) is quality-neutral: the loss curves "
         "with and without it nearly overlap (Fig. 4).")
RELATIVE_TOLERANCE = 0.01


def arguments(parser) -> None:
    steps_and_seeds(parser, 600)


# ---- the baseline layer ----

def plain_forward(self: ScMoELayer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache=None,
                  mask: torch.Tensor | None = None):
    """x: (B, S, D) -> (B, S, D) and the routing; the MoE reads norm_f1(x3), beside FFN_1 (no shortcut)."""
    attn0, attn1 = self.self_attn
    x1 = x + attn0(self.input_layernorm[0](x), rope, cache, block=2 * self.index, mask=mask)
    x2 = x1 + self.mlps[0](self.post_attention_layernorm[0](x1))
    x3 = x2 + attn1(self.input_layernorm[1](x2), rope, cache, block=2 * self.index + 1, mask=mask)
    h = self.post_attention_layernorm[1](x3)
    moe_out, routing = self.mlp(h)
    return x3 + self.mlps[1](h) + moe_out, routing


@contextlib.contextmanager
def plain_moe() -> Iterator[None]:
    """Every ScMoELayer runs `plain_forward` inside the block; the original forward is restored after."""
    original = ScMoELayer.forward
    ScMoELayer.forward = plain_forward
    try:
        yield
    finally:
        ScMoELayer.forward = original


@torch.no_grad()
def dataflow_difference(cfg: TrainConfig) -> float:
    """Max |logit difference| between the two layers on one random batch of one model (asserted > 0), and
    check that leaving `plain_moe` restores the ScMoE forward exactly."""
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model).eval()  # the config holds the aligned model
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))  # (B, S)
    ours = model(ids).logits
    with plain_moe():
        plain = model(ids).logits
    again = model(ids).logits
    assert torch.equal(ours, again), "plain_moe() did not restore ScMoELayer.forward"
    diff = (ours - plain).abs().max().item()
    assert diff > 1e-6 * ours.abs().max().item(), f"the plain layer computes the same logits (max diff {diff})"
    return diff


# ---- the experiment ----

def main() -> None:
    setup, args = parse("scmoe", __doc__, arguments, QUICK_RUNS)
    m = setup.base.model
    steps, seeds = args.steps, seed_list(args)
    logit_diff = dataflow_difference(setup.base)
    ours, base = "ScMoE: MoE(norm_f0(x1)), the shortcut", "plain: MoE(norm_f1(x3)), beside FFN_1"
    runs = {}
    for seed in seeds:
        cfg = setup.config([f"seed={seed}"], steps)
        runs[ours, seed] = run(setup, f"scmoe-seed{seed}", cfg)
        with plain_moe():
            runs[base, seed] = run(setup, f"plain-seed{seed}", cfg)
    results = {label: {"final_val_loss": statistics.fmean(final_val(runs[label, s]) for s in seeds),
                       "final_val_loss_per_seed": [final_val(runs[label, s]) for s in seeds]}
               for label in (ours, base)}
    gaps = [final_val(runs[ours, s]) - final_val(runs[base, s]) for s in seeds]  # > 0: ScMoE is worse
    gap = statistics.fmean(gaps)
    spread = statistics.fmean(max(r["final_val_loss_per_seed"]) - min(r["final_val_loss_per_seed"])
                              for r in results.values())  # 0 with one seed
    relative = abs(gap) / results[base]["final_val_loss"]
    reproduced = abs(gap) <= spread or relative < RELATIVE_TOLERANCE
    results.update(val_loss_gap_scmoe_minus_plain_per_seed=gaps, val_loss_gap_mean=gap,
                   val_loss_gap_relative=relative, seed_spread=spread, relative_tolerance=RELATIVE_TOLERANCE,
                   curve_gap_mean_abs=curve_gap(runs, ours, base, seeds),
                   dataflow_check_max_logit_diff=logit_diff)
    verdict = (f"final val loss: ScMoE {results[ours]['final_val_loss']:.4f} vs plain "
               f"{results[base]['final_val_loss']:.4f}: gap {gap:+.4f} ({100 * relative:.2f}% of the loss; per seed "
               f"{', '.join(f'{g:+.4f}' for g in gaps)}), seed-to-seed spread {spread:.4f}")
    fig = plot(runs, ours, base, seeds, spread)
    save(setup, CLAIM, f"micro model ({m.hidden_size}d, {m.num_layers} ScMoE layers, {m.n_routed_experts} FFN + "
         f"{m.zero_expert_num} zero experts, top-{m.moe_topk}), {steps} steps of {setup.base.data.batch_size}x"
         f"{setup.base.data.seq_len} tokens, seeds {seeds}; baseline: same parameters, MoE input moved after "
         f"the second attention", results, verdict, reproduced, fig)


def curve_gap(runs: dict, ours: str, base: str, seeds: list[int]) -> float:
    """Mean |val-loss difference| over every evaluation after the first quarter of training, over seeds."""
    gaps = []
    for seed in seeds:
        steps, a = series(runs[ours, seed], "val_loss")
        b = series(runs[base, seed], "val_loss")[1]
        gaps += [abs(x - y) for s, x, y in zip(steps, a, b) if s > steps[-1] / 4]
    return statistics.fmean(gaps) if gaps else float("nan")


def plot(runs: dict, ours: str, base: str, seeds: list[int], spread: float):
    fig, (a, b) = figure()
    for (label, seed), r in runs.items():
        color, first = ("C0" if label == ours else "C1"), seed == seeds[0]
        steps, loss = series(r, "loss")
        a.plot(steps, smooth(loss, 20), color=color, lw=1, ls="-" if first else ":",
               label=f"{label}, seed {seed}")
    for i, seed in enumerate(seeds):
        steps, loss_ours = series(runs[ours, seed], "loss")
        diff = [x - y for x, y in zip(loss_ours, series(runs[base, seed], "loss")[1])]
        b.plot(steps, smooth(diff, 20), color=f"C{i + 2}", lw=1, label=f"train loss, seed {seed}")
        val_steps, val_ours = series(runs[ours, seed], "val_loss")
        val_diff = [x - y for x, y in zip(val_ours, series(runs[base, seed], "val_loss")[1])]
        b.plot(val_steps, val_diff, color=f"C{i + 2}", marker="o", ms=3, lw=0, label=f"val loss, seed {seed}")
    b.axhline(0, color="k", lw=0.8)
    if spread > 0:
        b.axhspan(-spread, spread, color="0.85", label="seed-to-seed spread of the final val loss")
    a.set(xlabel="step (equal tokens)", ylabel="training loss (20-step mean)", title="loss curves")
    b.set(xlabel="step", ylabel="ScMoE - plain (20-step mean)", title="paired difference (same seed)")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    return fig


if __name__ == "__main__":
    main()

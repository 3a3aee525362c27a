"""Width hyperparameter transfer (report §3.1.1, Table 1): does the best LR found at a proxy width stay the best LR at
2x and 4x the width?

    python experiments/width_transfer.py [--quick] [--steps 110] [--proxy 64] [--mults 2 4] [--lrs 2.5e-3 5e-3 ...]

--lrs: any two or more distinct LRs (sorted here; a repeated one is refused); the default grid is a factor 2 apart.

One LR sweep (optim.lr, the proxy's LR) per width and mode. Every width dimension scales with the hidden size
(FFN and expert FFN widths, q/kv LoRA ranks, attention heads at fixed head dims); depth, experts, top-k, batch,
data and steps stay fixed, as the report keeps depth, sparsity and batch size. At each wider model two modes:
  rules  scaling.proxy_width = the proxy width: with s = width / proxy, hidden and unembedding matrices get
         init variance σ²/s and Adam LR η/s, embeddings (and norms) keep σ² and η (train/optim.py)
  SP     plain standard parameterisation: the proxy's σ and η everywhere
At the proxy width both modes are the same model, run once. The optimum per (width, mode) is the grid argmin of
the final validation loss, refined by a parabola in log2(LR) through the argmin and its two neighbours (any
spacing); its shift
from the proxy's optimum is measured in octaves (factors of 2). The claim counts as reproduced when the shifts
summed over the wider widths are at least half an octave smaller with the rules than in SP. An optimum at the
edge of the grid only bounds its shift: then the verdict is None (undecided) where the bound could flip it, and
always when the proxy's own optimum is at an edge.
"""
from __future__ import annotations

import math

from common import distinct, figure, final_val, parse, positive_float, positive_int, run, save

CLAIM = ("With the width-transfer rules (hidden/unembedding init variance and Adam LR divided by s) the optimal LR "
         "found at the proxy width stays optimal at wider widths; in plain SP it shifts (§3.1.1, Table 1).")
# the model fields that are widths; head dims stay fixed and the head count scales instead
WIDTH_FIELDS = ("hidden_size", "ffn_hidden_size", "expert_ffn_hidden_size", "q_lora_rank", "kv_lora_rank",
                "num_attention_heads")
MODES = ("rules", "SP")
LRS = [2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2]  # a factor 2 apart; 1e-2 beat 4e-2 at the proxy width in a calibration
MARGIN_OCTAVES = 0.5  # how much less (summed over the wider widths) the optimum must move with the rules
QUICK = {"steps": 3}  # and, unless given, one wider width (2x) and two LRs
QUICK_LRS = [4e-3, 1.6e-2]


def arguments(parser) -> None:
    parser.add_argument("--steps", type=positive_int, default=110)
    parser.add_argument("--proxy", type=positive_int, default=None,
                        help="proxy hidden size (default: half the micro model's)")
    parser.add_argument("--mults", type=positive_int, nargs="+", default=None,
                        help="multipliers > 1 of the wider widths (default 2 4; --quick 2); the proxy is always run")
    parser.add_argument("--lrs", type=positive_float, nargs="+", default=None,
                        help=f"LR grid, two or more distinct values (default {LRS}; --quick {QUICK_LRS})")


def grid(args, setup) -> tuple[list[int], list[float]]:
    """The widths (proxy first, then the wider ones ascending) and the sorted LR grid; ValueError for a grid that
    cannot locate an optimum or a width the model does not scale to."""
    proxy = args.proxy or setup.base.model.hidden_size // 2
    mults = distinct("--mults", args.mults or ([2] if setup.quick else [2, 4]))
    if min(mults) < 2:
        raise ValueError(f"--mults: each multiplier must be > 1 (the proxy is always run), got {min(mults)}")
    lrs = sorted(distinct("--lrs", args.lrs or (QUICK_LRS if setup.quick else LRS), 2, "an optimum"))
    widths = [proxy, *(proxy * k for k in sorted(mults))]
    for w in widths:
        setup.config(width_overrides(setup.base.model, w))  # each width's config builds
    return widths, lrs


def width_overrides(model, width: int) -> list[str]:
    """`--set` overrides scaling every width field of `model` by width / model.hidden_size, in an order that
    keeps each intermediate config valid (a LoRA rank may not exceed the hidden size)."""
    out = []
    for name in WIDTH_FIELDS if width >= model.hidden_size else WIDTH_FIELDS[::-1]:
        value = getattr(model, name) * width / model.hidden_size
        if value != int(value) or value < 1:
            raise ValueError(f"width {width}: model.{name}={getattr(model, name)} does not scale to an integer")
        out.append(f"model.{name}={int(value)}")
    return out


def final_loss(setup, label: str, overrides: list[str], steps: int) -> float:
    """Final validation loss of one run; NaN when it diverged (common.run)."""
    return final_val(run(setup, label, setup.config(overrides, steps), may_diverge=True))


def optimum(lrs: list[float], losses: list[float]) -> dict:
    """Grid argmin of `losses` over the ascending `lrs`, and its parabola refinement in log2(LR) through the
    argmin and its neighbours, for any spacing (None at the grid edge or next to NaN)."""
    finite = [v if math.isfinite(v) else math.inf for v in losses]
    i = min(range(len(lrs)), key=finite.__getitem__)
    fitted = None
    if 0 < i < len(lrs) - 1 and math.isfinite(finite[i - 1] + finite[i + 1]):
        (x0, x1, x2), (y0, y1, y2) = (math.log2(lrs[j]) for j in (i - 1, i, i + 1)), finite[i - 1: i + 2]
        left, right = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)  # the slopes either side of the argmin
        curvature = (right - left) / (x2 - x0)  # > 0 at a strict minimum
        vertex = (x0 + x1) / 2 - left / (2 * curvature) if curvature > 0 else x1
        fitted = 2 ** min(max(vertex, x0), x2)
    return {"argmin_lr": lrs[i], "argmin_index": i, "fitted_lr": fitted, "best_loss": finite[i],
            "at_edge": i in (0, len(lrs) - 1)}


def shift(opt: dict, proxy: dict) -> float:
    """log2 of the optimum's move from the proxy's (fitted where both fits exist, else grid argmins)."""
    a, b = opt["fitted_lr"], proxy["fitted_lr"]
    if a is None or b is None:
        a, b = opt["argmin_lr"], proxy["argmin_lr"]
    return math.log2(a / b)


def sweep(setup, widths: list[int], lrs: list[float], steps: int) -> dict[tuple[str, int], list[float]]:
    """Final losses per (mode, width) over the LR grid; the proxy run is shared by both modes."""
    proxy, losses = widths[0], {}
    for w in widths:
        for mode in MODES if w != proxy else MODES[:1]:
            rules = [f"scaling.proxy_width={proxy}"] if mode == "rules" else []
            losses[mode, w] = [final_loss(setup, f"{mode}-w{w}-lr{lr:g}",
                                          [*width_overrides(setup.base.model, w), *rules, f"optim.lr={lr}",
                                           "eval_every=0"], steps) for lr in lrs]
    for mode in MODES[1:]:
        losses[mode, proxy] = losses[MODES[0], proxy]
    return losses


def summarize(losses: dict, widths: list[int], lrs: list[float]) -> tuple[dict, dict, bool]:
    proxy = widths[0]
    opts = {key: optimum(lrs, v) for key, v in losses.items()}
    shifts = {mode: {w: shift(opts[mode, w], opts[mode, proxy]) for w in widths[1:]} for mode in MODES}
    total = {mode: sum(abs(v) for v in shifts[mode].values()) for mode in MODES}
    # the loss cost of simply reusing the proxy's best LR at each width
    regret = {mode: {w: losses[mode, w][opts[mode, proxy]["argmin_index"]] - opts[mode, w]["best_loss"]
                     for w in widths[1:]} for mode in MODES}
    results = {"lrs": lrs, "widths": widths, "proxy_width": proxy,
               "per_mode": {mode: {str(w): {"final_val_loss": losses[mode, w], **opts[mode, w]} for w in widths}
                            for mode in MODES},
               "optimum_shift_octaves": {m: {str(w): v for w, v in s.items()} for m, s in shifts.items()},
               "total_abs_shift_octaves": total,
               "regret_at_proxy_lr": {m: {str(w): v for w, v in r.items()} for m, r in regret.items()},
               "margin_octaves": MARGIN_OCTAVES}
    return results, opts, decide(total, opts, widths)


def decide(total: dict[str, float], opts: dict, widths: list[int]) -> bool | None:
    """rules + margin <= SP in total |shift|. An optimum at the grid edge makes its shift a lower bound: None when
    the proxy's is at an edge, or when a bound is on the side that could flip the outcome."""
    if opts[MODES[0], widths[0]]["at_edge"]:
        return None
    edge = {mode: any(opts[mode, w]["at_edge"] for w in widths[1:]) for mode in MODES}
    reproduced = total["rules"] + MARGIN_OCTAVES <= total["SP"]
    return None if (edge["rules"] if reproduced else edge["SP"]) else reproduced


def plot(losses: dict, opts: dict, widths: list[int], lrs: list[float]):
    fig, axes = figure(len(MODES))
    for ax, mode in zip(axes, MODES):
        for k, w in enumerate(widths):
            label = f"width {w}" + (" (proxy)" if w == widths[0] else f" (s={w // widths[0]})")
            ax.plot(lrs, losses[mode, w], color=f"C{k}", marker="o", ms=3, lw=1, label=label)
            best = opts[mode, w]
            ax.plot(best["argmin_lr"], best["best_loss"], color=f"C{k}", marker="*", ms=12, ls="none")
            if best["fitted_lr"] is not None:
                ax.axvline(best["fitted_lr"], color=f"C{k}", ls=":", lw=1)
        title = "with transfer rules (η/s, σ²/s on hidden+unembedding)" if mode == "rules" else "plain SP (no rules)"
        ax.set(xscale="log", xlabel="optim.lr (proxy LR)", ylabel="final validation loss", title=title)
        ax.legend(fontsize=7)
    return fig


def verdict_text(results: dict, opts: dict, widths: list[int]) -> str:
    proxy, shifts, total = widths[0], results["optimum_shift_octaves"], results["total_abs_shift_octaves"]
    best = opts[MODES[0], proxy]
    edges = [f"{mode} {w}" if w != proxy else f"proxy {w}" for mode in MODES for w in widths
             if opts[mode, w]["at_edge"] and (w != proxy or mode == MODES[0])]
    return (f"optimum LR at the proxy width {proxy}: {best['fitted_lr'] or best['argmin_lr']:.3g}; its shift at "
            + "; ".join(f"{mode} " + ", ".join(f"{w}: {v:+.2f}" for w, v in shifts[mode].items()) for mode in MODES)
            + f" octaves (total |shift| rules {total['rules']:.2f} vs SP {total['SP']:.2f}; reproduced needs "
            f"rules + {MARGIN_OCTAVES} <= SP)"
            + (f"; optimum at the grid edge (a bound only) for {', '.join(edges)}" if edges else ""))


def main() -> None:
    setup, args = parse("width_transfer", __doc__, arguments, QUICK, grid)
    m = setup.base.model
    widths, lrs = grid(args, setup)
    proxy, steps = widths[0], args.steps
    losses = sweep(setup, widths, lrs, steps)
    results, opts, reproduced = summarize(losses, widths, lrs)
    save(setup, CLAIM, f"widths {widths} (proxy {proxy}; FFN, expert FFN, LoRA ranks and heads scale with it), "
         f"{m.num_layers} layers, {m.n_routed_experts}+{m.zero_expert_num} experts top-{m.moe_topk}, {steps} steps "
         f"of {setup.base.data.batch_size}x{setup.base.data.seq_len} tokens, warmup {setup.base.schedule.warmup_steps}"
         f" + cosine, seed {args.seed}, LR grid {lrs}", results, verdict_text(results, opts, widths), reproduced,
         plot(losses, opts, widths, lrs))


if __name__ == "__main__":
    main()

"""Budget control of the FFN experts per token: the report's proportional bias update vs a PID vs a fixed-step sign
update (report §2.1.1, Fig. 3b/3c).

    python experiments/budget_control.py [--quick] [--steps 500] [--seeds 2]

The same micro model with zero experts (top-K over N FFN + Z zero experts, budget K_e FFN experts per token) is
trained with four rules for the router's selection biases, everything else equal (same seed, data, μ schedule):
  proportional  Δb_i = μ_t e_i                        (the report's rule: budget.mode=pid, kp=1, ki=kd=0)
  PID           Δb_i = μ_t (e_i + KI Σe_i + KD Δe_i)   KI = KD = 0.1, |Σe_i| clamped (anti-windup), see below
  sign          Δb_i = μ'_t sign(e_i)                 (DeepSeek's fixed step: budget.mode=sign)
  gentle        the proportional rule at a tenth of the rate (μ = 0.1 μ_0): the report gives no μ
with e_i = K_e/(K N) - T_i/(K T_all). The sign rule's μ' is the mean |Δb| the proportional rule takes on the very
first step of the same seed (same init, same batch), so both start with steps of the same size and decay alike.

PID gains. The plant is nearly static: the routing shares answer the bias at the next step, at a loop gain g that
falls as the router sharpens. For P alone the discrete loop is stable while μg < 2. KI = 0.1 integrates over ~10
steps (it removes the lag the LM loss's steady pull towards FFN experts leaves under P) and keeps μg < 1.9; KD is
kept small because e is noisy per step (2048 tokens) and a derivative on Δb acts as extra immediate gain: with
KD = 0.1 the loop stays stable for μg < 1.6 (roots of z(z-1)^2 + μg [kp z(z-1) + ki z^2 + kd (z-1)^2]). The
integral is clamped so that KI·|Σe| is at most a quarter of the target share: a wound-up integral never dominates.

Measured per rule and seed (layer by layer): the mean and std over steps of FFN experts per token; the convergence
step (the 10-step rolling mean enters and stays within ±3% of K_e, budget_convergence.summarize); the fluctuation
after convergence (std over steps / K_e, of the per-step value and of the 10-step rolling mean, i.e. per 2k and
20k tokens); the per-token std (tokens keep different compute); the per-expert error |e| / target share.
The report's claim counts as reproduced when, for every seed, every layer converges under the proportional rule
(with at least a quarter of the run left to measure), its rolling fluctuation is < 1% in the worst layer, and its
per-token std over the last 50 steps is at least half that of uniformly random routing (hypergeometric); the
report states no μ, so the rule is checked at the recipe's μ and at the gentle one, and the verdict names which
passes.
"""
from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator
from typing import Any

from budget_convergence import summarize
from common import QUICK_RUNS, figure, final_val, parse, run, save, seed_list, series, smooth, steps_and_seeds

from longcat_flash.train.budget import BudgetController

CLAIM = ("The bias controller brings every layer's average FFN experts per token to K_e with < 1% fluctuation, "
         "while the std over tokens stays well above zero (Fig. 3b/3c).")
KI, KD = 0.1, 0.1
WINDOW, TOLERANCE = 10, 0.03  # convergence: rolling mean over WINDOW steps within ±TOLERANCE of K_e
FLUCTUATION_LIMIT = 0.01  # the report's "< 1% fluctuation"
STD_FRACTION = 0.5  # "well above zero": at least half the per-token std of uniformly random routing
GENTLE_RATE = 0.1  # the gentle variant's μ, as a fraction of the recipe's
PROPORTIONAL, PID, SIGN = "proportional (report)", f"PID (ki={KI}, kd={KD})", "sign (fixed step)"
GENTLE = f"proportional, μ x {GENTLE_RATE:g}"
RULES = (PROPORTIONAL, PID, SIGN, GENTLE)


def arguments(parser) -> None:
    steps_and_seeds(parser, 500, per="rule")


@contextlib.contextmanager
def controller_log() -> Iterator[list[dict[str, float]]]:
    """Record every controller update's mean |e| and mean |Δb| (not in metrics.jsonl); BudgetController restored."""
    log: list[dict[str, float]] = []
    original = BudgetController.step

    def step(self: BudgetController, counts: Any) -> Any:
        error, delta = self.error(counts), original(self, counts)
        log.append({"abs_error": error.abs().mean().item(), "abs_delta": delta.abs().mean().item()})
        return delta

    BudgetController.step = step
    try:
        yield log
    finally:
        BudgetController.step = original


def rules(target_share: float, sign_step: float, rate: float) -> dict[str, list[str]]:
    """The bias-update rules as overrides; the PID's integral clamp is KI·limit = target_share / 4."""
    return {
        PROPORTIONAL: ["budget.mode=pid", "budget.kp=1.0", "budget.ki=0.0", "budget.kd=0.0"],
        PID: ["budget.mode=pid", "budget.kp=1.0", f"budget.ki={KI}", f"budget.kd={KD}",
              f"budget.integral_limit={target_share / 4 / KI:.6g}"],
        SIGN: ["budget.mode=sign", f"budget.rate={sign_step:.6g}"],
        GENTLE: ["budget.mode=pid", "budget.kp=1.0", "budget.ki=0.0", "budget.kd=0.0",
                 f"budget.rate={rate * GENTLE_RATE:.6g}"],
    }


def random_routing_std(n_ffn: int, n_zero: int, top_k: int) -> float:
    """Std over tokens of the FFN experts among K picked uniformly without replacement from N + Z (hypergeometric)."""
    total, p = n_ffn + n_zero, n_ffn / (n_ffn + n_zero)
    return math.sqrt(top_k * p * (1 - p) * (total - top_k) / (total - 1))


def layer_stats(records: list[dict[str, Any]], layer: int, k_e: float) -> dict[str, Any]:
    """One layer: mean/std over steps, convergence step and the fluctuation after it (before: over the last half)."""
    values = [r["ffn_experts_per_layer"][layer] for r in records]
    settled = summarize([{**r, "ffn_experts_per_token": v} for r, v in zip(records, values)],
                        WINDOW, TOLERANCE)["settled_step"]
    start = next(i for i, r in enumerate(records) if r["step"] == settled) if settled is not None else len(values) // 2
    after, rolling = values[start:], smooth(values, WINDOW)[start:]
    return {"mean": statistics.fmean(values), "std_over_steps": statistics.pstdev(values), "settled_step": settled,
            "fluctuation_from_step": records[start]["step"],
            "fluctuation_per_step": statistics.pstdev(after) / k_e,
            "fluctuation_rolling": statistics.pstdev(rolling) / k_e}


def analyse(records: list[dict[str, Any]], log: list[dict[str, float]], k_e: float, share: float) -> dict[str, Any]:
    """One run's numbers (skipped steps, which do not update the controller, are left out)."""
    records = [r for r in records if not r["skipped"]]
    whole = summarize(records, WINDOW, TOLERANCE)
    layers = [layer_stats(records, i, k_e) for i in range(len(records[0]["ffn_experts_per_layer"]))]
    settled = [s["settled_step"] for s in layers]
    tail = log[-50:]
    return {
        "layers": layers,
        "settled_step": None if None in settled else max(settled),  # every layer in the band for good
        "settled_step_layer_mean": whole["settled_step"],
        "fluctuation_per_step": max(s["fluctuation_per_step"] for s in layers),  # worst layer
        "fluctuation_rolling": max(s["fluctuation_rolling"] for s in layers),
        "last50_mean_rel_error": whole["tail_mean_rel_error"],
        "per_token_std_last50": whole["tail_std_over_tokens"], "per_token_std_first": whole["first_step_std"],
        "expert_error_last50": statistics.fmean(e["abs_error"] for e in tail) / share,  # mean |e_i| / target share
        "bias_step_first": log[0]["abs_delta"], "bias_step_mean": statistics.fmean(e["abs_delta"] for e in log),
        "final_val_loss": final_val(records),
    }


def converged(result: dict[str, Any], steps: int) -> bool:
    return result["settled_step"] is not None and result["settled_step"] <= 0.75 * steps


def aggregate(per_seed: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Seed means of the scalar results; the convergence step only if every seed converged."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, float)]
    out: dict[str, Any] = {k: statistics.fmean(r[k] for r in per_seed) for k in keys}
    settled = [r["settled_step"] for r in per_seed]
    out.update(converged_all_seeds=all(converged(r, steps) for r in per_seed), settled_step_per_seed=settled,
               settled_step=statistics.fmean(settled) if None not in settled else None,
               per_layer_mean=[statistics.fmean(r["layers"][i]["mean"] for r in per_seed)
                               for i in range(len(per_seed[0]["layers"]))],
               per_layer_std_over_steps=[statistics.fmean(r["layers"][i]["std_over_steps"] for r in per_seed)
                                         for i in range(len(per_seed[0]["layers"]))],
               per_seed=per_seed)
    return out


def train_rule(setup, index: int, seed: int, overrides: list[str], steps: int):
    """One rule, one seed: its metrics and its controller log."""
    with controller_log() as log:
        records = run(setup, f"r{index}-seed{seed}", setup.config([*overrides, f"seed={seed}"], steps))
    return records, log


def train_rules(setup, seeds, steps: int, share: float, extra: list[str]):
    """Per seed: the proportional rule first (its first mean |Δb| sizes the sign rule's step), then the others."""
    runs, logs, sign_steps = {}, {}, {}
    rate = setup.base.budget.rate
    for seed in seeds:
        runs[PROPORTIONAL, seed], logs[PROPORTIONAL, seed] = train_rule(
            setup, 0, seed, [*rules(share, 1.0, rate)[PROPORTIONAL], *extra], steps)
        sign_steps[seed] = max(logs[PROPORTIONAL, seed][0]["abs_delta"], 1e-6)  # budget.rate must be > 0
        for index, label in enumerate(RULES[1:], start=1):
            runs[label, seed], logs[label, seed] = train_rule(
                setup, index, seed, [*rules(share, sign_steps[seed], rate)[label], *extra], steps)
    return runs, logs, sign_steps


def plot(runs, logs, k_e: float, share: float, seed: int):
    fig, (a, b, c, d) = figure(4, width=4.4)
    for color, label in zip(("C0", "C1", "C2", "C3"), RULES):
        records = runs[label, seed]
        steps = [r["step"] for r in records]
        for layer, ls in zip(range(len(records[0]["ffn_experts_per_layer"])), ("-", "--", ":", "-.")):
            values = [r["ffn_experts_per_layer"][layer] for r in records]
            a.plot(steps, smooth(values, WINDOW), color=color, ls=ls, lw=1,
                   label=f"{label}, layer {layer}")
        b.plot(*series(records, "ffn_experts_per_token"), color=color, lw=0.6, alpha=0.8, label=label)
        std_steps, std = series(records, "ffn_experts_std")
        c.plot(std_steps, smooth(std, WINDOW), color=color, lw=1, label=label)
        error = [e["abs_error"] / share for e in logs[label, seed]]
        d.plot([r["step"] for r in records if not r["skipped"]], smooth(error, WINDOW), color=color, lw=1, label=label)
    for ax in (a, b):
        ax.axhline(k_e, color="k", lw=0.8)
        ax.axhspan(k_e * (1 - TOLERANCE), k_e * (1 + TOLERANCE), color="k", alpha=0.08, label="K_e ± 3%")
    a.set(xlabel="step", ylabel=f"FFN experts / token ({WINDOW}-step mean)", title="per layer (Fig. 3b)")
    b.set(xlabel="step", ylabel="FFN experts / token (per step)", title="mean over layers, per step")
    c.set(xlabel="step", ylabel=f"std over tokens ({WINDOW}-step mean)", title="per-token spread (Fig. 3c)")
    d.set(xlabel="step", ylabel="mean |e_i| / target share", title="per-expert error the controller sees")
    for ax in (a, b, c, d):
        ax.legend(fontsize=6)
    return fig


def best(results: dict[str, Any], key: str) -> str | None:
    """Among the rules that converged in every seed, the one with the smallest seed-mean `key`."""
    candidates = {label: r[key] for label, r in results.items() if r["converged_all_seeds"]}
    return min(candidates, key=candidates.get) if candidates else None


def claim_checks(per_seed: list[dict[str, Any]], steps: int, reference_std: float) -> dict[str, bool]:
    """The report's claim, for every seed of one rule."""
    return {"converged": all(converged(r, steps) for r in per_seed),
            "fluctuation_below_1pct": all(r["fluctuation_rolling"] < FLUCTUATION_LIMIT for r in per_seed),
            "per_token_std_high": all(r["per_token_std_last50"] >= STD_FRACTION * reference_std for r in per_seed)}


def describe(label: str, r: dict[str, Any], k_e: float) -> str:
    return (f"{label}: every layer in the ±3% band from step {r['settled_step_per_seed']} (per seed), rolling "
            f"fluctuation {100 * r['fluctuation_rolling']:.2f}% (per step {100 * r['fluctuation_per_step']:.2f}%) "
            f"of K_e={k_e:g}, per-token std {r['per_token_std_last50']:.2f}, per-expert error "
            f"{r['expert_error_last50']:.2f} of the target share")


def verdict(results: dict[str, Any]) -> str:
    k_e = results["k_e"]
    settled = ", ".join(f"{label} {results[label]['settled_step']}" for label in RULES)
    passed = [label for label in (PROPORTIONAL, GENTLE) if all(results["checks"][label].values())]
    return (f"{describe(PROPORTIONAL, results[PROPORTIONAL], k_e)}; {describe(GENTLE, results[GENTLE], k_e)}; "
            f"random routing std {results['random_routing_std']:.2f}; mean convergence step: {settled}; fastest: "
            f"{results['fastest_rule']}, least fluctuation: {results['least_fluctuation_rule']}; the claim holds "
            f"for: {', '.join(passed) or 'neither proportional rate'}")


def main() -> None:
    setup, args = parse("budget_control", __doc__, arguments, QUICK_RUNS)
    m, k_e = setup.base.model, setup.base.ffn_expert_target
    steps, seeds = args.steps, seed_list(args)
    share = k_e / (m.moe_topk * m.n_routed_experts)
    runs, logs, sign_steps = train_rules(setup, seeds, steps, share, [] if setup.quick else ["eval_every=100"])
    results: dict[str, Any] = {label: aggregate([analyse(runs[label, s], logs[label, s], k_e, share) for s in seeds],
                                                steps) for label in RULES}
    reference = random_routing_std(m.n_routed_experts, m.zero_expert_num, m.moe_topk)
    checks = {label: claim_checks(results[label]["per_seed"], steps, reference) for label in (PROPORTIONAL, GENTLE)}
    results.update(k_e=k_e, target_share=share, random_routing_std=reference, sign_step_per_seed=sign_steps,
                   checks=checks, fastest_rule=best(results, "settled_step"),
                   least_fluctuation_rule=best(results, "fluctuation_rolling"))
    save(setup, CLAIM, f"micro model ({m.hidden_size}d, {m.num_layers} layers, top-{m.moe_topk} of "
         f"{m.n_routed_experts} FFN + {m.zero_expert_num} zero experts, K_e={k_e:g}), {steps} steps of "
         f"{setup.base.data.batch_size}x{setup.base.data.seq_len} tokens, μ={setup.base.budget.rate:g} halved every "
         f"{setup.base.budget.decay_every} steps, seeds {list(seeds)}", results, verdict(results),
         any(all(c.values()) for c in checks.values()), plot(runs, logs, k_e, share, args.seed))


if __name__ == "__main__":
    main()

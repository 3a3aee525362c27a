"""Adam epsilon vs gradient RMS (report §3.1.3, Fig. 7): the final loss over a log grid of optim.eps, next to the
gradient RMS measured in training.

    python experiments/adam_eps.py [--quick] [--steps 200] [--seeds 2] [--eps 1e-16 1e-12 ...]

The micro model trains with each ε (same data, init and seeds otherwise). Two gradient scales are measured in the
runs with the smallest ε (the reference):
  global RMS    grad_norm / sqrt(N) per step after warmup, where grad_norm is the trainer's global L2 norm before
                clipping and N counts the parameters that get a gradient (the model config's, less the MTP head when
                loss.mtp_weight is 0); the claim's "gradient RMS"
  per element   AdamW adds ε to sqrt(v̂) of every single parameter (v̂ the bias-corrected EMA of g²), so what ε
                competes with is that distribution; it is read from the reference run's final optimizer state
                (elements whose gradient was always exactly 0, e.g. embedding rows of unseen tokens, are counted
                apart: their update is 0 whatever ε)
ε "far below" is ε <= RMS/100, "at or above" is ε >= RMS (the median global RMS). With 2 seeds the noise is the
largest seed-to-seed spread of the final loss among the far-below ε; tol = max(2 * noise, 0.02). The claim counts as
reproduced when every far-below ε is within tol of the reference loss and every ε >= RMS is worse by more than tol.
"""
from __future__ import annotations

import math
import statistics

import torch
from common import QUICK_RUNS, distinct, figure, final_val, parse, positive_float, run, save, seed_list, steps_and_seeds

from longcat_flash.model import Transformer
from longcat_flash.train.checkpoints import read_checkpoint
from longcat_flash.train.optim import param_kind

CLAIM = ("The loss does not depend on Adam's ε while ε is far below the gradient RMS, and degrades once ε "
         "approaches it (§3.1.3, Fig. 7).")
EPS = [1e-16, 1e-12, 1e-8, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3]
QUICK_EPS = [1e-16, 1e-3]
MIN_TOL = 0.02  # nats: the smallest difference called a change, whatever the seed noise
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def arguments(parser) -> None:
    steps_and_seeds(parser, 200, per="ε")
    parser.add_argument("--eps", type=positive_float, nargs="+", default=None,
                        help=f"ε grid (default {EPS}; with --quick {QUICK_EPS})")


def eps_grid(args, setup) -> list[float]:
    """The ε grid, ascending (the smallest is the reference); ValueError for a repeated ε or a single one."""
    return sorted(distinct("--eps", args.eps or (QUICK_EPS if setup.quick else EPS), 2, "a loss-vs-ε curve"))


def trained_parameters(cfg) -> int:
    """Parameters that receive a gradient: all of the model's, less the MTP head when its loss weight is 0."""
    model = Transformer(cfg.model)
    skip_mtp = cfg.loss.mtp_weight == 0
    return sum(p.numel() for name, p in model.named_parameters() if not (skip_mtp and ".mtp." in f".{name}"))


def global_rms(records: list[dict], n: int, warmup: int) -> list[float]:
    """grad_norm / sqrt(n) per step after warmup (every step if the run is no longer than it), pre-clip as logged."""
    kept = [r for r in records if r["step"] > warmup] or records
    return [r["grad_norm"] / math.sqrt(n) for r in kept if math.isfinite(r["grad_norm"])]


def quantiles(values: torch.Tensor) -> dict[str, float]:
    ordered = values.flatten().sort().values
    return {f"p{round(q * 100)}": float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) for q in QUANTILES}


def adam_denominators(run_dir, beta2: float) -> tuple[torch.Tensor, dict[str, float], int]:
    """sqrt(v̂) of every parameter element in the run's final optimizer state, the median of its non-zero values
    per parameter kind, and how many elements have optimizer state (a check on the parameter count)."""
    states, _ = read_checkpoint(run_dir)
    per_kind: dict[str, list[torch.Tensor]] = {}
    for name, state in states["optimizer"].items():  # parameters that never had a gradient have no state
        bias = 1 - beta2 ** float(state["step"])
        kind = param_kind(name, states["model"][name])
        per_kind.setdefault(kind, []).append((state["exp_avg_sq"].float() / bias).sqrt().flatten())
    kinds = {kind: torch.cat(parts) for kind, parts in per_kind.items()}
    values = torch.cat(list(kinds.values()))
    return values, {kind: float(v[v > 0].median()) for kind, v in kinds.items() if (v > 0).any()}, values.numel()


def decide(eps: list[float], losses: dict[float, list[float]], rms: float) -> tuple[bool | None, dict]:
    """The reproduced rule of the module docstring, with what it was decided from."""
    mean = {e: statistics.fmean(losses[e]) for e in eps}
    ref = mean[eps[0]]
    below, above = [e for e in eps if e <= rms / 100], [e for e in eps if e >= rms]
    noise = max((max(losses[e]) - min(losses[e]) for e in below), default=0.0)
    tol = max(2 * noise, MIN_TOL)
    flat = all(abs(mean[e] - ref) <= tol for e in below) if below else None
    worse = all(mean[e] - ref > tol for e in above) if above else None
    onset = next((e for e in eps if mean[e] - ref > tol), None)
    reproduced = None if flat is None or worse is None else flat and worse
    return reproduced, {"reference_loss": ref, "seed_noise": noise, "tol": tol, "eps_far_below": below,
                        "eps_at_or_above_rms": above, "flat_far_below": flat, "worse_at_or_above": worse,
                        "onset_eps": onset, "onset_over_rms": None if onset is None else onset / rms}


def plot(eps: list[float], losses: dict, seeds: list[int], scales: dict, decision: dict, sqrt_v: torch.Tensor):
    fig, (a, b) = figure()
    lo, mid, hi = (scales["global_grad_rms"][k] for k in ("p10", "median", "p90"))
    for k, seed in enumerate(seeds):
        a.plot(eps, [losses[e][k] for e in eps], "o", ms=3, color=f"C{k}", label=f"seed {seed}")
    a.plot(eps, [statistics.fmean(losses[e]) for e in eps], color="k", lw=1, label="mean")
    a.axvspan(lo, hi, color="C3", alpha=0.2, label="global grad RMS (p10-p90)")
    a.axvline(mid, color="C3", lw=1)
    ref, tol = decision["reference_loss"], decision["tol"]
    a.axhspan(ref - tol, ref + tol, color="0.5", alpha=0.2, label=f"reference ± tol ({tol:.3f})")
    a.set(xscale="log", xlabel="Adam ε", ylabel="final validation loss", title="loss vs ε")
    a.legend(fontsize=7)
    logs = torch.log10(sqrt_v).numpy()
    b.hist(logs, bins=80, color="C0", alpha=0.8)
    for e in eps:
        b.axvline(math.log10(e), color="k", ls=":", lw=0.8)
    b.axvspan(math.log10(lo), math.log10(hi), color="C3", alpha=0.2, label="global grad RMS (p10-p90)")
    b.axvline(math.log10(scales["sqrt_v_hat_quantiles_nonzero"]["p50"]), color="C2", lw=1, label="median sqrt(v̂)")
    b.set(xlabel="log10 sqrt(v̂) per parameter element (dotted: the ε grid)", ylabel="elements", yscale="log",
          title=f"non-zero Adam denominators at the end (ε={eps[0]:g})")
    b.legend(fontsize=7)
    return fig


def gradient_scales(setup, runs: dict, eps: list[float], seeds: list[int]) -> tuple[dict, torch.Tensor]:
    """The measured gradient scales (see the module docstring) as a results dict, and the non-zero per-element
    sqrt(v̂) of the first reference run."""
    n, warmup, clip = trained_parameters(setup.base), setup.base.schedule.warmup_steps, setup.base.optim.grad_clip
    rms_all = [v for s in seeds for v in global_rms(runs[eps[0], s], n, warmup)]
    deciles = statistics.quantiles(rms_all, n=10) if len(rms_all) > 1 else rms_all * 9
    all_sqrt_v, by_kind, n_state = adam_denominators(setup.work / f"eps{eps[0]:g}-seed{seeds[0]}",
                                                     setup.base.optim.betas[1])
    sqrt_v = all_sqrt_v[all_sqrt_v > 0]
    scales = {
        "trained_parameters": n, "parameters_with_adam_state": n_state,
        "global_grad_rms": {"median": statistics.median(rms_all), "p10": deciles[0], "p90": deciles[8],
                            "min": min(rms_all), "max": max(rms_all)},
        "fraction_of_steps_clipped_after_warmup": statistics.fmean(v * math.sqrt(n) > clip for v in rms_all)
        if clip else 0.0,
        "global_grad_rms_after_clipping_median": statistics.median(  # the gradient Adam actually sees
            min(v, clip / math.sqrt(n)) if clip else v for v in rms_all),
        "global_grad_rms_median_per_eps": {f"{e:g}": statistics.median(
            v for s in seeds for v in global_rms(runs[e, s], n, warmup)) for e in eps},
        "fraction_of_elements_with_zero_v": 1 - sqrt_v.numel() / all_sqrt_v.numel(),
        "sqrt_v_hat_quantiles_nonzero": quantiles(sqrt_v), "sqrt_v_hat_median_nonzero_by_kind": by_kind,
        "fraction_of_nonzero_elements_with_sqrt_v_below_eps": {
            f"{e:g}": float((sqrt_v < e).float().mean()) for e in eps}}
    return scales, sqrt_v


def verdict_text(eps: list[float], scales: dict, decision: dict) -> str:
    rms, onset = scales["global_grad_rms"]["median"], decision["onset_eps"]
    flat_up_to = max(e for e in eps if onset is None or e < onset)
    return (f"global gradient RMS {rms:.2g} (median; per-element sqrt(v̂) median "
            f"{scales['sqrt_v_hat_quantiles_nonzero']['p50']:.2g}); loss {decision['reference_loss']:.4f} at "
            f"ε={eps[0]:g}, within ±{decision['tol']:.3f} up to ε={flat_up_to:g}, first worse at ε="
            + (f"{onset:g} ({onset / rms:.2g}x the RMS)" if onset is not None else "none of the grid")
            + f"; ε<=RMS/100 flat: {decision['flat_far_below']}, ε>=RMS worse: {decision['worse_at_or_above']}")


def main() -> None:
    setup, args = parse("adam_eps", __doc__, arguments, QUICK_RUNS, eps_grid)
    eps = eps_grid(args, setup)
    steps, seeds = args.steps, seed_list(args)
    runs = {(e, s): run(setup, f"eps{e:g}-seed{s}", setup.config([f"optim.eps={e}", f"seed={s}", "eval_every=0"],
                                                                 steps)) for e in eps for s in seeds}
    losses = {e: [final_val(runs[e, s]) for s in seeds] for e in eps}
    scales, sqrt_v = gradient_scales(setup, runs, eps, seeds)
    reproduced, decision = decide(eps, losses, scales["global_grad_rms"]["median"])
    results = {"eps": eps, "final_val_loss_per_seed": {f"{e:g}": losses[e] for e in eps},
               "final_val_loss_mean": {f"{e:g}": statistics.fmean(losses[e]) for e in eps}, **scales, **decision}
    m = setup.base.model
    save(setup, CLAIM, f"micro model ({m.hidden_size}d, {m.num_layers} layers, "
         f"{scales['trained_parameters'] / 1e6:.2f}M trained parameters), {steps} steps of "
         f"{setup.base.data.batch_size}x{setup.base.data.seq_len} tokens, lr {setup.base.optim.lr:g}, ε grid {eps}, "
         f"seeds {seeds}", results, verdict_text(eps, scales, decision), reproduced,
         plot(eps, losses, seeds, scales, decision, sqrt_v))


if __name__ == "__main__":
    main()

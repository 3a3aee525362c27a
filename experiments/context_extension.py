"""Context extension: held-out loss by position up to 4x the pre-training length, before and after extending the
RoPE (report §3.4's mid-training stage; LongCat-Flash-Lite extends with YaRN).

    python experiments/context_extension.py [--quick] [--pretrain-steps 400] [--extend-steps 100] [--theta 1e4]

A micro model is pre-trained on windows of S = data.seq_len tokens (RoPE base --theta). Then, from its HF
directory (`init_from`), the same continued-training budget (--extend-steps steps of the same tokens per step, in
windows of 4S) is spent three ways: RoPE-base extension (rope_theta raised by 4^(d/(d-2)), d = qk_rope_head_dim,
which slows the lowest frequency by exactly 4: "NTK-aware"), YaRN (rope_scaling factor 4 over the original S) and,
as a control, no RoPE change at all. Each model, and the base model with each RoPE change applied to its
config.json without any training, is scored on the same held-out windows of 4S tokens (all of the validation
split, up to --windows): the mean next-token loss at every position.

The claim is judged on the two extensions after continued training, against the control: their mean loss over
positions [S, 4S) is at least 0.05 nats below the control's (the same continued training at 4S without a RoPE
change), i.e. the RoPE change itself must extend the context. Their gains over the base model (which include what
the continued training alone gives) and the RoPE changes without training are reported beside them, not judged.
"""
from __future__ import annotations

import dataclasses
import shutil
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cleared, figure, parse, positive_float, positive_int, run, save, smooth

from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.config import ModelConfig
from longcat_flash.data import TokenDataset, build_token_shard
from longcat_flash.tokenizer import Tokenizer

CLAIM = ("Raising the RoPE base or applying YaRN, then training briefly at the longer length, extends the context: "
         "positions past the pre-training length get a clearly lower held-out loss than after the same training "
         "without the RoPE change (report §3.4; LongCat-Flash-Lite extends with YaRN).")
FACTOR = 4  # context multiplier
MARGIN = 0.05  # the control's loss over [S, 4S) minus an extension's, at least (nats)
EXTENSIONS, CONTROL = ("rope-theta", "yarn"), "no-rope-change"
QUICK = {"pretrain_steps": 8, "extend_steps": 2, "windows": 16}


def arguments(parser) -> None:
    parser.add_argument("--pretrain-steps", type=positive_int, default=400)
    parser.add_argument("--extend-steps", type=positive_int, default=100, help="continued-training steps, each variant")
    parser.add_argument("--theta", type=positive_float, default=1e4, help="the pre-training RoPE base")
    parser.add_argument("--windows", type=positive_int, default=512, help="most held-out windows of 4S tokens scored")


def pretraining(args, setup) -> list[str]:
    """The overrides of the pre-training run (and of every run after it): its RoPE base and length."""
    return [f"model.rope_theta={args.theta}", f"model.max_position_embeddings={setup.base.data.seq_len}"]


def check(args, setup) -> None:
    """Every run's config builds (a RoPE base the model accepts, before and after each extension)."""
    pre = pretraining(args, setup)
    for overrides in extensions(setup.config(pre).model, setup.base.data.seq_len, args.theta).values():
        setup.config([*pre, *overrides, f"data.seq_len={FACTOR * setup.base.data.seq_len}"])


def extensions(cfg: ModelConfig, S: int, theta: float) -> dict[str, list[str]]:
    """The model.* overrides of each way to extend from S to FACTOR * S positions (--set syntax)."""
    d = cfg.qk_rope_head_dim
    longer = [f"model.max_position_embeddings={FACTOR * S}"]
    yarn = {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": S}
    return {"rope-theta": [*longer, f"model.rope_theta={theta * FACTOR ** (d / (d - 2)):.6g}"],
            "yarn": [*longer, f"model.rope_scaling={yarn}"],
            CONTROL: longer}


@torch.no_grad()
def loss_by_position(model_dir: Path, windows: torch.Tensor) -> list[float]:
    """Mean next-token loss at each position 0..L-1 over `windows` (N, L+1) token ids."""
    model = LongcatFlash.from_pretrained(model_dir, dtype=torch.float32)
    losses = []
    for batch in windows.split(8):
        logits = model(batch[:, :-1]).logits  # (B, L, V)
        losses.append(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none"))  # (B, L)
    return torch.cat(losses).mean(0).tolist()


def with_config(base_dir: Path, out: Path, cfg: ModelConfig) -> Path:
    """The base checkpoint with another config.json (and its tokenizer's model_max_length the new context): a
    RoPE change applied without any training."""
    shutil.copytree(base_dir, cleared(out), ignore=shutil.ignore_patterns("checkpoints", "*.jsonl", "tensorboard"))
    cfg.save_json(out)
    tokenizer = Tokenizer.load(out)
    tokenizer.model_max_length = cfg.max_position_embeddings
    tokenizer.save(out)
    return out


def spans(curve: list[float], S: int) -> dict[str, float]:
    """Mean loss over each block of S positions and over everything past S."""
    out = {f"[{k * S},{(k + 1) * S})": statistics.fmean(curve[k * S:(k + 1) * S]) for k in range(FACTOR)}
    return {**out, f"[{S},{FACTOR * S})": statistics.fmean(curve[S:])}


def judge(results: dict, S: int) -> tuple[dict, bool, str]:
    """The gains over the base and over the control of every scored model, whether the claim holds (each extension
    beats the control by MARGIN), and the verdict."""
    L = FACTOR * S
    scored = [label for label, r in results.items() if isinstance(r, dict) and "spans" in r]
    past = {label: results[label]["spans"][f"[{S},{L})"] for label in scored}
    over_base = {label: past["base"] - past[label] for label in scored}
    over_control = {label: past[CONTROL] - past[label] for label in EXTENSIONS}
    reproduced = all(gain >= MARGIN for gain in over_control.values())
    verdict = (f"held-out loss over positions [{S},{L}) (within [0,{S}) in brackets): " + "; ".join(
        f"{label} {past[label]:.3f} ({results[label]['spans'][f'[0,{S})']:.3f}), {over_base[label]:+.3f} vs base"
        for label in scored) + "; the extensions vs the control (the same continued training, no RoPE change): "
        + ", ".join(f"{label} {gain:+.3f}" for label, gain in over_control.items())
        + f" (the claim needs >= {MARGIN} for both): "
        + ("reproduced" if reproduced else f"not reproduced at this scale, the continued training alone gives "
           f"{over_base[CONTROL]:+.3f} of the extensions' {min(over_base[e] for e in EXTENSIONS):+.3f} to "
           f"{max(over_base[e] for e in EXTENSIONS):+.3f} over the base"))
    return {"past_S_gain_over_base": over_base, "past_S_gain_over_control": over_control}, reproduced, verdict


def plot(curves: dict[str, list[float]], S: int):
    fig, (a, b) = figure()
    trained = [k for k in curves if not k.startswith("base")]
    groups = ((a, "without training", ["base", "base + rope-theta", "base + yarn"]),
              (b, f"after continued training at {FACTOR * S}", ["base", *trained]))
    for ax, title, labels in groups:
        for i, label in enumerate(labels):
            ax.plot(smooth(curves[label], max(2, S // 8)), color=f"C{i}", lw=1, label=label)
        ax.axvline(S, color="grey", ls=":", lw=1)
        ax.set(xlabel=f"position (pre-training length S={S}, dotted)", ylabel="held-out loss (moving mean)",
               title=title)
        top = min(max(max(curves[label][S:]) for label in labels), 2 * max(curves["base"][:S]))
        ax.set_ylim(top=top + 0.2)
        ax.legend(fontsize=7)
    return fig


def main() -> None:
    setup, args = parse("context_extension", __doc__, arguments, QUICK, check)
    S, base = setup.base.data.seq_len, setup.base
    L, theta = FACTOR * S, args.theta
    pre = pretraining(args, setup)
    run(setup, "base", setup.config(pre, args.pretrain_steps))
    base_dir = setup.work / "base"
    batch = max(1, base.data.batch_size * S // L)  # the same tokens per step in windows 4x longer
    variants = extensions(setup.config(pre).model, S, theta)
    for label, model_overrides in variants.items():
        run(setup, label, setup.config([*pre, f"init_from={base_dir}", *model_overrides, f"data.seq_len={L}",
                                        f"data.batch_size={batch}"], args.extend_steps))
    tokenizer = Tokenizer.load(base.data.tokenizer)
    shard = build_token_shard(base.data.source, tokenizer, base.data.cache_dir, text_field=base.data.text_field,
                              max_bytes=base.data.max_bytes, progress=False)
    val = TokenDataset.from_shard(shard, L, "val", base.data.val_fraction)
    n = min(len(val), args.windows)
    windows = val.batch(range(n))  # (n, L+1)
    base_cfg = ModelConfig.from_json(base_dir)
    dirs = {"base": base_dir, **{label: setup.work / label for label in variants}}
    for label in ("rope-theta", "yarn"):  # the same config.json change, no training
        extended = ModelConfig.from_json(setup.work / label)
        dirs[f"base + {label}"] = with_config(base_dir, setup.work / f"base+{label}", dataclasses.replace(
            base_cfg, rope_theta=extended.rope_theta, rope_scaling=extended.rope_scaling,
            max_position_embeddings=extended.max_position_embeddings))
    curves = {label: loss_by_position(d, windows) for label, d in dirs.items()}
    results = {label: {"spans": spans(c, S), "rope_theta": ModelConfig.from_json(dirs[label]).rope_theta,
                       "rope_scaling": ModelConfig.from_json(dirs[label]).rope_scaling.to_dict(),
                       "loss_by_position": [round(x, 4) for x in c]} for label, c in curves.items()}
    gains, reproduced, verdict = judge(results, S)
    results.update(S=S, windows=n, **gains)
    m = setup.config(pre).model
    save(setup, CLAIM,
         f"micro model ({m.hidden_size}d, {m.num_layers} layers, rotary dim {m.qk_rope_head_dim}), pre-trained "
         f"{args.pretrain_steps} steps of {base.data.batch_size}x{S} tokens at RoPE base {theta:g}; "
         f"each extension to {L}: {args.extend_steps} steps of {batch}x{L} tokens from the "
         f"pre-trained checkpoint (init_from); scored on {n} held-out windows of {L} tokens",
         results, verdict, reproduced, plot(curves, S))


if __name__ == "__main__":
    main()

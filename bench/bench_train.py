"""Train-step throughput: our `train_step` vs transformers' LongcatFlashForCausalLM (issue 3, item 8).

Side by side in one run, identical weights (ours saved with zero-expert stubs and loaded by transformers), same
dtype, same deterministic-algorithm setting, same batches:
  ours    longcat_flash.train.trainer.train_step: forward, LM + z + balance losses, backward, clip, AdamW,
          budget-controller update (MTP off: transformers has no MTP head)
  theirs  forward, the same fp32 LM cross-entropy, backward, clip, AdamW
Steps are interleaved so machine noise hits both alike; the median of `--steps` timed steps per side is reported.

    python bench/bench_train.py [--config small|fine] [--dtype bfloat16|float32] [--batch 8] [--seq 256]
                                [--steps 6] [--profile]

`fine` is the small preset with LongCat-Flash's expert granularity (128 FFN + 64 zero experts, top-12, expert
width 64): the MoE, where the two implementations differ, is then most of the step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.device import autocast as device_autocast
from longcat_flash.runtime import tune_cpu_allocator
from longcat_flash.train.config import recipe
from longcat_flash.train.determinism import set_deterministic
from longcat_flash.train.optim import build_optimizer, width_scale
from longcat_flash.train.losses import lm_loss
from longcat_flash.train.trainer import train_step

CONFIGS = {
    "small": {},
    "fine": dict(n_routed_experts=128, zero_expert_num=64, moe_topk=12, expert_ffn_hidden_size=64),
}


def build(config: str, dtype: str, batch: int, seq: int):
    """Our model, a train config, and transformers' model with the same weights."""
    import transformers

    base = recipe("small")
    model_cfg = base.model.replace(num_nextn_predict_layers=0, **CONFIGS[config])
    cfg = dataclasses.replace(base, model=model_cfg, dtype=dtype, max_steps=1000,
                              data=dataclasses.replace(base.data, batch_size=batch, seq_len=seq),
                              loss=dataclasses.replace(base.loss, mtp_weight=0.0, monitor_every=0))
    torch.manual_seed(0)
    ours = LongcatFlash(model_cfg).train()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp, zero_expert_stubs=True)
        theirs = transformers.LongcatFlashForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
    return cfg, ours, theirs


def our_step(cfg, model, full: bool = False) -> Callable[[torch.Tensor], float]:
    """One `train_step` per call on the model's device; returns the LM loss (full: the step's metrics dict)."""
    from longcat_flash.train.budget import BudgetController

    m = cfg.model
    optimizer = build_optimizer(model, cfg.optim, width_scale(None, m.hidden_size))
    controller = BudgetController(cfg.budget, m.num_layers, m.n_routed_experts, m.moe_topk, cfg.ffn_expert_target,
                                  next(model.parameters()).device)
    step = [0]

    def run(batch: torch.Tensor) -> float:
        metrics = train_step(model, optimizer, controller, batch, cfg, step[0])
        step[0] += 1
        return metrics if full else metrics["lm_loss"]

    return run


def their_step(cfg, model) -> Callable[[torch.Tensor], float]:
    """One transformers step per call on the model's device (AdamW fused on CUDA, as ours); returns the loss."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda" or None)

    def run(batch: torch.Tensor) -> float:
        with device_autocast(device, cfg.dtype):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = lm_loss(logits, batch[:, 1:])  # the same fp32 cross-entropy as ours (and as transformers' own)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return run


def step_times(steps: dict[str, Callable], batches: list[torch.Tensor], warmup: int) -> dict[str, list[float]]:
    """Seconds per step for each side, interleaved step by step."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def profile(fn: Callable, batch: torch.Tensor, title: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(batch)
    print(f"\n== {title}: top ops by self CPU time ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument("--profile", action="store_true", help="also print the top ops of one step per side")
    args = parser.parse_args()
    for name in ("batch", "seq", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    context = recipe("small").model.replace(**CONFIGS[args.config]).max_position_embeddings
    if args.seq > context:  # named as the flag, not as the recipe's data.seq_len
        parser.error(f"--seq {args.seq} is past the model's context ({context})")
    tune_cpu_allocator()  # process-wide: both sides of the comparison get it

    set_deterministic(True)  # as in training
    cfg, ours, theirs = build(args.config, args.dtype, args.batch, args.seq)
    steps = {"ours": our_step(cfg, ours), "transformers": their_step(cfg, theirs)}
    gen = torch.Generator().manual_seed(0)
    warmup = 2
    batches = [torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=gen)
               for _ in range(warmup + args.steps)]
    first = {name: fn(batches[0]) for name, fn in steps.items()}  # identical weights: identical first loss
    times = step_times(steps, batches[1:], warmup - 1)
    tokens = args.batch * args.seq
    median = {name: statistics.median(t) for name, t in times.items()}
    rate = {name: tokens / s for name, s in median.items()}
    ratio = rate["ours"] / rate["transformers"]
    print(f"config={args.config} dtype={args.dtype} batch={args.batch} seq={args.seq} "
          f"params={sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M threads={torch.get_num_threads()}")
    print(f"first-step LM loss: ours {first['ours']:.5f}  transformers {first['transformers']:.5f}")
    print(f"{'':14s}{'s/step (median)':>16s}{'min':>8s}{'tokens/s':>10s}")
    for name in steps:
        print(f"{name:14s}{median[name]:16.3f}{min(times[name]):8.3f}{rate[name]:10.0f}")
    print(f"ratio ours / transformers: {ratio:.2f}x")
    if args.profile:
        for name, fn in steps.items():
            profile(fn, batches[-1], name)
    print(json.dumps({"bench": "train_step", "config": args.config, "dtype": args.dtype, "batch": args.batch,
                      "seq": args.seq, "ours_tokens_per_s": round(rate["ours"], 1),
                      "transformers_tokens_per_s": round(rate["transformers"], 1), "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()

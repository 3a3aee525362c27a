"""Expert parallelism on CPU (issue 5, item 5): what the ScMoE overlap buys, and the bytes zero experts save.

    python bench/bench_ep.py [--ep 2] [--tokens 512] [--repeats 10] [--dtype float32]

Started with plain python it relaunches itself under torchrun with --ep processes (gloo). Side by side in one
run, identical weights, timed calls interleaved so machine noise hits both sides alike:
  1. one ScMoE layer of the `bench` preset (64 FFN + 32 zero experts, top-8, d=1024), experts sharded over the
     ep ranks: forward, and forward + backward, with the overlap on vs off (ratio on/off < 1: overlap helps);
  2. a training step of the `small` preset (forward, backward, gradient reduction, AdamW), overlap on vs off;
  3. the dispatch + combine round trip alone, and bytes each rank sends per token per MoE layer, with the
     zero-expert slots skipped (ours) vs sent to ranks like FFN experts (a dispatcher unaware of zero experts).
Times are the slowest rank's, medians over the repeats. Prints a table and one JSON line with the ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longcat_flash import distributed as lcd
from longcat_flash.model import Transformer
from longcat_flash.model.layers import RotaryEmbedding
from longcat_flash.presets import bench, small
from longcat_flash.runtime import tune_cpu_allocator


def timed_ms(*fns, repeats: int) -> list[float]:
    """Median milliseconds per call of each fn on the slowest rank; calls interleaved, one warm-up each."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            dist.barrier()
            start = time.perf_counter()
            fn()
            elapsed = torch.tensor(time.perf_counter() - start)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            bucket.append(float(elapsed) * 1e3)
    return [statistics.median(bucket) for bucket in times]


def blocked(model: torch.nn.Module, fn, exposed: list[float]):
    """fn(model); records the seconds this rank sat blocked on all-to-alls (not hidden)."""
    def run():
        lcd.comm_stats(model, reset=True)
        fn(model)
        exposed.append(lcd.comm_stats(model).wait_s)
    return run


def rank_mean(value: float) -> float:
    t = torch.tensor(value)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def layer_bench(args, group, dtype) -> tuple[dict, list]:
    """One sharded ScMoE layer of the bench preset: forward and forward+backward, overlap on vs off (two copies of
    the same weights, one per dispatcher setting)."""
    cfg = bench().replace(num_layers=1, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    full = Transformer(cfg).model.layers[0].to(dtype)
    on_layer, off_layer = (lcd.shard_experts(copy.deepcopy(full), group, overlap) for overlap in (True, False))
    x = torch.randn(1, args.tokens, cfg.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(lcd.rank()))
    rope = RotaryEmbedding.from_config(cfg)(torch.arange(args.tokens)[None], dtype)
    x_grad = x.clone().requires_grad_()

    def forward(layer):
        with torch.no_grad():
            layer(x, rope)

    def train(layer):
        out, _ = layer(x_grad, rope)
        out.float().square().mean().backward()

    result, rows = {}, []
    for label, fn in (("layer forward", forward), ("layer fwd+bwd", train)):
        exposed_on, exposed_off = [], []
        on, off = timed_ms(blocked(on_layer, fn, exposed_on), blocked(off_layer, fn, exposed_off),
                           repeats=args.repeats)
        exposed = [rank_mean(statistics.median(e) * 1e3) for e in (exposed_off, exposed_on)]
        rows.append((label, off, on, *exposed))
        key = label.replace(" ", "_").replace("+", "_")
        result[f"{key}_ratio_on_off"] = round(on / off, 3)
        result[f"{key}_exposed_a2a_ms_off"], result[f"{key}_exposed_a2a_ms_on"] = (round(x, 2) for x in exposed)
    result.update(traffic_bench(args, on_layer, x, group))
    return result, rows


def traffic_bench(args, layer, x: torch.Tensor, group) -> dict:
    """Dispatch + combine round trip (identity experts) and bytes per token: zero slots skipped vs sent."""
    moe = layer.mlp
    with torch.no_grad():
        s = layer.post_attention_layernorm[0](x).view(-1, x.shape[-1])  # (T, D) what the MoE sees
        _, ids, _ = moe.router(s)
    n_all = moe.router.classifier.out_features  # E + Z: zero experts placed on ranks like FFN experts
    dispatchers = {"skip": lcd.AllToAllDispatcher(group), "send": lcd.AllToAllDispatcher(group)}

    def round_trip(name: str, n_routed: int):
        def run():
            d = dispatchers[name]
            with torch.no_grad():
                route = d.dispatch(s, ids, n_routed)
                rows, _ = d.wait_dispatch(route)
                d.wait_combine(d.combine(rows, route))
        return run

    skip_ms, send_ms = timed_ms(round_trip("skip", moe.n_ffn), round_trip("send", n_all), repeats=args.repeats)
    per_token = {k: d.stats.bytes_sent / d.stats.tokens for k, d in dispatchers.items()}
    return {"zero_slot_share": round(float((ids >= moe.n_ffn).float().mean()), 3),
            "bytes_per_token_skip": round(per_token["skip"]), "bytes_per_token_send": round(per_token["send"]),
            "bytes_saved_fraction": round(1 - per_token["skip"] / per_token["send"], 3),
            "a2a_round_trip_ms_skip": round(skip_ms, 2), "a2a_round_trip_ms_send": round(send_ms, 2)}


def train_step_bench(args, mesh, dtype) -> tuple[dict, list]:
    """Full training steps of the small preset at (dp=1, ep), sharded as for training (FSDP2, experts over ep):
    overlap on vs off (two copies of the same weights, each with its own optimizer)."""
    torch.manual_seed(0)
    full = Transformer(small()).to(dtype)
    models = [lcd.parallelize(copy.deepcopy(full), mesh, overlap=overlap) for overlap in (True, False)]
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models}
    ids = torch.randint(3, small().vocab_size, (args.tokens // 256 or 1, min(args.tokens, 256)),
                        generator=torch.Generator().manual_seed(lcd.rank()))

    def step(model):
        opt = optimizers[id(model)]
        opt.zero_grad(set_to_none=True)
        out = model(ids, with_mtp=True)
        F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        lcd.average_expert_gradients(model, mesh)
        opt.step()

    exposed_on, exposed_off = [], []
    on, off = timed_ms(blocked(models[0], step, exposed_on), blocked(models[1], step, exposed_off),
                       repeats=args.repeats)
    exposed = [rank_mean(statistics.median(e) * 1e3) for e in (exposed_off, exposed_on)]
    return {"train_step_ratio_on_off": round(on / off, 3)}, [("train step (small)", off, on, *exposed)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep", type=int, default=2, help="expert-parallel processes")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.ep < 2:
        parser.error("--ep must be >= 2: an all-to-all needs two ranks")
    experts = math.gcd(bench().n_routed_experts, small().n_routed_experts)
    if experts % args.ep:  # each rank holds a whole share of both layers' experts
        parser.error(f"--ep {args.ep} does not divide the {experts} FFN experts the benchmark's layers have")
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be >= 1")
    if args.tokens > 65536 or (args.tokens > 256 and args.tokens % 256):  # the step trains rows of 256 tokens
        parser.error(f"--tokens {args.tokens}: the training step takes rows of 256 tokens; give at most 256, or a "
                     "multiple of 256 up to 65536")
    tune_cpu_allocator()  # process-wide: both sides of the comparison get it
    if "LOCAL_RANK" not in os.environ:  # not yet under torchrun (WORLD_SIZE alone is 1 there with one rank)
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={args.ep}", __file__, *sys.argv[1:]]))
    lcd.init()
    mesh = lcd.build_mesh(1, lcd.world_size())
    dtype = getattr(torch, args.dtype)
    result = {"ep": lcd.world_size(), "tokens_per_rank": args.tokens, "dtype": args.dtype,
              "threads_per_rank": torch.get_num_threads()}
    layer_result, rows = layer_bench(args, mesh.get_group("ep"), dtype)
    train_result, train_rows = train_step_bench(args, mesh, dtype)
    result.update(layer_result | train_result)
    lcd.print0(f"{'case (ep=' + str(result['ep']) + ', ' + str(args.tokens) + ' tokens/rank)':<34}"
               f"{'overlap off ms':>15}{'on ms':>10}{'on/off':>8}   {'blocked on a2a, off / on ms':>28}")
    for label, off, on, exposed_off, exposed_on in rows + train_rows:
        lcd.print0(f"{label:<34}{off:>15.1f}{on:>10.1f}{on / off:>8.3f}   {exposed_off:>18.1f} / {exposed_on:.1f}")
    lcd.print0(f"\nall-to-all per rank, bench layer ({result['zero_slot_share']:.0%} of top-k slots on zero experts):")
    for key, label in (("skip", "zero slots skipped (ours)"), ("send", "zero slots sent like FFN experts")):
        lcd.print0(f"  {label:<34}{result['bytes_per_token_' + key]:>7} B/token/layer  "
                   f"round trip {result['a2a_round_trip_ms_' + key]:.1f} ms")
    lcd.print0(f"  saved: {result['bytes_saved_fraction']:.1%} of the bytes")
    lcd.print0(json.dumps(result))
    lcd.teardown()


if __name__ == "__main__":
    main()

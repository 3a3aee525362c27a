"""MTP speculative decoding on a trained checkpoint: acceptance rate, mean accepted length, speed-up (issue 4, item 4).

Prompts are lines of held-out text (this repository's sources, not in the stdlib training corpus). For each draft
length k, greedy and sampled: the acceptance rate (accepted / proposed drafts), the mean accepted length (tokens per
verification forward) and tok/s over whole requests (the prefill and first token included) against k = 0 at batch
1, the median of --repeats rounds that each run every k in turn after a warm-up round (so machine noise hits both
sides alike); greedy outputs are checked token for token against plain greedy. Prints a table and one JSON line.

    python bench/bench_mtp.py --model RUN_DIR [--drafts 1 2 3] [--prompts 8] [--new-tokens 48] [--repeats 3]
                              [--quantize int4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from infer_common import bench_checkpoint, no_mtp_head, table

from longcat_flash.flag_types import parse_distinct, positive_int
from longcat_flash.infer.engine import MAX_SPECULATIVE, Engine, EngineConfig
from longcat_flash.infer.loader import load_for_inference
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.runtime import tune_cpu_allocator
from longcat_flash.tokenizer import Tokenizer

SOURCES = Path(__file__).resolve().parents[1] / "src" / "longcat_flash"


def source_lines() -> list[str]:
    """The code lines of 20+ characters in this package's sources: the prompts are drawn from them."""
    return [line for p in sorted(SOURCES.rglob("*.py")) for line in p.read_text().splitlines()
            if len(line.strip()) > 20]


def prompts(tokenizer: Tokenizer, n: int) -> list[list[int]]:
    """n of the source lines, evenly spread."""
    lines = source_lines()
    return [tokenizer.encode(lines[i * len(lines) // n]) for i in range(n)]


def run(model: torch.nn.Module, k: int, ps: list[list[int]], params: SamplingParams) -> tuple[list, dict]:
    """One request at a time (batch 1); returns outputs and the figures."""
    engine = Engine(model, EngineConfig(speculative=k, max_running=1))
    outputs, generated, start = [], 0, time.perf_counter()
    for p in ps:
        out = engine.generate([p], params)[0]
        outputs.append(out)
        generated += len(out)
    seconds = time.perf_counter() - start
    d = engine.stats.drafts
    return outputs, {"tok_s": generated / seconds, "acceptance_rate": d.acceptance_rate,
                     "mean_accepted_length": d.mean_accepted_length}


def measure(model: torch.nn.Module, ks: list[int], ps: list[list[int]], params: SamplingParams, repeats: int
            ) -> dict[int, tuple[list, dict]]:
    """Each k's outputs and figures, its tok/s the median of `repeats` interleaved rounds after a warm-up one."""
    results = {k: run(model, k, ps, params) for k in ks}  # the warm-up round; outputs and draft figures repeat
    speeds: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            speeds[k].append(run(model, k, ps, params)[1]["tok_s"])
    return {k: (out, {**figures, "tok_s": statistics.median(speeds[k])}) for k, (out, figures) in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint with an MTP head (a trained one: drafts accepted)")
    parser.add_argument("--drafts", type=positive_int, nargs="+", default=[1, 2, 3],
                        help=f"draft lengths k, 1 to {MAX_SPECULATIVE} (k = 0, the baseline, always runs)")
    parser.add_argument("--prompts", type=positive_int, default=8, help="prompts, lines of the package's sources")
    parser.add_argument("--new-tokens", type=positive_int, default=48, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds per k (after one warm-up round)")
    parser.add_argument("--quantize", default=None, choices=["int8", "fp8", "int4", "int4-mixed"],
                        help="weight format (default: the checkpoint's)")
    args = parse_distinct(parser, "drafts")
    if max(args.drafts) > MAX_SPECULATIVE:
        parser.error(f"--drafts: at most {MAX_SPECULATIVE} drafts per step, got {max(args.drafts)}")
    if args.new_tokens < 2:  # the first token comes from the prefill: speculation starts with the second
        parser.error(f"--new-tokens must be at least 2 (drafts are verified after the first token), got "
                     f"{args.new_tokens}")
    if args.prompts > (lines := len(source_lines())):  # more would repeat them (and 10^8 grew memory unbounded)
        parser.error(f"--prompts {args.prompts}: the package's sources hold {lines} lines to draw prompts from")
    args.model = bench_checkpoint(args.model, tokenizer=True)  # an error naming --model, not a traceback
    if why := no_mtp_head(args.model):
        parser.error(f"--model: {why}")
    tune_cpu_allocator()  # process-wide: both sides of the comparison get it
    tokenizer = Tokenizer.load(args.model)
    model, _ = load_for_inference(args.model, quantize=args.quantize)
    ps = prompts(tokenizer, args.prompts)
    context = model.config.max_position_embeddings
    if max(map(len, ps)) + args.new_tokens > context:  # the engine would stop each request at the context
        parser.error(f"--new-tokens {args.new_tokens} after the longest prompt ({max(map(len, ps))} tokens) is past "
                     f"the model's context ({context})")
    modes = {"greedy": SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True),
             "T=0.8 top-p 0.95": SamplingParams(max_new_tokens=args.new_tokens, temperature=0.8, top_p=0.95,
                                               seed=0, ignore_eos=True)}
    rows, result = [], {"prompts": len(ps), "new_tokens": args.new_tokens, "quantize": args.quantize,
                        "repeats": args.repeats}
    for mode, params in modes.items():
        measured = measure(model, [0, *args.drafts], ps, params, args.repeats)
        plain, base = measured[0]
        for k in args.drafts:
            outputs, figures = measured[k]
            same = outputs == plain if params.greedy else None
            rows.append((mode, str(k), f"{figures['acceptance_rate']:.3f}", f"{figures['mean_accepted_length']:.2f}",
                         f"{figures['tok_s']:.1f} / {base['tok_s']:.1f}", f"{figures['tok_s'] / base['tok_s']:.2f}x",
                         "-" if same is None else str(same)))
            result[f"{mode} k={k}"] = {**{n: round(v, 3) for n, v in figures.items()},
                                       "speedup": round(figures["tok_s"] / base["tok_s"], 3),
                                       "greedy_identical": same}
    print(table(rows, ("sampling", "k", "acceptance", "mean accepted len", "tok/s (spec / plain)", "speed-up",
                       "== plain greedy")))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

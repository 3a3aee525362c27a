"""Engine vs transformers on the bench preset, identical weights, side by side in one run (issues 4 and 14).

  (a) batch-1 greedy decode tok/s: our engine (unquantized, int8 blocks, int4 groups; fused modules, absorbed MLA
      over the paged latent cache; optional MTP speculation) vs transformers `generate` on the same checkpoint, both
      in --dtype (auto: bf16 where the CPU has bf16 GEMMs, else fp32, which is far faster there for both sides; the
      unquantized format is named by the dtype it ran in);
  (b) prefill tok/s on a 1024-token prompt (time to first token; transformers keeps one logit row too);
  (c) aggregate tok/s of 32 concurrent greedy streams through the engine vs transformers at batch 1: of whole
      requests (their prompts' prefill too, which dominates where prefill is slow, as on an AVX2-only CPU), and of
      their decode alone, (t(N) - t(1)) as in (a);
  (d) the batch-1 roofline of each weight format, against the machine: active weight bytes per token x tokens/s,
      over the bandwidth of a plain streaming read (a sum) of the same number of bytes;
  (e) the weight kernels of the --formats alone at batch 1 (our bf16, int8 and int4; F.linear in bf16 and aten's
      packed-int4 CPU kernel beside ours), as a fraction of the same streaming read; and on 8 MB of weights, which
      a large last-level cache holds: what each kernel computes when memory is not what it waits for.
Decode times are (t(N tokens) - t(1 token)) / (N - 1), so prefill never leaks into them. Prints tables and one
JSON line with every ratio.

    python bench/bench_decode.py [--model DIR] [--new-tokens 32] [--repeats 3] [--threads N] [--speculative K]
        [--formats bf16 int8 int4] [--dtype auto|bfloat16|float32]
"""
from __future__ import annotations

import argparse
import json

import torch
from infer_common import (
    active_bytes_per_token,
    bench_checkpoint,
    decode_rate,
    interleaved,
    kernel_bandwidth,
    mean_ffn_experts,
    no_mtp_head,
    stream_bandwidth,
    table,
    transformers_model,
)

from longcat_flash.config import ModelConfig
from longcat_flash.device import compute_dtype
from longcat_flash.flag_types import parse_distinct, threads
from longcat_flash.infer.engine import MAX_SPECULATIVE, Engine, EngineConfig
from longcat_flash.infer.loader import load_for_inference
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.runtime import tune_cpu_allocator

CACHED_BYTES = 8e6  # weights that stay in a last-level cache of 16 MB or more: the kernels' compute ceiling


def measurable(rates: dict[str, float | None], what: str = "{}") -> dict[str, float]:
    """The decode rates, or a stop naming those lost in the timing noise (N tokens no slower than 1: a negative or
    infinite rate, and a ratio of it, would be printed); `what` names a rate from its key."""
    if lost := [what.format(name) for name, rate in rates.items() if rate is None]:
        raise SystemExit(f"bench_decode: the decode of {', '.join(lost)} was lost in the timing noise (--new-tokens "
                         "tokens took no longer than 1): give more --new-tokens, or --repeats")
    return rates


def engine_runner(engine: Engine, prompts: list[list[int]], n: int):
    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    return lambda: engine.generate(prompts, params)


def hf_runner(model: torch.nn.Module, prompt: list[int], n: int):
    ids = torch.tensor([prompt])
    return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, attention_mask=torch.ones_like(ids))


# the weight kernels (e) times for each format: ours, and torch's where it has one for the same weights
KERNELS = {"bf16": ("bf16", "bf16 torch"), "int8": ("int8",), "fp8": (), "int4": ("int4", "int4 torch"),
           "int4-mixed": ("int4", "int4 torch")}


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: a cached `longcat init --preset bench`)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens before a decode is timed")
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="tokens decoded, at least 2 (a decode rate is over the tokens after the first)")
    parser.add_argument("--prefill", type=int, default=1024, help="prompt tokens of the prefill timing")
    parser.add_argument("--streams", type=int, default=32, help="concurrent requests of the aggregate timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings per case; the median is kept")
    parser.add_argument("--threads", type=threads, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--speculative", type=int, default=0,
                        help="also time MTP speculation with K drafts (on the last format)")
    parser.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"], choices=list(KERNELS),
                        help="weight formats timed (bf16: the unquantized weights, in --dtype) and their kernels")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="both sides' weights and activations (auto: bf16 where the CPU has bf16 GEMMs, else fp32)")
    args = parse_distinct(parser, "formats")
    if args.speculative > MAX_SPECULATIVE:
        parser.error(f"--speculative: at most {MAX_SPECULATIVE} drafts per step, got {args.speculative}")
    for flag, value, least in (("--prompt-len", args.prompt_len, 1), ("--new-tokens", args.new_tokens, 2),
                               ("--prefill", args.prefill, 1), ("--streams", args.streams, 1),
                               ("--repeats", args.repeats, 1), ("--threads", args.threads, 1),
                               ("--speculative", args.speculative, 0)):
        if value < least:  # decode rates are over the tokens after the first: at least 2 new tokens
            parser.error(f"{flag} must be at least {least}, got {value}")
    return parser, args


def configurations(args: argparse.Namespace, dtype: str) -> dict[str, dict]:
    """Each engine timed, by name: the formats (the unquantized one named by its dtype), and MTP on the last."""
    unquantized = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    configs = {unquantized if f == "bf16" else f: {"quantize": None if f == "bf16" else f, "speculative": 0}
               for f in args.formats}
    if args.speculative:
        last = list(configs)[-1]
        configs[f"{last}+mtp{args.speculative}"] = {"quantize": configs[last]["quantize"],
                                                       "speculative": args.speculative}
    return configs


def random_prompts(args: argparse.Namespace, vocab: int) -> tuple[list[int], list[int], list[list[int]]]:
    """The decode timings' prompt, the prefill's, and one per concurrent stream."""
    prompt = torch.randint(3, vocab, (args.prompt_len,)).tolist()
    long_prompt = torch.randint(3, vocab, (args.prefill,)).tolist()
    return prompt, long_prompt, [torch.randint(3, vocab, (args.prompt_len,)).tolist() for _ in range(args.streams)]


def measure(args: argparse.Namespace, hf: torch.nn.Module, prompts: tuple, models: dict, engines: dict[str, Engine],
            plain: list[str]) -> dict[str, dict | float]:
    """Sections (a)-(e) of the docstring, timed side by side."""
    (prompt, long_prompt, streams), N = prompts, args.new_tokens
    # (a) decode, (b) prefill
    fns = {"hf N": hf_runner(hf, prompt, N), "hf 1": hf_runner(hf, prompt, 1),
           "hf prefill": hf_runner(hf, long_prompt, 1)}
    for name, engine in engines.items():
        fns[f"{name} N"] = engine_runner(engine, [prompt], N)
        fns[f"{name} 1"] = engine_runner(engine, [prompt], 1)
        if name in plain:
            fns[f"{name} prefill"] = engine_runner(engine, [long_prompt], 1)
    t = interleaved(fns, args.repeats)
    m: dict[str, dict | float] = {}
    m["decode"] = measurable({name: decode_rate(t[f"{name} N"], t[f"{name} 1"], N) for name in ["hf", *engines]})
    m["prefill"] = {name: args.prefill / t[f"{name} prefill"] for name in ["hf", *plain]}
    # (c) concurrent streams: whole requests (their prefill too), and their decode alone as in (a)
    ts = interleaved({f"{name} {n}": engine_runner(engines[name], streams, n) for name in plain for n in (N, 1)},
                     max(1, args.repeats - 1))
    m["aggregate"] = {name: args.streams * N / ts[f"{name} {N}"] for name in plain}
    alone = measurable({name: decode_rate(ts[f"{name} {N}"], ts[f"{name} 1"], N) for name in plain},
                       f"{args.streams} streams of {{}}")
    m["aggregate_decode"] = {name: args.streams * rate for name, rate in alone.items()}
    # (d) roofline of each format: the experts a token hits, measured once on the first format's model
    generated = engines[plain[0]].generate([prompt], SamplingParams(max_new_tokens=N, temperature=0.0,
                                                                    ignore_eos=True))[0]
    m["experts"] = mean_ffn_experts(models[plain[0]], torch.tensor([prompt + generated]))
    m["active"] = {name: active_bytes_per_token(models[name], m["experts"]) for name in plain}
    m["stream"] = {name: stream_bandwidth(m["active"][name]) for name in plain}
    # (e) the kernels alone
    kinds = list(dict.fromkeys(kind for f in args.formats for kind in KERNELS[f]))
    m["kernels"] = {kind: kernel_bandwidth(kind) for kind in kinds}
    m["cached"] = {kind: kernel_bandwidth(kind, total_bytes=CACHED_BYTES, passes=20) for kind in kinds}
    m["kernel_stream"] = stream_bandwidth(256e6) if kinds else None
    return m


def report(args: argparse.Namespace, m: dict, engines: dict[str, Engine], plain: list[str]) -> dict:
    """Prints the tables; returns the JSON record's ratios and figures."""
    decode, prefill, aggregate, alone = m["decode"], m["prefill"], m["aggregate"], m["aggregate_decode"]
    active, stream = m["active"], m["stream"]
    achieved = {name: active[name] * decode[name] / 1e9 for name in plain}
    rows = [(f"decode tok/s, batch 1 ({n})", f"{decode['hf']:.2f}", f"{decode[n]:.2f}",
             f"{decode[n] / decode['hf']:.2f}x") for n in engines]
    rows += [(f"prefill tok/s, {args.prefill} tokens ({n})", f"{prefill['hf']:.1f}", f"{prefill[n]:.1f}",
              f"{prefill[n] / prefill['hf']:.2f}x") for n in plain]
    rows += [(f"aggregate tok/s, {args.streams} streams ({n})", f"{decode['hf']:.2f} (batch 1)",
              f"{aggregate[n]:.1f}", f"{aggregate[n] / decode['hf']:.2f}x") for n in aggregate]
    rows += [(f"  the same, decode alone ({n})", f"{decode['hf']:.2f} (batch 1)", f"{alone[n]:.1f}",
              f"{alone[n] / decode['hf']:.2f}x") for n in alone]
    print(table(rows, ("case", "transformers", "ours", "ratio")))
    print(f"\nroofline against a streaming read of the same bytes ({m['experts']:.2f} FFN experts/token/layer):")
    print(table([(n, f"{active[n] / 1e6:.1f}", f"{achieved[n]:.2f}", f"{stream[n]:.2f}",
                  f"{achieved[n] / stream[n]:.0%}") for n in plain],
                ("weights", "MB/token", "decode GB/s", "stream GB/s", "fraction")))
    if above := [n for n in plain if achieved[n] > stream[n]]:
        print(f"note: {', '.join(above)} read faster than the streaming read: the stream was timed at another moment "
              "than the decode (other processes on the cores slow either), or the weights sat in a last-level cache "
              "the stream's 1 GB buffer does not fit; rerun on an idle machine before quoting a fraction")
    if m["kernels"]:  # none for fp8 alone
        print(f"\nweight kernels at batch 1, 256 MB of (4096, 1024) weights; stream {m['kernel_stream']:.2f} GB/s; "
              "and on 8 MB (cache-resident where the last-level cache holds it: the kernel's own ceiling):")
        print(table([(k, f"{v:.2f}", f"{v / m['kernel_stream']:.0%}", f"{m['cached'][k]:.2f}")
                     for k, v in m["kernels"].items()], ("kernel", "GB/s", "of stream", "8 MB GB/s")))
    best = max(engines, key=lambda n: decode[n])
    return {"best_decode_config": best,
            "decode_tok_s": {k: round(v, 2) for k, v in decode.items()},
            "decode_ratio": round(decode[best] / decode["hf"], 2),
            "decode_ratio_by_config": {n: round(decode[n] / decode["hf"], 2) for n in engines},
            "prefill_tok_s": {k: round(v, 1) for k, v in prefill.items()},
            "prefill_ratio_by_config": {n: round(prefill[n] / prefill["hf"], 2) for n in plain},
            "aggregate_tok_s": {k: round(v, 1) for k, v in aggregate.items()},
            "aggregate_ratio_by_config": {n: round(aggregate[n] / decode["hf"], 2) for n in aggregate},
            "aggregate_decode_tok_s": {k: round(v, 1) for k, v in alone.items()},
            "aggregate_decode_ratio_by_config": {n: round(v / decode["hf"], 2) for n, v in alone.items()},
            "active_mb_per_token": {n: round(active[n] / 1e6, 1) for n in plain},
            "stream_gb_s": {n: round(stream[n], 2) for n in plain},
            "roofline_fraction": {n: round(achieved[n] / stream[n], 3) for n in plain},
            "kernel_gb_s": {k: round(v, 2) for k, v in m["kernels"].items()},
            "kernel_stream_gb_s": None if m["kernel_stream"] is None else round(m["kernel_stream"], 2),
            "kernel_cached_gb_s": {k: round(v, 2) for k, v in m["cached"].items()}}


def main() -> None:
    parser, args = parse_args()
    dtype = compute_dtype(args.dtype, torch.device("cpu"))
    tune_cpu_allocator()  # process-wide: both sides of the comparison get it
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = bench_checkpoint(args.model)
    if args.speculative and (why := no_mtp_head(path)):
        parser.error(f"--speculative {args.speculative}: {why}")
    context = ModelConfig.from_json(path).max_position_embeddings
    for flag, tokens in (("--prefill + 1", args.prefill + 1),  # the prefill is timed up to its first new token
                         ("--prompt-len + --new-tokens", args.prompt_len + args.new_tokens)):
        if tokens > context:
            parser.error(f"{flag} = {tokens} tokens is past the model's context ({context})")
    hf = transformers_model(path, getattr(torch, dtype))
    prompts = random_prompts(args, hf.config.vocab_size)
    configs = configurations(args, dtype)
    models = {name: load_for_inference(path, dtype=dtype, quantize=c["quantize"])[0] for name, c in configs.items()}
    engines = {name: Engine(models[name], EngineConfig(speculative=c["speculative"], prefill_chunk=args.prefill,
                                                       token_budget=max(args.prefill, args.streams * 4),
                                                       max_running=args.streams))
               for name, c in configs.items()}
    plain = [name for name in engines if not configs[name]["speculative"]]
    with torch.inference_mode():
        measured = measure(args, hf, prompts, models, engines, plain)
    result = {"model": str(path), "dtype": dtype, "threads": args.threads, "new_tokens": args.new_tokens,
              **report(args, measured, engines, plain)}
    if args.speculative:
        drafting = next(name for name in engines if configs[name]["speculative"])
        result["mtp_acceptance_rate"] = round(engines[drafting].stats.drafts.acceptance_rate, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

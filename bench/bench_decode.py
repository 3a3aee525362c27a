"""Engine vs transformers on the bench preset, identical weights, side by side in one run (issue 4, item 8).

  (a) batch-1 greedy decode tok/s: our engine (bf16, int8 blocks; fused modules, absorbed MLA over the paged latent
      cache; optional MTP speculation) vs transformers `generate` on the same checkpoint in bf16;
  (b) prefill tok/s on a 1024-token prompt (time to first token; transformers keeps one logit row too);
  (c) aggregate tok/s of 32 concurrent greedy streams through the engine vs transformers at batch 1;
  (d) the batch-1 roofline: active weight bytes per token / time per token, over the measured GEMV bandwidth of
      the same weight format.
Decode times are (t(N tokens) - t(1 token)) / (N - 1), so prefill never leaks into them. Prints a table and one
JSON line with every ratio.

    python bench/bench_decode.py [--model DIR] [--new-tokens 32] [--repeats 3] [--threads N] [--speculative K]
"""
from __future__ import annotations

import argparse
import json

import torch
from infer_common import (active_bytes_per_token, bench_checkpoint, gemv_bandwidth, interleaved,
                          mean_ffn_experts, table, transformers_model)

from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.loader import load_for_inference
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.runtime import tune_cpu_allocator


def engine_runner(engine: Engine, prompts: list[list[int]], n: int):
    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    return lambda: engine.generate(prompts, params)


def hf_runner(model: torch.nn.Module, prompt: list[int], n: int):
    ids = torch.tensor([prompt])
    return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, attention_mask=torch.ones_like(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: a cached `longcat init --preset bench`)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--speculative", type=int, default=0, help="also time MTP speculation with K drafts")
    args = parser.parse_args()
    tune_cpu_allocator()  # process-wide: both sides of the comparison get it
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = bench_checkpoint(args.model)
    hf = transformers_model(path, torch.bfloat16)
    vocab = hf.config.vocab_size
    prompt = torch.randint(3, vocab, (args.prompt_len,)).tolist()
    long_prompt = torch.randint(3, vocab, (args.prefill,)).tolist()
    streams = [torch.randint(3, vocab, (args.prompt_len,)).tolist() for _ in range(args.streams)]
    N = args.new_tokens
    configs = {"bf16": dict(quantize=None, speculative=0), "int8": dict(quantize="int8", speculative=0)}
    if args.speculative:
        configs[f"int8+mtp{args.speculative}"] = dict(quantize="int8", speculative=args.speculative)
    models = {name: load_for_inference(path, quantize=c["quantize"])[0] for name, c in configs.items()}
    engines = {name: Engine(models[name], EngineConfig(speculative=c["speculative"], prefill_chunk=args.prefill,
                                                       token_budget=max(args.prefill, args.streams * 4),
                                                       max_running=args.streams))
               for name, c in configs.items()}
    with torch.inference_mode():
        # (a) decode, (b) prefill
        fns = {"hf N": hf_runner(hf, prompt, N), "hf 1": hf_runner(hf, prompt, 1),
               "hf prefill": hf_runner(hf, long_prompt, 1)}
        for name, engine in engines.items():
            fns[f"{name} N"] = engine_runner(engine, [prompt], N)
            fns[f"{name} 1"] = engine_runner(engine, [prompt], 1)
            if not configs[name]["speculative"]:
                fns[f"{name} prefill"] = engine_runner(engine, [long_prompt], 1)
        t = interleaved(fns, args.repeats)
        decode = {name: (N - 1) / (t[f"{name} N"] - t[f"{name} 1"]) for name in ["hf", *engines]}
        prefill = {name: args.prefill / t[f"{name} prefill"] for name in ["hf", *engines] if f"{name} prefill" in t}
        # (c) concurrent streams
        aggregate = {name: args.streams * N / s for name, s in interleaved(
            {name: engine_runner(engines[name], streams, N) for name in engines
             if not configs[name]["speculative"]}, max(1, args.repeats - 1)).items()}
        # (d) roofline of the best batch-1 configuration
        best = max((n for n in engines), key=lambda n: decode[n])
        generated = engines[best].generate([prompt], SamplingParams(max_new_tokens=N, temperature=0.0,
                                                                    ignore_eos=True))[0]
        experts = mean_ffn_experts(models[best], torch.tensor([prompt + generated]))
        active = active_bytes_per_token(models[best], experts)
        bandwidth = gemv_bandwidth(configs[best]["quantize"])
    achieved = active * decode[best] / 1e9
    rows = [(f"decode tok/s, batch 1 ({n})", f"{decode['hf']:.2f}", f"{decode[n]:.2f}", f"{decode[n] / decode['hf']:.2f}x")
            for n in engines]
    rows += [(f"prefill tok/s, {args.prefill} tokens ({n})", f"{prefill['hf']:.1f}", f"{prefill[n]:.1f}",
              f"{prefill[n] / prefill['hf']:.2f}x") for n in prefill if n != "hf"]
    rows += [(f"aggregate tok/s, {args.streams} streams ({n})", f"{decode['hf']:.2f} (batch 1)",
              f"{aggregate[n]:.1f}", f"{aggregate[n] / decode['hf']:.2f}x") for n in aggregate]
    print(table(rows, ("case", "transformers", "ours", "ratio")))
    print(f"\nroofline ({best}): {active / 1e6:.1f} MB active weights/token ({experts:.2f} FFN experts/token/layer), "
          f"{achieved:.2f} GB/s achieved of {bandwidth:.2f} GB/s measured GEMV = {achieved / bandwidth:.0%}")
    result = {"preset": "bench", "threads": args.threads, "new_tokens": N, "best_decode_config": best,
              "decode_tok_s": {k: round(v, 2) for k, v in decode.items()},
              "decode_ratio": round(decode[best] / decode["hf"], 2),
              "decode_ratio_by_config": {n: round(decode[n] / decode["hf"], 2) for n in engines},
              "prefill_tok_s": {k: round(v, 1) for k, v in prefill.items()},
              "prefill_ratio": round(max(prefill[n] for n in prefill if n != "hf") / prefill["hf"], 2),
              "aggregate_tok_s": {k: round(v, 1) for k, v in aggregate.items()},
              "aggregate_ratio": round(max(aggregate.values()) / decode["hf"], 2),
              "active_mb_per_token": round(active / 1e6, 1), "gemv_gb_s": round(bandwidth, 2),
              "roofline_fraction": round(achieved / bandwidth, 3)}
    if args.speculative:
        result["mtp_acceptance_rate"] = round(engines[f"int8+mtp{args.speculative}"].stats.drafts.acceptance_rate, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

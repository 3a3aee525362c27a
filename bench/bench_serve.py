"""The server vs the engine it wraps, same checkpoint, one run: what HTTP costs (issue 11, point 4).

  (a) batch 1: tok/s of one streaming HTTP client over its whole request (prefill included) vs `longcat
      generate`'s path in this process (`serve.local.generate_text`, the same engine and text handling, no HTTP),
      timed the same way: a rate counted from the first chunk's arrival was inflated by chunks that arrive in a
      burst (3-17x "faster than the engine" on a tiny model, 2026-12-06);
  (b) `--streams` concurrent streaming HTTP clients: aggregate generated tok/s vs the engine's own rate with the
      same number of requests stepped in this process.
The two sides take turns, run by run, so that a drift in the machine's speed lands on both; the idle side uses no
CPU (the server's engine process waits on its pipe). Each figure is the median of `--repeats` runs after a warm-up
round (the first batch of 32 pays one-off allocations on both sides, a large share of a two-second run). Prints a
table, both ratios (goal: >= 0.9) and one JSON line.

    python bench/bench_serve.py [--model DIR | --preset small] [--streams 32] [--new-tokens 64] [--threads N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
import torch
from infer_common import bench_checkpoint, table

from longcat_flash.checkpoint import hf
from longcat_flash.flag_types import positive_int, threads
from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.presets import PRESETS
from longcat_flash.runtime import tune_cpu_allocator
from longcat_flash.serve.launch import running_server
from longcat_flash.serve.local import generate_text, load_session
from longcat_flash.tokenizer import Tokenizer


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


class InProcess:
    """The engine `longcat generate` runs, in this process: its batch-1 decode rate and its rate with all
    prompts at once."""

    def __init__(self, path, n_streams: int) -> None:
        self.engine, self.tokenizer = load_session(path, device="cpu")
        self.many = Engine(self.engine.model, EngineConfig(max_running=n_streams))

    def single(self, prompt: list[int], n: int) -> float:
        result = generate_text(self.engine, self.tokenizer, prompt, greedy(n))
        return result.completion_tokens / result.total_s

    def all_at_once(self, prompts: list[list[int]], n: int) -> float:
        start = time.perf_counter()
        for prompt in prompts:
            self.many.add_request(prompt, greedy(n))
        while self.many.has_work():
            self.many.step()
        return len(prompts) * n / (time.perf_counter() - start)


async def one_stream(client: httpx.AsyncClient, model: str, prompt: list[int], n: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens, status = None, 0, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            # Parse only the chunks the figures need: this client shares the CPUs with the server it measures
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() if json.loads(line[6:])["choices"] else None
            elif line.startswith("data: {") and '"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"status": status, "tokens": tokens, "ttft": (first or end) - start, "tok_s": tokens / (end - start)}


async def load(base: str, model: str, prompts: list[list[int]], n: int) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model, p, n) for p in prompts))
        return results, time.perf_counter() - start


def http_single(base: str, name: str, prompt: list[int], n: int) -> float:
    return asyncio.run(load(base, name, [prompt], n))[0][0]["tok_s"]


def http_many(base: str, name: str, prompts: list[list[int]], n: int) -> tuple[float, list[dict]]:
    results, wall = asyncio.run(load(base, name, prompts, n))
    return sum(r["tokens"] for r in results if r["status"] == 200) / wall, results


def measure(path, prompts: list[list[int]], args) -> tuple[dict[str, float], list[dict]]:
    """Both sides, alternating run by run (engine, HTTP, engine, HTTP, ...) so that a drift in the machine's speed
    lands on both; each figure is the median of `--repeats` runs after one warm-up run of the same shape."""
    flags = ["--max-running", str(args.streams), "--device", "cpu"]
    with running_server(path, *flags, threads=args.threads, startup_s=300) as base:
        name, local, n = path.resolve().name, InProcess(path, len(prompts)), args.new_tokens
        cases = {"engine_single": lambda: local.single(prompts[0], n),
                 "http_single": lambda: http_single(base, name, prompts[0], n),
                 "engine_many": lambda: local.all_at_once(prompts, n),
                 "http_many": lambda: http_many(base, name, prompts, n)}
        runs: dict[str, list] = {case: [] for case in cases}
        for _ in range(1 + args.repeats):  # the first round warms both up and is dropped
            for case, run in cases.items():
                runs[case].append(run())
    streams = [r for _, results in runs["http_many"][1:] for r in results]
    rates = {case: statistics.median(r if isinstance(r, float) else r[0] for r in values[1:])
             for case, values in runs.items()}
    return rates, streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint to serve (default: a fresh --preset one)")
    parser.add_argument("--preset", default="small", choices=sorted(set(PRESETS) - {"longcat_flash"}),
                        help="checkpoint to write when --model is not given (the 560B shape does not fit a machine)")
    parser.add_argument("--streams", type=positive_int, default=32, help="concurrent requests of the aggregate case")
    parser.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated per request")
    parser.add_argument("--threads", type=threads, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds after a warm-up; the median")
    args = parser.parse_args()
    tune_cpu_allocator()  # as `longcat generate` does
    torch.set_num_threads(args.threads)
    path = bench_checkpoint(args.model, args.preset, tokenizer=True)
    tokenizer = Tokenizer.load(path)
    corpus = (path / "tokenizer.json").read_text()[:200_000]  # any text: the tokenizer's own vocabulary dump,
    corpus *= 1 + args.streams * 997 // len(corpus)  # repeated where it is short (a tiny model's)
    prompts = [tokenizer.encode(corpus[i * 997: i * 997 + 120]) for i in range(args.streams)]
    context = hf.checkpoint_config(path).max_position_embeddings
    if (longest := max(map(len, prompts))) + args.new_tokens > context:  # the server would refuse every request
        parser.error(f"--new-tokens {args.new_tokens} after the longest prompt ({longest} tokens) is past the model's "
                     f"context ({context})")
    rates, streams = measure(path, prompts, args)
    engine_single, http_single, engine_many, http_many = (
        rates[case] for case in ("engine_single", "http_single", "engine_many", "http_many"))
    errors = sum(r["status"] != 200 for r in streams)
    rows = [("tok/s, batch 1 (whole request)", f"{engine_single:.1f}", f"{http_single:.1f}",
             f"{http_single / engine_single:.2f}x"),
            (f"aggregate tok/s, {args.streams} streams", f"{engine_many:.1f}", f"{http_many:.1f}",
             f"{http_many / engine_many:.2f}x")]
    print(table(rows, ("case", "engine in-process", "HTTP", "ratio")))
    ttft = sorted(r["ttft"] for r in streams)
    print(f"\n{len(streams) - errors}/{len(streams)} streams ok; TTFT p50 {statistics.median(ttft):.2f} s")
    if errors:  # their tokens are missing from the HTTP side: the ratios above do not compare
        statuses = sorted({r["status"] for r in streams if r["status"] != 200})
        raise SystemExit(f"bench_serve: {errors} streams failed (HTTP {statuses}); the HTTP figures leave them out")
    print(json.dumps({"checkpoint": path.name, "threads": args.threads, "streams": args.streams,
                      "new_tokens": args.new_tokens, "engine_batch1_tok_s": round(engine_single, 1),
                      "http_batch1_tok_s": round(http_single, 1), "batch1_ratio": round(http_single / engine_single, 2),
                      "engine_aggregate_tok_s": round(engine_many, 1), "http_aggregate_tok_s": round(http_many, 1),
                      "aggregate_ratio": round(http_many / engine_many, 2), "errors": errors}))


if __name__ == "__main__":
    main()

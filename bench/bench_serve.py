"""The server under load vs transformers at batch 1, bench preset, identical weights, one run (issue 4, item 8c).

Starts `longcat serve` on a free loopback port, then:
  1. one streaming client (batch 1 through HTTP): decode tok/s and time to first token;
  2. `--streams` concurrent streaming clients: aggregate generated tok/s, TTFT p50/p95, errors;
and times transformers `generate` at batch 1 in this process before the server starts (so they never share CPUs).
Prints a table and one JSON line with the ratios.

    python bench/bench_serve.py [--model DIR] [--streams 32] [--new-tokens 32] [--quantize int8] [--threads N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

import httpx
import torch
from infer_common import bench_checkpoint, interleaved, table, transformers_model

from longcat_flash.runtime import tune_cpu_allocator
from longcat_flash.tokenizer import Tokenizer


def hf_decode_tok_s(path, prompt_ids: list[int], n: int, repeats: int) -> float:
    model = transformers_model(path, torch.bfloat16)
    ids = torch.tensor([prompt_ids])

    def run(k: int):
        return lambda: model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0,
                                      attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        t = interleaved({"n": run(n), "1": run(1)}, repeats)
    return (n - 1) / (t["n"] - t["1"])


def start_server(path, port: int, args) -> subprocess.Popen:
    exe = [shutil.which("longcat")] if shutil.which("longcat") else [sys.executable, "-m", "longcat_flash.cli"]
    cmd = [*exe, "serve", "--model", str(path), "--port", str(port), "--max-running", str(args.streams)]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("server did not start")


async def one_stream(client: httpx.AsyncClient, model: str, prompt: str, n: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens, status = None, 0, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"status": status, "tokens": tokens, "ttft": (first or end) - start, "total": end - start,
            "decode_tok_s": (tokens - 1) / (end - first) if first and tokens > 1 else 0.0}


async def load(base: str, model: str, prompts: list[str], n: int) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model, p, n) for p in prompts))
        return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quantize", default=None, choices=[None, "int8", "fp8"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tune_cpu_allocator()  # process-wide: both sides of the comparison get it
    torch.set_num_threads(args.threads)
    path = bench_checkpoint(args.model)
    tokenizer = Tokenizer.load(path)
    corpus = (path / "tokenizer.json").read_text()[:200_000]  # any text: the tokenizer's own vocabulary dump
    prompts = [corpus[i * 997: i * 997 + 120] for i in range(args.streams)]
    hf = hf_decode_tok_s(path, tokenizer.encode(prompts[0]), args.new_tokens, args.repeats)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(path, port, args)
    base, name = f"http://127.0.0.1:{port}", path.resolve().name
    try:
        asyncio.run(load(base, name, prompts[:1], 4))  # warm-up
        single, _ = asyncio.run(load(base, name, prompts[:1], args.new_tokens))
        many, wall = asyncio.run(load(base, name, prompts, args.new_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ok = [r for r in many if r["status"] == 200]
    aggregate = sum(r["tokens"] for r in ok) / wall
    ttft = sorted(r["ttft"] for r in ok)
    p95 = ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))]
    rows = [("decode tok/s, batch 1", f"{hf:.2f}", f"{single[0]['decode_tok_s']:.2f} (HTTP)",
             f"{single[0]['decode_tok_s'] / hf:.2f}x"),
            (f"aggregate tok/s, {args.streams} streams", f"{hf:.2f} (batch 1)", f"{aggregate:.1f} (HTTP)",
             f"{aggregate / hf:.2f}x")]
    print(table(rows, ("case", "transformers", "ours", "ratio")))
    print(f"\n{len(ok)}/{len(many)} streams ok; TTFT p50 {statistics.median(ttft):.2f} s, p95 {p95:.2f} s; "
          f"wall {wall:.1f} s")
    print(json.dumps({"preset": "bench", "threads": args.threads, "quantize": args.quantize,
                      "streams": args.streams, "new_tokens": args.new_tokens, "hf_batch1_tok_s": round(hf, 2),
                      "server_batch1_tok_s": round(single[0]["decode_tok_s"], 2),
                      "server_batch1_ratio": round(single[0]["decode_tok_s"] / hf, 2),
                      "aggregate_tok_s": round(aggregate, 1), "aggregate_ratio": round(aggregate / hf, 2),
                      "ttft_p50_s": round(statistics.median(ttft), 2), "ttft_p95_s": round(p95, 2),
                      "errors": len(many) - len(ok)}))


if __name__ == "__main__":
    main()

"""The AMX tile GEMM for quantized weights (infer/csrc/tile_gemm.cpp) against what it replaces, side by side in one
run (issue 14): dequantize the weight to bf16, then oneDNN's bf16 GEMM; and, as the bound, oneDNN's GEMM on a bf16
weight already in memory. bf16 rows, the bench preset's dense shapes (gate_up, down, LM head) at 32 rows (32
concurrent streams) and 1024 (a prefill chunk), and one expert's gate_up at 128 rows (a prefill chunk's share).
Median ms of interleaved calls; ratios > 1 mean the tiles are faster.

    python bench/bench_tiles.py [--threads 2] [--repeats 10]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from infer_common import interleaved, table

from longcat_flash.flag_types import parse_distinct, positive_int, threads
from longcat_flash.infer import kernels, quant

SHAPES = [(32, 1024, 8192), (32, 4096, 1024), (32, 1024, 32000), (1024, 1024, 8192), (1024, 4096, 1024),
          (128, 1024, 1024)]  # (rows, in features, out features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=threads, default=2)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--formats", nargs="+", default=["int4", "int8"], choices=["int4", "int8", "fp8"])
    args = parse_distinct(parser, "formats")
    if not kernels.tiles_available():
        raise SystemExit("the tile GEMM needs a CPU with AMX and the compiled kernels (infer/extension.py)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, results = [], []
    for fmt in args.formats:
        for M, I, O in SHAPES:
            unit = quant.QuantLinear(torch.nn.Linear(I, O, bias=False).bfloat16(), fmt)
            weight = unit.weight  # the dequantized bf16 matrix
            x = torch.randn(M, I, dtype=torch.bfloat16)
            with torch.inference_mode():
                ms = {k: v * 1e3 for k, v in interleaved({
                    "tiles": lambda: unit(x),
                    "dequantize + GEMM": lambda: F.linear(x, unit.weight),
                    "bf16 GEMM": lambda: F.linear(x, weight),
                }, args.repeats).items()}
            ratio = ms["dequantize + GEMM"] / ms["tiles"]
            rows.append((fmt, f"{M} x {I} -> {O}", f"{ms['tiles']:.3f}", f"{ms['dequantize + GEMM']:.3f}",
                         f"{ms['bf16 GEMM']:.3f}", f"{ratio:.2f}x", f"{ms['bf16 GEMM'] / ms['tiles']:.2f}x"))
            results.append({"format": fmt, "shape": [M, I, O], "ms": ms, "ratio_vs_dequantize": round(ratio, 3)})
    print(table(rows, ("format", "rows x in -> out", "tiles ms", "dequantize + GEMM ms", "bf16 GEMM ms",
                       "vs dequantize", "vs bf16 in memory")))
    print(json.dumps({"threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()

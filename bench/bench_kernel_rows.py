"""The GEMV kernels for quantized weights against the path they hand over to, by number of rows, side by side in
one run: where MAX_KERNEL_ROWS (int8) and MAX_INT4_KERNEL_ROWS (int4) in infer/kernels.py come from (issue 14).
The fallback, where the AMX tiles do not take x, is dequantize (one compiled pass) + oneDNN's GEMM. Random weights
of the small and bench presets' shapes; median ms of interleaved calls; ratios > 1 mean the kernel is faster.

    python bench/bench_kernel_rows.py [--threads 1] [--dtype float32] [--rows 16 32 64] [--formats int4 int8]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from infer_common import interleaved, table

from longcat_flash.flag_types import parse_distinct, positive_int, threads
from longcat_flash.infer import extension, kernels, quant

SHAPES = [(8192, 256), (1536, 256), (256, 768), (512, 256), (8192, 1024), (1024, 4096)]  # (out, in features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=threads, default=1)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=positive_int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--formats", nargs="+", default=["int4", "int8"], choices=["int4", "int8", "fp8"])
    args = parse_distinct(parser, "rows", "formats")
    ext = extension.compiled()
    if ext is None:
        raise SystemExit("the GEMV kernels are not built here (infer/extension.py: AVX2 or AVX-512 and a compiler)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    rows, results = [], []
    for fmt in args.formats:
        for O, I in SHAPES:
            parts = quant.quantize_weight(torch.randn(O, I) * 0.02, fmt)
            weight = [parts[k] for k in quant.KEYS[fmt]]
            if fmt == "int4":
                weight.append(I // parts["scales"].shape[-1])  # the group size
            kernel = ext.group_experts if fmt == "int4" else ext.block_experts
            for M in args.rows:
                x = torch.randn(M, I, dtype=dtype)
                with torch.inference_mode():
                    ms = {k: v * 1e3 for k, v in interleaved({
                        "kernel": lambda: kernel(x, None, *weight),
                        "dequantize + GEMM": lambda: F.linear(x, quant.dequantize_weight(parts, fmt, dtype)),
                    }, args.repeats).items()}
                ratio = ms["dequantize + GEMM"] / ms["kernel"]
                rows.append((fmt, f"{M} x {I} -> {O}", f"{ms['kernel']:.3f}", f"{ms['dequantize + GEMM']:.3f}",
                             f"{ratio:.2f}x"))
                results.append({"format": fmt, "shape": [M, I, O], "ms": ms, "ratio": round(ratio, 3)})
    print(table(rows, ("format", "rows x in -> out", "kernel ms", "dequantize + GEMM ms", "kernel faster by")))
    limits = {"int4": kernels.MAX_INT4_KERNEL_ROWS, "int8": kernels.MAX_KERNEL_ROWS, "fp8": kernels.MAX_KERNEL_ROWS}
    print(json.dumps({"threads": args.threads, "dtype": args.dtype, "row_limits": limits, "results": results}))


if __name__ == "__main__":
    main()

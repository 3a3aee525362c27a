"""Prefill GEMMs with int8 weights, the two ways issue 14 names, side by side in one run: our path (the weight
dequantized a slice at a time, then oneDNN's fp32 GEMM: infer/kernels.py) and integer GEMMs on dynamically
quantized activations (torch's dynamic int8 Linear on the fbgemm / x86 / onednn engines), against the unquantized
fp32 GEMM on the same weights. Also each path's error against the exact product of x and the dequantized weight:
the dynamic Linear rounds x per tensor (7 bits on x86 without VNNI), where our W8A8 kernel (decode) rounds it per
row and 128 columns. x has a few outlier channels, as hidden states do. Median ms of interleaved calls.

    python bench/bench_int8_prefill.py [--threads 2] [--rows 1024]
"""
from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.nn.functional as F
from infer_common import interleaved, table

from longcat_flash.flag_types import positive_int, threads
from longcat_flash.infer import extension, kernels, quant

SHAPES = [(1536, 256), (256, 768), (8192, 1024), (1024, 4096)]  # (out, in): the small and bench presets' dense MLPs


def dynamic_linear(weight: torch.Tensor, engine: str) -> torch.nn.Module:
    """torch's dynamic int8 Linear (per-row int8 weight, activations quantized per call) on one engine."""
    torch.backends.quantized.engine = engine
    O, I = weight.shape
    scales = weight.abs().amax(1).clamp_min(1e-12) / 127
    with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated
        warnings.simplefilter("ignore")
        layer = torch.ao.nn.quantized.dynamic.Linear(I, O)
        layer.set_weight_bias(torch.quantize_per_channel(weight, scales, torch.zeros(O, dtype=torch.long), 0,
                                                         torch.qint8), None)
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=threads, default=2, help="torch threads")
    parser.add_argument("--rows", type=positive_int, default=1024, help="rows of x: prefill tokens, more than 16")
    parser.add_argument("--repeats", type=positive_int, default=7, help="interleaved calls per path (median)")
    args = parser.parse_args()
    if args.rows <= kernels.MAX_KERNEL_ROWS:  # "ours" would time the decode kernel under the prefill path's name
        parser.error(f"--rows must be more than {kernels.MAX_KERNEL_ROWS}: up to that many rows quant_linear takes the "
                     "W8A8 decode kernel, not this prefill path (bench/bench_kernel_rows.py measures those rows)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    engines = [e for e in ("fbgemm", "x86", "onednn") if e in torch.backends.quantized.supported_engines]
    ext = extension.compiled()
    rows, results = [], []
    for O, I in SHAPES:
        parts = quant.quantize_weight(torch.randn(O, I) * 0.02, "int8")
        weight = quant.dequantize_weight(parts, "int8", torch.float32)  # (O, I): what every path multiplies by
        x = torch.randn(args.rows, I)
        x[:, :4] *= 20  # outlier channels
        exact = x.double() @ weight.double().T
        fns = {"fp32 GEMM": lambda: F.linear(x, weight), "ours": lambda: quant.quant_linear(x, parts, "int8")}
        fns |= {f"dynamic {e}": (lambda layer: lambda: layer(x))(dynamic_linear(weight, e)) for e in engines}
        with torch.inference_mode():
            ms = {k: v * 1e3 for k, v in interleaved(fns, args.repeats).items()}
            outputs = {k: fn() for k, fn in fns.items()}
            if ext is not None:  # W8A8 with x rounded per row and 128 columns (few rows only: its error, not its time)
                outputs["ours W8A8 (decode kernel)"] = ext.block_experts(x[:64].contiguous(), None, parts["values"],
                                                                         parts["scales"])
        error = {k: float((y.double() - exact[: len(y)]).norm() / exact[: len(y)].norm()) for k, y in outputs.items()}
        for name, y in outputs.items():
            speed = f"{ms['fp32 GEMM'] / ms[name]:.2f}x" if name in ms else "-"
            rows.append((f"{args.rows} x {I} -> {O}", name, f"{ms[name]:.2f}" if name in ms else "-", speed,
                         f"{error[name]:.1e}"))
        results.append({"shape": [args.rows, I, O], "ms": ms, "relative_error": error})
    print(table(rows, ("rows x in -> out", "path", "ms", "vs fp32 GEMM", "relative error")))
    print(json.dumps({"threads": args.threads, "engines": engines, "results": results}))


if __name__ == "__main__":
    main()

"""Weight quantization: perplexity change on held-out text and memory saved (issues 4 and 14).

Configurations, all from one checkpoint: the checkpoint dtype (reference); int8 and fp8 128x128 blocks everywhere
(router and kv_b_proj excepted), each also with layer-wise mixed precision (report §6.2.3: the --keep-top units with
the largest input amplitude and the --keep-top with the largest block error stay unquantized); int4 groups of 64,
and int4-mixed (the --keep-fraction of units with the largest measured int4 output error at int8). Mixed choices
use a separate calibration text. Full forwards over each window take the prefill path (the dequantized weights; an
int4 weight of 4M values or more, the kernel with int8 activations: infer/kernels.py); the "decode path" rows
score the same windows through the engine 16 tokens at a time (MAX_KERNEL_ROWS), so every product runs the decode
kernels (int4's with int8 activations), against the checkpoint dtype through the same path. Held-out text: this
repository's own Python sources, which are not in the stdlib training corpus. Prints a table and one JSON line.

    python bench/bench_quant.py --model RUN_DIR [--tokens 8192] [--window 512] [--keep-top 2] [--keep-fraction 0.1]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from infer_common import bench_checkpoint, table

from longcat_flash.checkpoint.safetensors_files import stored_dtype
from longcat_flash.config import ModelConfig
from longcat_flash.flag_types import non_negative_int, positive_int
from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.kernels import MAX_KERNEL_ROWS
from longcat_flash.infer.loader import load_for_inference
from longcat_flash.infer.quant import KEEP_SENSITIVE, weight_bytes
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.runtime import tune_cpu_allocator
from longcat_flash.tokenizer import Tokenizer

SOURCES = Path(__file__).resolve().parents[1] / "src" / "longcat_flash"


CALIBRATION_TOKENS = 2048  # after the scored tokens: what the mixed formats rank their units on


def source_tokens(tokenizer: Tokenizer) -> torch.Tensor:
    """This package's sources, files in sorted order, as token ids: text no checkpoint here was trained on."""
    return torch.tensor(tokenizer.encode("\n".join(p.read_text() for p in sorted(SOURCES.rglob("*.py")))))


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int) -> float:
    """Mean next-token NLL over non-overlapping windows, exponentiated."""
    windows = ids[: len(ids) // window * window].view(-1, window)
    nll, count = 0.0, 0
    for w in windows.split(4):
        logits = model(w).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return math.exp(nll / count)


@torch.inference_mode()
def decode_path_perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int) -> float:
    """The same windows through the engine in chunks of MAX_KERNEL_ROWS tokens (prompt logprobs): every weight
    product takes the decode kernels, as generated tokens do."""
    engine = Engine(model, EngineConfig(prefill_chunk=MAX_KERNEL_ROWS, token_budget=MAX_KERNEL_ROWS, max_running=1))
    nll, count = 0.0, 0
    for w in ids[: len(ids) // window * window].view(-1, window):
        engine.add_request(w.tolist(), SamplingParams(max_new_tokens=0, prompt_logprobs=0))
        while engine.has_work():
            for out in engine.step():
                scores = out.prompt_logprobs or []
                nll -= sum(s.logprob for s in scores[1:])  # the first token has no context
                count += max(0, len(scores) - 1)
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a trained checkpoint directory (weights + tokenizer)")
    parser.add_argument("--tokens", type=positive_int, default=8192, help="held-out tokens to score")
    parser.add_argument("--window", type=positive_int, default=512)
    parser.add_argument("--keep-top", type=non_negative_int, default=2,
                        help="units kept per criterion in the int8/fp8 mixed runs")
    parser.add_argument("--keep-fraction", type=float, default=KEEP_SENSITIVE,
                        help="fraction of units kept at int8 in the int4-mixed run")
    args = parser.parse_args()
    for wrong, message in ((args.window < 2, f"--window {args.window}: at least 2"),
                           (args.tokens < args.window, f"--tokens {args.tokens}: at least --window {args.window} "
                                                       "(whole windows are scored)"),
                           (not 0 < args.keep_fraction <= 1, f"--keep-fraction {args.keep_fraction}: in (0, 1]")):
        if wrong:
            parser.error(message)
    args.model = bench_checkpoint(args.model, tokenizer=True)  # an error naming --model, not a traceback
    context = ModelConfig.from_json(args.model).max_position_embeddings
    if args.window > context:  # scored past the context, then a traceback in the decode-path section
        parser.error(f"--window {args.window} is past the model's context ({context}): give --window {context}")
    tune_cpu_allocator()  # process-wide: both sides of the comparison get it
    tokenizer = Tokenizer.load(args.model)
    sources = source_tokens(tokenizer)
    if args.tokens + CALIBRATION_TOKENS > len(sources):
        parser.error(f"--tokens {args.tokens}: the held-out text has {len(sources)} tokens with this tokenizer, "
                     f"{CALIBRATION_TOKENS} of them for calibration: give --tokens {len(sources) - CALIBRATION_TOKENS} "
                     "at most")
    scored = args.tokens // args.window * args.window  # whole windows: what the JSON's "tokens" then reports
    ids, calibration = sources[:scored], sources[args.tokens: args.tokens + CALIBRATION_TOKENS]  # disjoint
    width = min(context, len(calibration))  # rows in the context
    calibration = calibration[: len(calibration) // width * width].view(-1, width)  # (B, width)
    configs = {"checkpoint dtype": (None, 0), "int8": ("int8", 0), f"int8 mixed (top {args.keep_top})": ("int8",
               args.keep_top), "fp8": ("fp8", 0), f"fp8 mixed (top {args.keep_top})": ("fp8", args.keep_top),
               "int4": ("int4", 0), f"int4-mixed ({args.keep_fraction:.0%} at int8)": ("int4-mixed", 0)}
    rows, result = [], {"tokens": len(ids), "window": args.window}
    base_ppl = base_bytes = computed = None
    for name, (fmt, top) in configs.items():
        mixed = {"keep_fraction": args.keep_fraction} if fmt == "int4-mixed" else {}
        reads = top or fmt == "int4-mixed"  # the formats that pick units by their error on calibration ids
        model, report = load_for_inference(args.model, quantize=fmt, calibration=calibration if reads else None,
                                           keep_top=top, **mixed)
        ppl, nbytes = perplexity(model, ids, args.window), weight_bytes(model)
        base_ppl, base_bytes = base_ppl or ppl, base_bytes or nbytes
        computed = computed or model.lm_head.weight.dtype  # the unquantized model's, loaded first
        kept = report.kept if report else []
        rows.append((name, f"{ppl:.3f}", f"{(ppl / base_ppl - 1) * 100:+.2f}%", f"{nbytes / 1e6:.1f}",
                     f"{(1 - nbytes / base_bytes) * 100:.1f}%", str(len(kept))))
        result[name] = {"ppl": round(ppl, 4), "ppl_change_pct": round((ppl / base_ppl - 1) * 100, 3),
                        "weight_mb": round(nbytes / 1e6, 1), "saved_pct": round((1 - nbytes / base_bytes) * 100, 1),
                        "kept": kept}
    decode_base = None
    for fmt in (None, "int8", "int4"):
        name = f"{fmt or 'checkpoint dtype'}, decode path"
        ppl = decode_path_perplexity(load_for_inference(args.model, quantize=fmt)[0], ids, args.window)
        decode_base = decode_base or ppl
        rows.append((name, f"{ppl:.3f}", f"{(ppl / decode_base - 1) * 100:+.2f}%", "", "", ""))
        result[name] = {"ppl": round(ppl, 4), "ppl_change_pct": round((ppl / decode_base - 1) * 100, 3)}
    print(table(rows, ("weights", "perplexity", "change", "MB", "saved", "kept units")))
    stored = stored_dtype(args.model)
    result["checkpoint dtype"]["dtype"] = str(computed).removeprefix("torch.")
    if computed != stored:  # "saved" is against the weights as computed, which the auto dtype upcast
        print(f"checkpoint dtype: its {str(stored).removeprefix('torch.')} weights, loaded (--dtype auto) and "
              f"measured as {result['checkpoint dtype']['dtype']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

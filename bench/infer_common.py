"""Shared pieces of the inference benchmarks: the bench checkpoint, its transformers twin, timing, rooflines."""
from __future__ import annotations

import hashlib
import math
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from longcat_flash.checkpoint import hf
from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.files import cache_home
from longcat_flash.infer import kernels, quant
from longcat_flash.infer.fused import FusedMLA, FusedMoE
from longcat_flash.presets import get_preset
from longcat_flash.tokenizer import Tokenizer

DEFAULT_DIR = cache_home() / "bench"


def bench_checkpoint(model: str | None, preset: str = "bench", tokenizer: bool = False) -> Path:
    """The checkpoint to benchmark: --model (with its tokenizer.json where `tokenizer`: a bench that reads text), or
    a cached `longcat init --preset bench` (random bf16 weights)."""
    if model:  # everything a bench reads, checked before its minutes of work: one line naming --model
        try:
            path = hf.model_directory(model)
            hf.checkpoint_config(path)  # config.json parses
            hf.checkpoint_files(path)  # the weights are there
            if tokenizer:
                Tokenizer.load(path)
        except (OSError, ValueError) as err:
            raise SystemExit(f"--model {model}: {err}") from None
        return path
    path = DEFAULT_DIR / preset
    if not (path / "config.json").is_file():
        print(f"writing a fresh {preset} checkpoint to {path} ...", flush=True)
        init_checkpoint(get_preset(preset), path, dtype=torch.bfloat16)
    return path


def transformers_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LongcatFlashForCausalLM with exactly our weights: a copy saved for its loader (up to 5.24 it
    wants zero-expert stubs, from 5.25 refuses them) in DEFAULT_DIR, once per transformers version and per state of
    the checkpoint's files (a copy keyed by the path alone went stale when the checkpoint was rewritten); the copies
    of a checkpoint's earlier states go when a new one is made, and only its own (another checkpoint of the same
    folder name keeps its copy)."""
    import transformers

    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors"))
    state = hashlib.sha256(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]  # two checkpoints of one name: two copies
    stub = DEFAULT_DIR / "transformers" / f"{path.name}-{where}-{state.hexdigest()[:16]}-{transformers.__version__}"
    if not (stub / "config.json").is_file():
        for stale in stub.parent.glob(f"{path.name}-{where}-*"):  # earlier states' copies: a full model each
            shutil.rmtree(stale)
        LongcatFlash.from_pretrained(path).save_pretrained(stub, zero_expert_stubs=True)
    return transformers.AutoModelForCausalLM.from_pretrained(stub, dtype=dtype).eval()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn; one warm-up each, then calls interleaved so machine noise hits all."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def decode_rate(t_n: float, t_1: float, n: int) -> float | None:
    """Tokens/s of the n - 1 decode steps: n tokens minus 1 (prefill and first token), timed apart. None when the
    difference is lost in the noise (t_n <= t_1): no rate is better than an absurd one."""
    return (n - 1) / (t_n - t_1) if t_n > t_1 else None


def no_mtp_head(path: Path) -> str | None:
    """Why speculative decoding cannot run on the checkpoint at `path` (it has no MTP head), or None: said before
    a bench's minutes of loading, not as a traceback after them."""
    if hf.checkpoint_config(path).num_nextn_predict_layers == 0:
        return (f"{path} has no MTP head (num_nextn_predict_layers=0; checkpoints transformers wrote have none), so "
                "there are no drafts to speculate with")
    return None


def kernel_bandwidth(kind: str, rows: int = 1, total_bytes: float = 256e6, shape: tuple[int, int] = (4096, 1024),
                     passes: int = 5) -> float:
    """Weight GB/s of x (rows, I) @ W^T over a working set far larger than the caches, for one weight kernel:
    our "bf16" (plain weights, kernels.dense_linear) / "int8" blocks / "int4" groups, "bf16 torch" (F.linear), or
    "int4 torch" (aten's packed-int4 CPU kernel, _weight_int4pack_mm_for_cpu, groups of 64 with bf16 scales and
    zero points). The bytes are all a product reads: the codes and their scales (and int4's mins)."""
    O, I = shape
    x = torch.randn(rows, I, dtype=torch.bfloat16)
    if kind.startswith("bf16"):
        one = [torch.randn(O, I, dtype=torch.bfloat16)]
    elif kind == "int4 torch":
        codes = torch.randint(0, 16, (O, I), dtype=torch.int32)
        one = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
               torch.randn(I // quant.GROUP, O, 2, dtype=torch.bfloat16)]  # packed codes, scales and zero points
    else:
        parts = quant.quantize_weight(torch.randn(O, I), kind)  # values or codes, and their scales (and mins)
        one = list(parts.values())
    per = tensor_bytes(*one)  # every byte a product reads: an int4 weight's scales and mins too
    count = max(1, int(total_bytes // per))
    copies = [[t.clone() for t in one] for _ in range(count)]  # of one weight: only the bytes matter
    if kind.startswith("bf16"):
        linear = F.linear if kind == "bf16 torch" else kernels.dense_linear
        run = lambda: [linear(x, w) for (w,) in copies]
    elif kind == "int4 torch":
        run = lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, quant.GROUP, z) for p, z in copies]
    else:
        weights = [dict(zip(parts, c)) for c in copies]
        run = lambda: [quant.quant_linear(x, w, kind) for w in weights]
    run()
    return count * per / min(timed(run) for _ in range(passes)) / 1e9


def stream_bandwidth(nbytes: float, min_buffer: float = 2**30, passes: int = 5) -> float:
    """GB/s of a plain streaming read (a sum) of `nbytes` at a time: the machine's bandwidth for what a decode
    step reads. Slices of `nbytes` are taken in turn from a buffer of at least `min_buffer` bytes, larger than the
    caches, so every slice comes from memory as a decode step's expert weights do; best of `passes` passes."""
    chunk = max(1, int(nbytes) // 4)  # fp32 elements per slice (fp32 sums stream fastest on CPU)
    slices = max(1, math.ceil(min_buffer / (4 * chunk)))
    buffer = torch.ones(slices * chunk)
    parts = buffer.split(chunk)
    run = lambda: [p.sum() for p in parts]
    run()
    return buffer.numel() * 4 / min(timed(run) for _ in range(passes)) / 1e9


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes(*module.parameters(), *module.buffers())


def expert_bytes(experts: torch.nn.Module) -> float:
    """Bytes one expert's weights occupy (plain or quantized stacks)."""
    n = next(iter([*experts.parameters(), *experts.buffers()])).shape[0]  # every stacked tensor is (E, ...)
    return module_bytes(experts) / n


def active_bytes_per_token(model: torch.nn.Module, ffn_experts_per_token: float) -> float:
    """Weight bytes a batch-1 decode step reads: every trunk weight except the expert stacks, plus the hit
    experts, plus the head. The MTP head and the embedding table (one row) are left out."""
    total = module_bytes(model.lm_head)
    for layer in model.model.layers:
        moe = layer.mlp.moe if isinstance(layer.mlp, FusedMoE) else layer.mlp
        total += module_bytes(layer) - module_bytes(moe.experts) + ffn_experts_per_token * expert_bytes(moe.experts)
        for attn in layer.self_attn:  # the absorbed path reads W_UK / W_UV^T instead of kv_b_proj
            if isinstance(attn, FusedMLA):
                total -= module_bytes(attn.kv_b_proj)
    return float(total)


@torch.no_grad()
def mean_ffn_experts(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """FFN experts per token per layer (zero experts excluded) on a sequence (1, S)."""
    routing = model(ids, compute_logits=False).routing
    return float(torch.stack([r.ffn_experts_per_token.float().mean() for r in routing]).mean())


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), *(line(r) for r in rows)])

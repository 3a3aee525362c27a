"""Shared pieces of the inference benchmarks: the bench checkpoint, its transformers twin, timing, rooflines."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.infer import kernels, quant
from longcat_flash.infer.fused import FusedMLA, FusedMoE
from longcat_flash.presets import get_preset

DEFAULT_DIR = Path.home() / ".cache" / "longcat_flash" / "bench"


def bench_checkpoint(model: str | None, preset: str = "bench") -> Path:
    """The checkpoint to benchmark: --model, or a cached `longcat init --preset bench` (random bf16 weights)."""
    if model:
        return Path(model)
    path = DEFAULT_DIR / preset
    if not (path / "config.json").is_file():
        print(f"writing a fresh {preset} checkpoint to {path} ...", flush=True)
        init_checkpoint(get_preset(preset), path, dtype=torch.bfloat16)
    return path


def transformers_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LongcatFlashForCausalLM with exactly our weights (its loader wants zero-expert stubs)."""
    import transformers

    stub = path.parent / f"{path.name}-transformers"
    if not (stub / "config.json").is_file():
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


def gemv_bandwidth(fmt: str | None, total_bytes: float = 512e6, shape: tuple[int, int] = (4096, 1024),
                   passes: int = 5) -> float:
    """GB/s of x @ W^T at batch 1 over a working set far larger than the caches (bf16, or int8/fp8 blocks)."""
    O, I = shape
    x = torch.randn(1, I, dtype=torch.bfloat16)
    if fmt is None:
        count = int(total_bytes // (O * I * 2))
        weights = [torch.randn(O, I, dtype=torch.bfloat16) for _ in range(count)]
        run = lambda: [F.linear(x, w) for w in weights]  # noqa: E731
        nbytes = count * O * I * 2
    else:
        count = int(total_bytes // (O * I))
        blocks = [quant.quantize_blockwise(torch.randn(O, I), fmt) for _ in range(count)]
        run = lambda: [kernels.block_linear(x, v, s) for v, s in blocks]  # noqa: E731
        nbytes = count * O * I
    run()
    return nbytes / statistics.median(timed(run) for _ in range(passes)) / 1e9


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes(*module.parameters(), *module.buffers())


def expert_bytes(experts: torch.nn.Module) -> float:
    """Bytes one expert's weights occupy (plain or quantized stacks)."""
    n = (experts.gate_up_proj_values if isinstance(experts, quant.QuantExperts) else experts.gate_up_proj).shape[0]
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
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), *(line(r) for r in rows)])

"""GPU check: does the device path work, and how fast is it? One script, one run, under 8 minutes on one H200.

Sections (each one is isolated: a failure is recorded with its exception and traceback, and the next runs):
  environment         torch / transformers / CUDA versions, GPU name and capability, the dense bf16 peak used
                      for MFU (a table keyed by GPU name; --peak-tflops overrides it)
  train               our model (`bench` preset, MTP off) built on the meta device, materialised on the GPU with
                      the row-seeded init, fused AdamW, the budget controller on the GPU; `--steps` bf16
                      `train_step`s on synthetic but learnable batches (a fixed random Markov chain, made
                      locally). Per-step loss (it must fall: mean of the first 5 steps vs the last 5), tokens/s
                      (median of the steps after `--skip`, synchronised), MFU, peak memory, the warnings the steps
                      raised, and one extra step under torch.cuda.set_sync_debug_mode("warn"): host syncs by
                      source line (recorded, never a failure)
  transformers_train  the same weights (saved by us with zero-expert stubs) in transformers'
                      LongcatFlashForCausalLM, the same batches, fp32 LM cross-entropy, backward, clip, fused AdamW;
                      with --hf-dtype auto a few probe steps pick the faster of fp32 weights + bf16 autocast and
                      bf16 weights; tokens/s and ours / theirs. The first-step loss of both sides (same weights,
                      same batch) is a parity check
  decode              our engine (bf16, greedy) batch 1 and `--streams` concurrent streams vs transformers
                      `generate` at batch 1 and batch `--streams` on the same checkpoint in bf16; decode time per
                      token = (t(N) - t(1)) / (N - 1), as bench/bench_decode.py; greedy agreement of the two
Every figure goes to OUT/gpu_check.json (rewritten after each section, so a killed run keeps what it measured),
the table to OUT/gpu_check.txt and stdout. Exit status 0 only if every section passed; 2 if the device is absent.

    PYTHONPATH=src python bench/gpu_check.py --out OUT                          # the H200 run
    PYTHONPATH=src python bench/gpu_check.py --device cpu --quick --out /tmp/gc  # the code paths, on a CPU
    ... [--only train,decode] [--batch 16 --seq 1024 --steps 30] [--hf-dtype auto|float32|bfloat16]
        [--peak-tflops 989.4] [--time-limit-s 420: loops stop and later sections are skipped past it]

--quick: the tiny preset, a few steps, small batches, a few decode tokens; every section still runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_decode import engine_runner
from bench_train import our_step, their_step
from infer_common import decode_rate, interleaved, table

from longcat_flash.analysis.params import param_report
from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.device import DeviceError, resolve_device, use_device
from longcat_flash.flag_types import non_negative_int, positive_float, positive_int
from longcat_flash.runtime import tune_cpu_allocator
from longcat_flash.train.config import TrainConfig, recipe
from longcat_flash.train.determinism import seed_everything, set_deterministic
from longcat_flash.train.optim import init_parameters
from longcat_flash.train.trainer import to_device

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name();
# the longest matching key wins ("GH200" before "H200", "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = {
    "H200 NVL": 835.5, "GH200": 989.4, "H200": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.0, "H100": 989.4,
    "A100": 312.0, "L40S": 362.05, "B200": 2250.0,
}
FULL = dict(preset="bench", batch=16, seq=1024, steps=30, skip=5, probe_steps=3, prompt_len=32, new_tokens=64,
            streams=32, repeats=3)
QUICK = dict(preset="tiny", batch=4, seq=64, steps=8, skip=2, probe_steps=2, prompt_len=8, new_tokens=4,
             streams=4, repeats=1)
SECTIONS = ("environment", "train", "transformers_train", "decode")
LOSS_WINDOW = 5  # steps averaged at each end for "the loss falls"


# ---- the run's shared state ----

@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    cfg: TrainConfig
    work: Path  # temporary: the shared checkpoint lives here, never under --out
    batches: list[torch.Tensor] = dataclasses.field(default_factory=list)  # host (B, S+1) token windows
    peak_flops: float | None = None
    deterministic: bool = True  # what our training ran with; transformers gets the same
    ours_tokens_per_s: float | None = None
    deadline: float = math.inf  # perf_counter() past which loops stop and sections are skipped

    def budget(self, cap: float) -> float:
        """Seconds a loop may still run: `cap`, or less near the run's time limit."""
        return max(0.0, min(cap, self.deadline - time.perf_counter()))

    @property
    def checkpoint(self) -> Path:
        return self.work / "checkpoint"


def train_config(preset: str, batch: int, seq: int, steps: int) -> TrainConfig:
    """The preset's recipe without MTP (transformers has no MTP head) or monitors, at this batch; warmup a third of
    the steps so the loss visibly falls within them."""
    base = recipe(preset)
    return dataclasses.replace(
        base, model=base.model.replace(num_nextn_predict_layers=0), dtype="bfloat16", max_steps=steps,
        data=dataclasses.replace(base.data, batch_size=batch, seq_len=seq),
        loss=dataclasses.replace(base.loss, mtp_weight=0.0, monitor_every=0),
        schedule=dataclasses.replace(base.schedule, warmup_steps=min(base.schedule.warmup_steps, steps // 3)))


def markov_batches(vocab: int, count: int, batch: int, seq: int, seed: int = 0, states: int = 2048,
                   branch: int = 4) -> list[torch.Tensor]:
    """`count` (batch, seq+1) windows from a fixed random Markov chain over `states` token ids, each with `branch`
    equally likely successors: learnable (unigram, then bigram), entropy floor ln(branch) nats."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(3, vocab), size=min(states, vocab - 3), replace=False)
    successors = rng.integers(0, len(ids), size=(len(ids), branch))
    out = []
    for _ in range(count):
        state, rows = rng.integers(0, len(ids), size=batch), np.empty((batch, seq + 1), dtype=np.int64)
        for t in range(seq + 1):
            rows[:, t] = ids[state]
            state = successors[state, rng.integers(0, branch, size=batch)]
        out.append(torch.from_numpy(rows))
    return out


def deterministic_mode(enabled: bool, device: torch.device) -> None:
    """train.determinism.set_deterministic, with the device where its signature takes one."""
    try:
        set_deterministic(enabled, device)  # type: ignore[call-arg]
    except TypeError:
        set_deterministic(enabled)


# ---- measuring ----

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """fn, then wait for the device: a timed call covers the work it queued."""
    def run() -> Any:
        out = fn()
        sync(device)
        return out
    return run


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def recorded_warnings(into: Counter):
    """Count the warnings raised inside, by their first line and source location."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        into[f"{source(w.filename)}:{w.lineno}: {str(w.message).splitlines()[0][:160]}"] += 1


def source(filename: str) -> str:
    """A file's path from its package down (longcat_flash/model/moe.py, torch/..., transformers/...)."""
    parts = Path(filename).parts
    for root in ("longcat_flash", "transformers", "torch", "bench"):
        if root in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(root):])
    return Path(filename).name


def run_steps(fn: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], device: torch.device,
              budget_s: float) -> tuple[list[Any], list[float], Counter]:
    """Call fn on each (device) batch, each call synchronised and timed; stop early past `budget_s`."""
    results, seconds, caught = [], [], Counter()
    start = time.perf_counter()
    with recorded_warnings(caught):
        for batch in batches:
            sync(device)
            t0 = time.perf_counter()
            results.append(fn(batch))
            sync(device)
            seconds.append(time.perf_counter() - t0)
            if time.perf_counter() - start > budget_s:
                break
    return results, seconds, caught


def tokens_per_s(seconds: list[float], skip: int, tokens_per_step: int) -> float:
    timed = seconds[skip:] or seconds[-1:]
    return tokens_per_step / statistics.median(timed)


def sync_check(fn: Callable[[torch.Tensor], Any], batch: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """One step under set_sync_debug_mode("warn"): every host synchronisation, by the Python line that caused it
    (ops in backward report the line that called backward)."""
    if device.type != "cuda":
        return {"skipped": "not a CUDA device"}
    caught: Counter = Counter()
    with recorded_warnings(caught):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = {k: v for k, v in caught.items() if "synchroniz" in k.lower()}
    in_model = {k: v for k, v in syncs.items() if k.startswith("longcat_flash/model/")}
    return {"syncs_total": sum(syncs.values()), "syncs_in_model": sum(in_model.values()),
            "by_location": dict(Counter(syncs).most_common(12))}


# ---- FLOPs ----

def train_flops_per_token(cfg: TrainConfig, ffn_experts: float) -> dict[str, float]:
    """3 x the forward FLOPs per token: the active matmuls at the measured FFN experts per token
    (analysis/params.py, context 0) plus causal attention as training computes it (the naive MLA form: q.k over
    qk_head_dim and p.v over v_head_dim per head, over the mean causal context (S+1)/2). params.py's attention
    term is the absorbed decode form at a full context; it is recorded for reference, not used."""
    m, seq = cfg.model, cfg.data.seq_len
    matmul = param_report(m, ffn_experts, context=0).flops_per_token
    attention = m.num_attention_blocks * m.num_attention_heads * (seq + 1) / 2 * 2 * (m.qk_head_dim + m.v_head_dim)
    return {"forward_matmul": matmul, "forward_attention": attention, "train_per_token": 3 * (matmul + attention),
            "forward_attention_params_py_absorbed_full_context": param_report(m, ffn_experts, context=seq)
            .attention_flops}


def peak_tflops(name: str | None, override: float | None) -> float | None:
    if override is not None:
        return override
    matches = [key for key in PEAK_BF16_TFLOPS if name and key in name]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


# ---- models ----

def build_ours(ctx: Context) -> LongcatFlash:
    """As the trainer builds it: on the meta device, materialised on ours, row-seeded init (train/optim.py)."""
    with torch.device("meta"):
        model = LongcatFlash(ctx.cfg.model)
    model.to_empty(device=ctx.device)
    init_parameters(model, ctx.cfg.scaling, ctx.cfg.seed)
    return model.train()


def ensure_checkpoint(ctx: Context, model: LongcatFlash | None = None) -> Path:
    """The untrained weights in the official layout with zero-expert stubs (transformers' loader wants them)."""
    if not (ctx.checkpoint / "config.json").is_file():
        (model or build_ours(ctx)).save_pretrained(ctx.checkpoint, zero_expert_stubs=True)
    return ctx.checkpoint


def hf_model(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers.LongcatFlashForCausalLM.from_pretrained(path, dtype=dtype).to(device)


def hf_generate(model: torch.nn.Module, prompts: list[list[int]], n: int, device: torch.device
                ) -> Callable[[], torch.Tensor]:
    """transformers' greedy `generate` of exactly n tokens for equal-length prompts, as one batch on `device`."""
    ids = torch.tensor(prompts, device=device)
    return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                  attention_mask=torch.ones_like(ids))


# ---- sections ----

def section_environment(ctx: Context, rec: dict[str, Any]) -> None:
    try:
        import transformers
        rec["transformers"] = transformers.__version__
    except ImportError as err:
        rec["transformers"] = f"not importable: {err}"
    rec.update(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
               numpy=np.__version__, device=str(ctx.device), cpu_threads=torch.get_num_threads())
    name = None
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        name = props.name
        rec.update(gpu=name, capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count(),
                   gpu_memory_gb=round(props.total_memory / 1e9, 1), cudnn=torch.backends.cudnn.version())
    peak = peak_tflops(name, ctx.args.peak_tflops)
    ctx.peak_flops = None if peak is None else peak * 1e12
    rec["peak_bf16_tflops"] = peak
    rec["peak_source"] = "--peak-tflops" if ctx.args.peak_tflops is not None else (
        "table" if peak is not None else "unknown device: no MFU")


def section_train(ctx: Context, rec: dict[str, Any]) -> None:
    try:
        _train_ours(ctx, rec, deterministic=ctx.cfg.deterministic)
    except RuntimeError as err:  # a CUDA op without a deterministic kernel: record, measure without
        if "determinis" not in str(err).lower():
            raise
        rec["deterministic_error"] = str(err).splitlines()[0][:300]
    if "deterministic_error" in rec:  # outside the except: its traceback no longer holds the first model
        free_memory(ctx.device)
        _train_ours(ctx, rec, deterministic=False)
    losses = rec["loss"]
    window = max(1, min(LOSS_WINDOW, len(losses) // 2))  # --quick runs fewer than 2 x 5 steps
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    rec.update(loss_window=window, loss_first_mean=round(first, 4), loss_last_mean=round(last, 4))
    if not last < first:
        raise AssertionError(f"the loss did not fall: mean of the first {window} steps {first:.4f}, "
                             f"of the last {window} {last:.4f}")


def _train_ours(ctx: Context, rec: dict[str, Any], deterministic: bool) -> None:
    a, cfg, device = ctx.args, ctx.cfg, ctx.device
    deterministic_mode(deterministic, device)
    seed_everything(cfg.seed)
    ctx.deterministic = rec["deterministic"] = deterministic
    t0 = time.perf_counter()
    model = build_ours(ctx)
    rec["build_s"] = round(time.perf_counter() - t0, 2)
    rec["parameters"] = model.num_parameters()
    t0 = time.perf_counter()
    ensure_checkpoint(ctx, model)  # before any update: transformers starts from these weights
    rec["save_checkpoint_s"] = round(time.perf_counter() - t0, 2)
    step = our_step(cfg, model, full=True)  # build_optimizer: fused AdamW on CUDA
    batches = [to_device(b, device) for b in ctx.batches]
    metrics, seconds, caught = run_steps(step, batches, device, ctx.budget(a.section_budget_s))
    tokens = a.batch * a.seq
    rate = tokens_per_s(seconds, a.skip, tokens)
    ffn = statistics.fmean(m["ffn_experts_per_token"] for m in metrics[a.skip:] or metrics)
    flops = train_flops_per_token(cfg, ffn)
    ctx.ours_tokens_per_s = rate
    rec.update(steps=len(metrics), batch=a.batch, seq=a.seq, tokens_per_step=tokens,
               loss=[round(m["lm_loss"], 4) for m in metrics], step_s=[round(s, 4) for s in seconds],
               tokens_per_s=round(rate, 1), ffn_experts_per_token=round(ffn, 3),
               ffn_experts_target=cfg.ffn_expert_target, skipped_steps=sum(m["skipped"] for m in metrics),
               grad_norm_last=round(metrics[-1]["grad_norm"], 4), flops_per_token=flops,
               state_gb=round(metrics[-1]["state_bytes"] / 1e9, 3), step_warnings=dict(caught.most_common(10)),
               loss_floor_nats=round(math.log(4), 4))
    rec["mfu"] = None if ctx.peak_flops is None else round(rate * flops["train_per_token"] / ctx.peak_flops, 4)
    rec["peak_memory_train_gb"] = peak_gb(device)
    rec["sync_check"] = sync_check(step, batches[-1], device)
    if deterministic:  # what the deterministic kernels cost: a few more steps without them
        deterministic_mode(False, device)
        _, extra, _ = run_steps(step, batches[:a.skip + 3], device, ctx.budget(a.section_budget_s / 5))
        rec["tokens_per_s_nondeterministic"] = round(tokens_per_s(extra, 1, tokens), 1)
        deterministic_mode(True, device)
    del model, step, batches
    free_memory(device)


def section_transformers_train(ctx: Context, rec: dict[str, Any]) -> None:
    a, device = ctx.args, ctx.device
    deterministic_mode(ctx.deterministic, device)
    rec["deterministic"] = ctx.deterministic
    path = ensure_checkpoint(ctx)
    batches = [to_device(b, device) for b in ctx.batches]
    modes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    probes = {}
    for name in modes if a.hf_dtype == "auto" else []:
        losses, seconds, _ = _their_run(ctx, path, modes[name], batches[:a.probe_steps + 1], probe=True)
        probes[name] = {"first_loss": round(losses[0], 5),
                        "tokens_per_s": round(tokens_per_s(seconds, 1, a.batch * a.seq), 1)}
    rec["probe"] = probes
    chosen = max(probes, key=lambda n: probes[n]["tokens_per_s"]) if probes else a.hf_dtype
    rec["weights_dtype"] = chosen
    rec["autocast_bf16"] = True
    losses, seconds, caught = _their_run(ctx, path, modes[chosen], batches)
    rate = tokens_per_s(seconds, a.skip, a.batch * a.seq)
    rec.update(steps=len(losses), loss=[round(x, 4) for x in losses], step_s=[round(s, 4) for s in seconds],
               tokens_per_s=round(rate, 1), step_warnings=dict(caught.most_common(10)))
    rec["ratio_ours_over_transformers"] = None if ctx.ours_tokens_per_s is None else round(
        ctx.ours_tokens_per_s / rate, 3)
    fp32_first = probes.get("float32", {}).get("first_loss", losses[0] if chosen == "float32" else None)
    rec["first_loss_fp32_weights"] = None if fp32_first is None else round(fp32_first, 5)
    rec["peak_memory_train_gb"] = peak_gb(device)


def _their_run(ctx: Context, path: Path, dtype: torch.dtype, batches: list[torch.Tensor], probe: bool = False
               ) -> tuple[list[float], list[float], Counter]:
    """A fresh transformers model from the checkpoint, then one `their_step` per batch; freed afterwards."""
    model = hf_model(path, dtype, ctx.device).train()
    step = their_step(ctx.cfg, model)
    try:
        cap = ctx.args.section_budget_s / (5 if probe else 1)
        return run_steps(step, batches, ctx.device, ctx.budget(cap))
    finally:
        del model, step
        free_memory(ctx.device)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def section_decode(ctx: Context, rec: dict[str, Any]) -> None:
    from longcat_flash.infer.engine import Engine, EngineConfig
    from longcat_flash.infer.loader import load_for_inference
    from longcat_flash.infer.sampling import SamplingParams

    a, device = ctx.args, ctx.device
    deterministic_mode(False, device)  # as served
    path = ensure_checkpoint(ctx)
    t0 = time.perf_counter()
    model, _ = load_for_inference(path, dtype="bfloat16", device=device)
    engine = Engine(model, EngineConfig(prefill_chunk=1024, token_budget=max(1024, a.streams * a.prompt_len),
                                        max_running=a.streams))
    hf = hf_model(path, torch.bfloat16, device).eval()
    rec["load_s"] = round(time.perf_counter() - t0, 2)
    gen = torch.Generator().manual_seed(0)
    vocab, N = ctx.cfg.model.vocab_size, a.new_tokens
    prompt = torch.randint(3, vocab, (a.prompt_len,), generator=gen).tolist()
    streams = [torch.randint(3, vocab, (a.prompt_len,), generator=gen).tolist() for _ in range(a.streams)]
    with torch.inference_mode():
        t = interleaved({"ours N": synced(engine_runner(engine, [prompt], N), device),
                         "ours 1": synced(engine_runner(engine, [prompt], 1), device),
                         "hf N": synced(hf_generate(hf, [prompt], N, device), device),
                         "hf 1": synced(hf_generate(hf, [prompt], 1, device), device)}, a.repeats)
        decode = {side: decode_rate(t[f"{side} N"], t[f"{side} 1"], N) for side in ("ours", "hf")}
        batched = interleaved({"ours": synced(engine_runner(engine, streams, N), device),
                               "hf": synced(hf_generate(hf, streams, N, device), device)}, max(1, a.repeats - 1))
        ours_ids = engine.generate([prompt], SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True))[0]
        hf_ids = hf_generate(hf, [prompt], N, device)()[0, a.prompt_len:].tolist()
    aggregate = {side: a.streams * N / s for side, s in batched.items()}
    agree = next((i for i, (x, y) in enumerate(zip(ours_ids, hf_ids)) if x != y), min(len(ours_ids), len(hf_ids)))
    rec.update(new_tokens=N, prompt_len=a.prompt_len, streams=a.streams, repeats=a.repeats,
               decode_tok_s={k: v and round(v, 2) for k, v in decode.items()},
               decode_ms_per_token={k: v and round(1e3 / v, 3) for k, v in decode.items()},
               decode_ratio=ratio(decode["ours"], decode["hf"]),
               aggregate_tok_s={k: round(v, 1) for k, v in aggregate.items()},
               aggregate_ratio_vs_hf_batch1=ratio(aggregate["ours"], decode["hf"]),
               aggregate_ratio_vs_hf_same_batch=ratio(aggregate["ours"], aggregate["hf"]),
               greedy_agreeing_prefix=f"{agree}/{N}", peak_memory_gb=peak_gb(device))
    del model, engine, hf
    free_memory(device)


RUNNERS: dict[str, Callable[[Context, dict[str, Any]], None]] = {
    "environment": section_environment, "train": section_train, "transformers_train": section_transformers_train,
    "decode": section_decode,
}


# ---- the run ----

def run_section(name: str, ctx: Context, report: dict[str, Any], out: Path) -> None:
    rec: dict[str, Any] = {"status": "running"}
    report["sections"][name] = rec
    print(f"[gpu_check] {name} ...", flush=True)
    reset_peak(ctx.device)
    start = time.perf_counter()
    try:
        if start > ctx.deadline:
            raise TimeoutError(f"skipped: the run passed --time-limit-s {ctx.args.time_limit_s:g}")
        RUNNERS[name](ctx, rec)
        rec["status"] = "passed"
    except Exception as err:  # noqa: BLE001 - recorded, and the next section runs
        rec["status"] = "failed"
        rec["error"] = {"type": type(err).__name__, "message": str(err)[:2000],
                        "traceback": traceback.format_exc().splitlines()[-12:]}
    free_memory(ctx.device)  # after the except block: the traceback no longer holds the section's tensors
    rec["wall_s"] = round(time.perf_counter() - start, 2)
    rec["peak_memory_section_gb"] = peak_gb(ctx.device)
    print(f"[gpu_check] {name}: {rec['status']} in {rec['wall_s']} s"
          + (f" ({rec['error']['type']}: {rec['error']['message'][:200]})" if rec["status"] == "failed" else ""),
          flush=True)
    write_json(report, out)


def write_json(report: dict[str, Any], out: Path) -> None:
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out / "gpu_check.json")


def fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def summary_table(report: dict[str, Any]) -> str:
    s = report["sections"]
    env, tr, hf, dec = (s.get(k, {}) for k in SECTIONS)
    rows = [(name, rec.get("status", "not run"), fmt(rec.get("wall_s"), ".1f"),
             fmt(rec.get("peak_memory_section_gb"), ".2f"),
             f"{rec['error']['type']}: {rec['error']['message'][:70]}" if rec.get("error") else "")
            for name, rec in s.items()]
    status = table(rows, ("section", "status", "wall s", "peak GB", "error"))
    figures = [
        ("device", f"{env.get('gpu') or env.get('device', '-')} (torch {env.get('torch', '-')}, "
                   f"transformers {env.get('transformers', '-')})"),
        ("bf16 peak for MFU, TFLOP/s", fmt(env.get("peak_bf16_tflops"))),
        ("train: steps x (batch x seq)", f"{tr.get('steps', '-')} x ({tr.get('batch', '-')} x {tr.get('seq', '-')})"),
        (f"train: loss, mean of first -> last {tr.get('loss_window', LOSS_WINDOW)} steps",
         f"{fmt(tr.get('loss_first_mean'))} -> {fmt(tr.get('loss_last_mean'))}"),
        (f"train: tokens/s ours, deterministic={tr.get('deterministic', '-')} (off)",
         f"{fmt(tr.get('tokens_per_s'), ',.0f')} ({fmt(tr.get('tokens_per_s_nondeterministic'), ',.0f')})"),
        ("train: MFU ours", fmt(tr.get("mfu"), ".1%")),
        ("train: FFN experts/token (target)", f"{fmt(tr.get('ffn_experts_per_token'))} "
                                             f"({fmt(tr.get('ffn_experts_target'), '.3g')})"),
        ("train: peak memory ours, GB", fmt(tr.get("peak_memory_train_gb"), ".2f")),
        ("train: host syncs in one step (in model)", f"{fmt(tr.get('sync_check', {}).get('syncs_total'))} "
                                                    f"({fmt(tr.get('sync_check', {}).get('syncs_in_model'))})"),
        ("transformers: weights dtype", fmt(hf.get("weights_dtype"))),
        ("transformers: tokens/s", fmt(hf.get("tokens_per_s"), ",.0f")),
        ("train ratio ours / transformers", fmt(hf.get("ratio_ours_over_transformers"), ".2f")),
        ("first-step loss ours / transformers (fp32)", f"{fmt((tr.get('loss') or [None])[0])} / "
                                                       f"{fmt(hf.get('first_loss_fp32_weights'))}"),
        ("decode batch 1 tok/s ours / transformers", f"{fmt(dec.get('decode_tok_s', {}).get('ours'), '.1f')} / "
                                                     f"{fmt(dec.get('decode_tok_s', {}).get('hf'), '.1f')}"),
        ("decode ratio batch 1", fmt(dec.get("decode_ratio"), ".2f")),
        (f"aggregate tok/s, {dec.get('streams', '-')} streams ours / transformers",
         f"{fmt(dec.get('aggregate_tok_s', {}).get('ours'), '.1f')} / "
         f"{fmt(dec.get('aggregate_tok_s', {}).get('hf'), '.1f')}"),
        ("aggregate ratio vs transformers batch 1 / same batch",
         f"{fmt(dec.get('aggregate_ratio_vs_hf_batch1'), '.2f')} / "
         f"{fmt(dec.get('aggregate_ratio_vs_hf_same_batch'), '.2f')}"),
        ("greedy tokens agreeing (ours vs transformers)", fmt(dec.get("greedy_agreeing_prefix"))),
        ("peak GPU memory overall, GB", fmt(report.get("peak_memory_overall_gb"), ".2f")),
        ("host max RSS, GB", fmt(report.get("host_max_rss_gb"), ".2f")),
        ("total wall s", fmt(report.get("wall_s"), ".1f")),
    ]
    return status + "\n\n" + table(figures, ("figure", "value"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json and gpu_check.txt")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny preset, few steps: checks the code paths only")
    parser.add_argument("--only", default=",".join(SECTIONS[1:]),
                        help=f"comma-separated sections to run besides environment ({', '.join(SECTIONS[1:])})")
    parser.add_argument("--preset", choices=["tiny", "small", "bench"])
    for name in ("batch", "seq", "steps", "skip", "probe_steps", "prompt_len", "new_tokens", "streams", "repeats"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=non_negative_int if name == "skip" else positive_int,
                            dest=name, help=f"default {FULL[name]} ({QUICK[name]} with --quick)")
    parser.add_argument("--hf-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="transformers' weights (always with bf16 autocast); auto: probe both, keep the faster")
    parser.add_argument("--peak-tflops", type=positive_float, help="dense bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--section-budget-s", type=positive_float, default=150.0,
                        help="a training loop stops early past this many seconds (recorded as fewer steps)")
    parser.add_argument("--time-limit-s", type=positive_float, default=420.0,
                        help="loops stop, and sections not yet started are skipped (failed), past this many seconds")
    parser.add_argument("--work-dir", type=Path, help="where the temporary checkpoint goes (default: a temp dir)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.skip >= args.steps:
        parser.error(f"--skip {args.skip} leaves none of --steps {args.steps} timed: skip fewer warm-up steps")
    if args.new_tokens < 2:  # decode is timed from the first new token to the last
        parser.error(f"--new-tokens {args.new_tokens}: decode speed needs at least 2 new tokens")
    for flag, path in (("--out", args.out), ("--work-dir", args.work_dir)):
        if path is not None and path.exists() and not path.is_dir():
            parser.error(f"{flag} {path} is a file; name a directory")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS[1:])}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device.strip().lower()):  # auto would measure the CPU of a
            # machine without a GPU, and pass
            raise DeviceError(f"--device {args.device}: name the device to measure (cuda, cuda:N or cpu)")
        device = resolve_device(args.device)
    except DeviceError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    use_device(device)
    tune_cpu_allocator()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.txt").unlink(missing_ok=True)  # an earlier run's table, beside this run's JSON if stopped
    cfg = train_config(args.preset, args.batch, args.seq, args.steps)
    deterministic_mode(cfg.deterministic, device)  # before any GPU work: cuBLAS reads its workspace setting once
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.work_dir))
    ctx = Context(args, device, cfg, work, markov_batches(cfg.model.vocab_size, args.steps, args.batch, args.seq))
    report: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "sections": {}}
    start = time.perf_counter()
    ctx.deadline = start + args.time_limit_s
    try:
        for name in SECTIONS:
            if name == "environment" or name in args.only:
                run_section(name, ctx, report, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peaks = [r.get("peak_memory_section_gb") for r in report["sections"].values()]
    report["peak_memory_overall_gb"] = max((p for p in peaks if p is not None), default=None)
    report["host_max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    report["wall_s"] = round(time.perf_counter() - start, 2)
    report["passed"] = all(r["status"] == "passed" for r in report["sections"].values())
    text = summary_table(report)
    (args.out / "gpu_check.txt").write_text(text + "\n")
    write_json(report, args.out)
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

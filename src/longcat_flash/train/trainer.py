"""The training loop: `train_step()` (one optimizer step) and `train()` (a whole run in an output directory).

A run directory OUT holds:
    train_config.json             the resolved TrainConfig
    tokenizer.json, tokenizer_config.json
    metrics.jsonl                 one JSON object per step (see STEP_METRICS in docs/budget_pid.md)
    checkpoints/step_XXXXXXXX/    training state: model, optimizer, controller, sampler, trainer, RNG
    config.json, model.safetensors   at the end: the model in the official HF layout (LongcatFlash.from_pretrained)
    sample.txt                    a generated sample

Order inside a step: forward/backward over the micro-batches (the budget controller reads their routing
counts), clip, skip the update if the loss or gradient is not finite, optimizer step, then the explicit
controller update of the router biases for the next step.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torch.distributed.device_mesh import DeviceMesh

from .. import distributed as parallel
from ..checkpoint import hf, native
from ..data import ResumableSampler, TokenDataset, build_token_shard, sample_texts, validation_batches
from ..model import ModelOutput, Transformer
from ..tokenizer import Tokenizer, train_tokenizer
from .budget import BudgetController
from .config import CHECKPOINTS, CONFIG_FILE, TrainConfig
from .determinism import RNGState, seed_everything, set_deterministic
from .losses import LossTerms, lm_loss, training_losses
from .metrics import MetricsLog
from .monitors import router_cosine, router_grad_ratio
from .optim import NamedOptimizer, aligned_model_config, build_optimizer, init_parameters, lr_factor, set_lr
from .sample import generate


class TrainingStopped(RuntimeError):
    """The run cannot continue (repeated non-finite steps)."""


@dataclass
class TrainState:
    """The loop's own counters, checkpointed with everything else."""

    step: int = 0  # optimizer steps done, skipped ones included
    tokens: int = 0  # training tokens consumed
    skipped: int = 0
    consecutive_skips: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


@dataclass
class Run:
    """Everything a run holds; `stateful()` is exactly what a checkpoint saves."""

    cfg: TrainConfig
    out: Path
    tokenizer: Tokenizer
    model: Transformer
    optimizer: torch.optim.AdamW
    controller: BudgetController | None
    sampler: ResumableSampler
    val: TokenDataset
    state: TrainState
    mesh: DeviceMesh | None = None  # the (dp, ep) mesh of a torchrun launch; None in one process

    def stateful(self) -> dict[str, Any]:
        """Expert shards are saved whole and sliced on load (FullExperts): checkpoints fit any world size."""
        objects = {"model": parallel.FullExperts(self.model, self.model),
                   "optimizer": parallel.FullExperts(NamedOptimizer(self.optimizer), self.model),
                   "sampler": self.sampler, "trainer": self.state, "rng": RNGState()}
        if self.controller is not None:
            objects["controller"] = self.controller
        return objects


# ---- one step ----

def autocast(cfg: TrainConfig) -> AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, controller: BudgetController | None,
               batch: torch.Tensor, cfg: TrainConfig, step: int, mesh: DeviceMesh | None = None) -> dict[str, Any]:
    """One optimizer step on `batch` (B, S+1) token windows, split into `data.grad_accum` micro-batches.

    Returns the step's metrics. A non-finite loss or gradient norm skips the update (and the controller).
    Under torchrun `batch` is this rank's slice of the global batch: gradients, metrics and the router counts
    are reduced over `mesh`, so every rank takes the same step (docs/expert_parallel.md).
    """
    with_mtp = cfg.loss.mtp_weight > 0 and step >= cfg.loss.mtp_start_step
    monitor = cfg.loss.monitor_every > 0 and step % cfg.loss.monitor_every == 0
    acc, extra = _Accumulator(), {}
    micro_batches = batch.chunk(cfg.data.grad_accum)
    for i, micro in enumerate(micro_batches):
        with autocast(cfg):
            out = model(micro[:, :-1], with_mtp=with_mtp)
        selections = None if mesh is None else parallel.global_counts(  # the balance loss's f: global batch
            torch.stack([r.tokens_per_expert for r in out.routing]), mesh)
        terms = training_losses(out, micro[:, 1:], cfg.loss, cfg.model.n_routed_experts, cfg.ffn_expert_target,
                                selections)
        if monitor and i == 0:
            extra = _monitors(model, out, terms, cfg)
        (terms.total / len(micro_batches)).backward()
        acc.add(terms, out)
    parallel.reduce_gradients(model, mesh)
    grad_norm = float(parallel.clip_grad_norm_(model, cfg.optim.grad_clip or math.inf, mesh))
    metrics = parallel.average_metrics(acc.metrics(), mesh)
    skipped = not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm))
    lr = cfg.optim.lr * lr_factor(cfg.schedule, step, cfg.max_steps)
    budget = {"budget_rate": controller.rate()} if controller is not None else {}
    if not skipped:
        set_lr(optimizer, lr)
        optimizer.step()
        if controller is not None:
            controller.update(model.routers(), parallel.global_counts(acc.counts, mesh))
    optimizer.zero_grad(set_to_none=True)
    return {**metrics, "ffn_experts_target": cfg.ffn_expert_target, "lr": lr, "grad_norm": grad_norm,
            "skipped": skipped, **budget, **extra}


def _monitors(model: Transformer, out: ModelOutput, terms: LossTerms, cfg: TrainConfig) -> dict[str, Any]:
    ratios = router_grad_ratio(out, terms.lm, cfg.loss, cfg.model.n_routed_experts, cfg.ffn_expert_target)
    return {"router_grad_ratio": max(ratios), "router_grad_ratio_per_layer": ratios,
            "router_cosine": router_cosine(model.routers())}


class _Accumulator:
    """Sums loss terms and routing statistics over the micro-batches of one step."""

    def __init__(self) -> None:
        self.terms: list[LossTerms] = []
        self.counts: torch.Tensor | None = None  # (L, E+Z) slots per expert
        self.ffn: list[torch.Tensor] = []  # (L, T) FFN experts per token, per micro-batch
        self.hidden_norm: list[torch.Tensor] = []  # () mean L2 norm of the last hidden state, per micro-batch

    def add(self, terms: LossTerms, out: ModelOutput) -> None:
        self.terms.append(terms)
        counts = torch.stack([r.tokens_per_expert for r in out.routing])
        self.counts = counts if self.counts is None else self.counts + counts
        self.ffn.append(torch.stack([r.ffn_experts_per_token for r in out.routing]))
        self.hidden_norm.append(out.hidden.detach().float().norm(dim=-1).mean())

    def metrics(self) -> dict[str, Any]:
        def mean(name: str) -> float | None:
            values = [getattr(t, name) for t in self.terms]
            return None if values[0] is None else torch.stack(values).detach().float().mean().item()

        ffn = torch.cat(self.ffn, dim=1).float()  # (L, T)
        return {"loss": mean("total"), "lm_loss": mean("lm"), "mtp_loss": mean("mtp"), "z_loss": mean("z"),
                "balance_loss": mean("balance"), "hidden_norm": torch.stack(self.hidden_norm).mean().item(),
                "ffn_experts_per_token": ffn.mean().item(),
                "ffn_experts_std": ffn.std(dim=1).mean().item(),
                "ffn_experts_per_layer": [round(v, 4) for v in ffn.mean(dim=1).tolist()]}


@torch.no_grad()
def evaluate(model: Transformer, val: TokenDataset, cfg: TrainConfig, mesh: DeviceMesh | None = None) -> float:
    """Mean LM loss over the fixed validation batches (the same windows every time; each rank its slice)."""
    micro = cfg.data.batch_size // cfg.data.grad_accum
    losses = []
    for batch in validation_batches(val, micro, max_batches=cfg.data.val_batches, rank=parallel.rank(),
                                    world_size=parallel.world_size()):
        with autocast(cfg):
            logits = model(batch[:, :-1]).logits
        losses.append(lm_loss(logits, batch[:, 1:]))
    return parallel.average_metrics({"val": torch.stack(losses).mean().item()}, mesh)["val"]


# ---- a whole run ----

def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
          mesh: DeviceMesh | None = None, overlap: bool = True) -> dict[str, Any]:
    """Train in run directory `out` (fresh, or continued from its newest checkpoint); returns a summary.

    Under torchrun, `mesh` is the (dp, ep) layout (distributed.build_mesh): experts are sharded over ep, every
    rank takes its slice of the global batch, and only rank 0 writes; `overlap` is the ScMoE overlap switch.
    """
    main = parallel.is_main()
    run = setup(cfg, Path(out), resume=resume, progress=progress and main, mesh=mesh, overlap=overlap)
    cfg, state = run.cfg, run.state
    log = MetricsLog(run.out, state.step, cfg.max_steps, tensorboard=cfg.tensorboard, progress=progress) if main \
        else _Silent()
    log.note(_header(run))
    try:
        while state.step < cfg.max_steps:
            record = _timed_step(run)
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == cfg.max_steps:
                record["val_loss"] = evaluate(run.model, run.val, cfg, run.mesh)
                log.note(f"step {state.step}: loss {record['loss']:.4f}  val_loss {record['val_loss']:.4f}")
            log.write(record)
            _check_skips(run, record)
            if state.step % cfg.checkpoint.save_every == 0 or state.step == cfg.max_steps:
                save_checkpoint(run)
    finally:
        log.close()
    return finish(run)


def _header(run: Run) -> str:
    cfg, m = run.cfg, run.cfg.model
    tokens = cfg.data.batch_size * cfg.data.seq_len
    start = f"resuming at step {run.state.step}" if run.state.step else "starting"
    return (f"{start}: {run.model.num_parameters() / 1e6:.1f}M parameters ({m.num_layers} layers, "
            f"{m.n_routed_experts} FFN + {m.zero_expert_num} zero experts, top-{m.moe_topk}, K_e "
            f"{cfg.ffn_expert_target:g}); {tokens} tokens/step, {cfg.max_steps} steps, "
            f"{len(run.sampler.dataset) * cfg.data.seq_len / 1e6:.1f}M training tokens; {cfg.dtype} autocast")


def _timed_step(run: Run) -> dict[str, Any]:
    start = time.perf_counter()
    batch = run.sampler.next_batch(run.cfg.data.batch_size)  # (B, S+1)
    metrics = train_step(run.model, run.optimizer, run.controller, batch, run.cfg, run.state.step, run.mesh)
    seconds = time.perf_counter() - start
    tokens = batch.shape[0] * (batch.shape[1] - 1) * parallel.world_size()  # the global batch
    run.state.step += 1
    run.state.tokens += tokens
    return {"step": run.state.step, **metrics, "tokens": run.state.tokens, "tokens_per_s": tokens / seconds,
            "step_s": seconds}


def _check_skips(run: Run, record: dict[str, Any]) -> None:
    state = run.state
    state.skipped += record["skipped"]
    state.consecutive_skips = state.consecutive_skips + 1 if record["skipped"] else 0
    if state.consecutive_skips >= run.cfg.max_consecutive_skips:
        latest = native.latest_checkpoint(run.out / CHECKPOINTS)
        raise TrainingStopped(
            f"stopping at step {state.step}: {state.consecutive_skips} consecutive steps had a non-finite loss "
            f"or gradient (last loss={record['loss']}, grad_norm={record['grad_norm']}). Lower optim.lr or "
            f"raise schedule.warmup_steps; the last good checkpoint is {latest or 'none'}")


class _Silent:
    """The metrics sink of ranks other than 0: rank 0 logs the (rank-averaged) metrics for everyone."""

    def write(self, record: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


def save_checkpoint(run: Run) -> Path:
    meta = {"step": run.state.step, "train_config": run.cfg.to_dict()}
    states = {name: obj.state_dict() for name, obj in run.stateful().items()}  # every rank: gathers the experts
    if not parallel.is_main():
        return native.step_dir(run.out / CHECKPOINTS, run.state.step)
    return native.save_states(run.out / CHECKPOINTS, run.state.step, states, meta, keep=run.cfg.checkpoint.keep)


def finish(run: Run) -> dict[str, Any]:
    """Write the model in the HF layout beside the tokenizer, and a generated sample (rank 0 writes)."""
    cfg, tok = run.cfg, run.tokenizer
    with parallel.experts_gathered(run.model):  # every rank holds all experts: official layout, local dispatch
        if parallel.is_main():
            hf.save_pretrained(run.model, run.out)
        prompt = tok.encode(cfg.sample_prompt) or [tok.bos_id]
        ids = generate(run.model, prompt, cfg.sample_tokens, temperature=cfg.sample_temperature,
                       generator=torch.Generator().manual_seed(cfg.seed), eos_id=tok.eos_id,
                       max_context=cfg.data.seq_len)
    sample = cfg.sample_prompt + tok.decode(ids)
    if parallel.is_main():
        (run.out / "sample.txt").write_text(sample + "\n")
    return {"out": str(run.out), "steps": run.state.step, "tokens": run.state.tokens,
            "skipped": run.state.skipped, "sample": sample}


# ---- setup ----

def setup(cfg: TrainConfig, out: Path, *, resume: bool = False, progress: bool = True,
          mesh: DeviceMesh | None = None, overlap: bool = True) -> Run:
    """Build (or, with resume, restore) every object of a run in `out` (see `train` for mesh and overlap)."""
    set_deterministic(cfg.deterministic)
    seed_everything(cfg.seed)
    checkpoint = native.resolve(out) if resume else None
    if not resume and native.list_checkpoints(out / CHECKPOINTS):
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    with parallel.main_first():  # rank 0 trains the tokenizer and tokenizes the corpus; the others reuse both
        tokenizer = build_tokenizer(cfg, out, reuse=resume or not parallel.is_main(), progress=progress)
        cfg = dataclasses.replace(cfg, model=aligned_model_config(cfg.model, cfg.scaling.variance_alignment).replace(
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id))
        train_set, val_set = build_datasets(cfg, tokenizer, progress)
    model = Transformer(cfg.model)
    scale = init_parameters(model, cfg.scaling)
    parallel.parallelize(model, mesh, overlap)  # same seed on every rank: each keeps its slice of the experts
    m = cfg.model
    controller = BudgetController(cfg.budget, m.num_layers, m.n_routed_experts, m.moe_topk,
                                  cfg.ffn_expert_target) if cfg.budget.enabled and m.zero_expert_num else None
    run = Run(cfg, out, tokenizer, model, build_optimizer(model, cfg.optim, scale), controller,
              ResumableSampler(train_set, cfg.seed, rank=parallel.rank(), world_size=parallel.world_size()), val_set,
              TrainState(), mesh)
    if parallel.is_main():
        (out / CONFIG_FILE).write_text(cfg.to_json())
    if checkpoint is not None:
        native.load(checkpoint, run.stateful())
    return run


def resume_config(out: str | Path) -> TrainConfig:
    """The TrainConfig saved with the newest checkpoint of run directory `out`."""
    meta = native.read_manifest(native.resolve(out))["meta"]
    return TrainConfig.from_dict(meta["train_config"])


def build_tokenizer(cfg: TrainConfig, out: Path, *, reuse: bool, progress: bool) -> Tokenizer:
    """The run's tokenizer: OUT's own when resuming, else `data.tokenizer`, else a BPE trained on the corpus."""
    if reuse and (out / "tokenizer.json").is_file():
        return Tokenizer.load(out)
    if cfg.data.tokenizer is not None:
        tokenizer = Tokenizer.load(cfg.data.tokenizer)
    else:
        if progress:
            print(f"training a byte-level BPE (vocab {cfg.model.vocab_size}) on "
                  f"{cfg.data.tokenizer_sample_bytes / 1e6:.0f} MB of {cfg.data.source}", flush=True)
        texts = sample_texts(cfg.data.source, cfg.data.tokenizer_sample_bytes, text_field=cfg.data.text_field)
        tokenizer = train_tokenizer(texts, cfg.model.vocab_size)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than "
                         f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    tokenizer.model_max_length = cfg.model.max_position_embeddings
    tokenizer.save(out)
    return tokenizer


def build_datasets(cfg: TrainConfig, tokenizer: Tokenizer, progress: bool) -> tuple[TokenDataset, TokenDataset]:
    """Tokenize the corpus once into a cached shard; windows of seq_len + 1; the tail is the validation split."""
    data = cfg.data
    cache = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    shard = build_token_shard(data.source, tokenizer, cache, text_field=data.text_field, max_bytes=data.max_bytes,
                              progress=progress)
    train_set = TokenDataset.from_shard(shard, data.seq_len, "train", data.val_fraction)
    val_set = TokenDataset.from_shard(shard, data.seq_len, "val", data.val_fraction)
    validation_batches(val_set, data.batch_size // data.grad_accum)  # fails now if the split is too small
    return train_set, val_set


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "longcat-flash" / "tokens"

"""The training loop: `train_step()` (one optimizer step) and `train()` (a whole run in an output directory).

A run directory OUT holds:
    train_config.json             the resolved TrainConfig
    tokenizer.json, tokenizer_config.json
    metrics.jsonl                 one JSON object per step (keys: README, "Training")
    checkpoints/step_XXXXXXXX/    training state: sharded model and Adam moments, controller, sampler, trainer, RNG
    config.json, model*.safetensors   at the end: the model in the official HF layout (LongcatFlash.from_pretrained)
    sample.txt                    a generated sample

Order inside a step: forward/backward over the micro-batches (the budget controller reads their routing
counts), clip, skip the update if the loss or gradient is not finite, optimizer step, then the explicit
controller update of the router biases for the next step. Everything runs on the run's device; under torchrun
the model is sharded with FSDP2 (and experts over ep: distributed/fsdp.py) and every rank takes its slice of
the global batch.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh

from .. import distributed
from ..chat_template import CONFIG_FILE, TEMPLATE_FILE
from ..checkpoint import hf, training
from ..checkpoint.safetensors_files import stored_dtype
from ..data import (IGNORE, CopyMix, Corpus, PackedBatch, ResumableSampler, TokenDataset, split_windows,
                    validation_batches)
from ..data.conversation_packing import ConversationDataset
from ..data.corpus import DOC_SUFFIXES, corpus_kind
from ..data.dataset_folders import RUN_CONFIG_FILE, RUN_LOCK_FILE, tree_files
from ..device import autocast as device_autocast
from ..device import compute_dtype, resolve_device, use_device
from ..files import make_folder
from ..model import ModelOutput, Transformer
from ..tokenizer import TOKENIZER_FILE, Tokenizer
from . import run_lock
from .budget import BudgetController
from .checkpoints import has_checkpoint, load_checkpoint, newest_checkpoint, save_checkpoint, saved_train_config
from .config import CHECKPOINTS, absolute_paths, check_resumable, CheckpointConfig, TrainConfig
from .datasets import build_datasets, build_tokenizer, check_text_field
from .determinism import (RNGState, global_state_restored, no_deterministic_kernel_named, seed_everything,
                          set_deterministic)
from .losses import LossTerms, layer_counts, lm_loss, real_tokens, target_counts, training_losses
from .memory import check_fits
from .metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsLog, require_tensorboard
from .monitors import router_cosine, router_grad_ratio
from .header_notes import idle_mtp_note, yarn_note, yarn_restage_note
from .optim import build_optimizer, init_parameters, lr_factor, set_lr
from .pretrained import (TOKENIZER_FIELDS, check_same_shapes, copy_generation_config, load_pretrained,
                         model_changes, run_eos_ids)
from .sample import generate

SAMPLE_FILE = "sample.txt"
# What a run (or `longcat grow`) writes into its directory beside the model and the checkpoints.
RUN_FILES = ("config.json", TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE, hf.GENERATION_CONFIG, RUN_CONFIG_FILE,
             METRICS_FILE, SAMPLE_FILE)


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
    """Everything a run holds; `stateful()` and `sharded_state()` are exactly what a checkpoint saves."""

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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resume_note: str = ""  # what a resume with --accept-changed-data found changed in the data, for the header

    def stateful(self) -> dict[str, Any]:
        """The small, replicated objects: rank 0 writes them (checkpoint/training.py)."""
        objects = {"sampler": self.sampler, "trainer": self.state, "rng": RNGState()}
        if self.controller is not None:
            objects["controller"] = self.controller
        return objects

    def sharded_state(self) -> dict[str, Any]:
        """Model weights and Adam moments by parameter name, as each rank holds them (DTensor shards under FSDP):
        every rank writes its own pieces, and any layout reads back the pieces it needs (checkpoint/sharded.py).
        A tied lm_head is the embedding: safetensors stores a storage under one name only, and loading the
        embedding fills both, so it is left out."""
        model = get_model_state_dict(self.model)
        if self.model.config.tie_word_embeddings:
            model.pop("lm_head.weight", None)
        return {"model": model, "optimizer": get_optimizer_state_dict(self.model, self.optimizer)["state"]}


# ---- one step ----

def autocast(cfg: TrainConfig, device: torch.device, mesh: DeviceMesh | None) -> AbstractContextManager:
    """bf16 autocast on the device in one process; under FSDP its mixed-precision policy casts instead."""
    return device_autocast(device, cfg.dtype) if mesh is None else nullcontext()


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, controller: BudgetController | None,
               batch: torch.Tensor | PackedBatch, cfg: TrainConfig, step: int, mesh: DeviceMesh | None = None
               ) -> dict[str, Any]:
    """One optimizer step on `batch` (B, S+1) token windows on the model's device (or packed conversations:
    data/batches.py split_windows), split into `data.grad_accum` micro-batches.

    Returns the step's metrics, read from the device once. A non-finite loss or gradient norm skips the update
    (and the controller). Under torchrun `batch` is this rank's slice of the global batch: FSDP reduces the
    gradients, and the metrics and router counts are reduced over the world, so every rank takes the same step
    (docs/expert_parallel.md).
    """
    device = batch.device
    with_mtp = cfg.loss.mtp_weight > 0 and step >= cfg.loss.mtp_start_step
    monitor = cfg.loss.monitor_every > 0 and step % cfg.loss.monitor_every == 0
    acc, extra = _Accumulator(), {}
    micro_batches = batch.chunk(cfg.data.grad_accum)
    tokens, real_counts = None, None
    if isinstance(batch, PackedBatch):  # SFT: every trained token of the step weighs the same, on every rank
        tokens = distributed.average(target_counts(*split_windows(batch)[1:]).float(), mesh) / len(micro_batches)
        real_counts = distributed.average(torch.stack([real_tokens(m.documents[:, :-1]).sum()  # (M,) per micro
                                                       for m in micro_batches]).float(), mesh)
    for i, micro in enumerate(micro_batches):
        inputs, targets, documents = split_windows(micro)
        real = real_tokens(documents)  # (B, S) or None: a packed window's padding is not routed data
        if real is None and real_counts is not None:  # packed windows of one document each: no padding
            real = torch.ones_like(inputs, dtype=torch.bool)
        divisors = None if real_counts is None else torch.stack([real_counts.mean(), real_counts[i]])
        with autocast(cfg, device, mesh):
            out = model(inputs, with_mtp=with_mtp, compute_logits=False, documents=documents)
            counts = layer_counts(out, real)  # (L, E+Z)
            selections = None if mesh is None else distributed.global_counts(counts, mesh)  # the balance's f
            terms = training_losses(out, targets, cfg.loss, cfg.model.n_routed_experts,
                                    cfg.ffn_expert_target, selections, head=model.lm_head, documents=documents,
                                    tokens=tokens, real=real, real_counts=divisors)
        if monitor and i == 0:
            extra = _monitors(model, out, terms, cfg, with_mtp, real)
        (terms.total / len(micro_batches)).backward()
        acc.add(terms, out, counts, real)
    distributed.average_expert_gradients(model, mesh)
    grad_norm = distributed.clip_grad_norm_(model, cfg.optim.grad_clip or math.inf, sharded=mesh is not None)
    metrics = acc.metrics(mesh, grad_norm)  # the step's one device-to-host read
    skipped = not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]))
    lr = cfg.optim.lr * lr_factor(cfg.schedule, step, cfg.max_steps)
    budget = {"budget_rate": controller.rate()} if controller is not None else {}
    if not skipped:
        set_lr(optimizer, lr)
        optimizer.step()
        if controller is not None:
            controller.update(model.routers(), distributed.global_counts(acc.counts, mesh))
    held = distributed.state_bytes(model, optimizer)  # parameters, gradients and Adam moments on this rank
    optimizer.zero_grad(set_to_none=True)
    return {**metrics, "ffn_experts_target": cfg.ffn_expert_target, "lr": lr, "skipped": skipped,
            "state_bytes": held, **budget, **extra}


def _monitors(model: Transformer, out: ModelOutput, terms: LossTerms, cfg: TrainConfig, with_mtp: bool,
              real: torch.Tensor | None) -> dict[str, Any]:
    idle = [model.model.mtp] if model.model.mtp is not None and not with_mtp else []
    with distributed.side_backward(model, idle):
        ratios = router_grad_ratio(out, terms.lm, cfg.loss, cfg.model.n_routed_experts, cfg.ffn_expert_target,
                                   real)
    return {"router_grad_ratio": max(ratios), "router_grad_ratio_per_layer": ratios,
            "router_cosine": router_cosine(model.routers())}


class _Accumulator:
    """Sums loss terms and routing statistics over the micro-batches of one step, on the device."""

    def __init__(self) -> None:
        self.terms: list[LossTerms] = []
        self.counts: torch.Tensor | None = None  # (L, E+Z) slots per expert
        self.ffn: list[torch.Tensor] = []  # (2, L) sums of FFN experts per token and of their squares
        self.tokens: list[torch.Tensor] = []  # () the tokens those sums are over (not padding), per micro-batch
        self.hidden_norm: list[torch.Tensor] = []  # () sum of the last hidden state's L2 norms, per micro-batch

    def add(self, terms: LossTerms, out: ModelOutput, counts: torch.Tensor, real: torch.Tensor | None) -> None:
        """counts: (L, E+Z) `layer_counts` of the real tokens; real: (B, S) or None (all)."""
        self.terms.append(terms)
        self.counts = counts if self.counts is None else self.counts + counts
        ffn = torch.stack([r.ffn_experts_per_token for r in out.routing]).float()  # (L, T)
        weight = torch.ones_like(ffn[0]) if real is None else real.reshape(-1).float()  # (T,)
        self.ffn.append(torch.stack([ffn @ weight, ffn.pow(2) @ weight]))
        self.tokens.append(weight.sum())
        self.hidden_norm.append(out.hidden.detach().float().norm(dim=-1).reshape(-1) @ weight)

    def metrics(self, mesh: DeviceMesh | None, grad_norm: torch.Tensor) -> dict[str, Any]:
        """Every value averaged over the ranks (equal slices of the global batch: the mean of per-rank means is
        the global mean; the global gradient norm is the same on every rank) in one all-reduce, then read to the
        host, with the gradient norm, in one copy. The experts' spread over tokens comes from the global mean and
        mean square of each layer's counts, so it is the same at any world size."""
        named = {"loss": "total", "lm_loss": "lm", "mtp_loss": "mtp", "z_loss": "z", "balance_loss": "balance"}
        present = {key: term for key, term in named.items() if getattr(self.terms[0], term) is not None}
        ffn = torch.stack(self.ffn).sum(0)  # (2, L) this rank's sums
        values = [torch.stack([getattr(t, term) for t in self.terms]).detach().float().mean()
                  for term in present.values()]
        values += [torch.stack(self.hidden_norm).sum(), grad_norm.detach().float().to(ffn.device),
                   torch.stack(self.tokens).sum()]
        host = distributed.average(torch.cat([torch.stack(values), ffn.reshape(-1)]), mesh).tolist()
        keys = [*present, "hidden_norm", "grad_norm"]
        L, tokens = ffn.shape[1], host[len(keys)]  # averaged sums over averaged counts: the global means
        means = [s / tokens for s in host[len(keys) + 1:len(keys) + 1 + L]]
        squares = [s / tokens for s in host[len(keys) + 1 + L:]]
        n = tokens * (1 if mesh is None else mesh.size())  # the real tokens of all ranks
        stds = [math.sqrt(max(0.0, sq - m * m) * n / max(1, n - 1)) for m, sq in zip(means, squares)]  # unbiased
        metrics = dict(zip(keys, host))
        metrics["hidden_norm"] /= tokens
        return {**dict.fromkeys(named), **metrics, "ffn_experts_per_token": sum(means) / L,
                "ffn_experts_std": sum(stds) / L, "ffn_experts_per_layer": [round(v, 4) for v in means]}


@torch.no_grad()
def evaluate(model: Transformer, val: TokenDataset | ConversationDataset, cfg: TrainConfig,
             mesh: DeviceMesh | None = None) -> float:
    """Mean LM loss over every target of the fixed validation batches (the same windows every time; each rank
    its slice); for SFT, over the assistant tokens."""
    device = model.lm_head.weight.device
    total = torch.zeros(2, device=device)  # (loss sum, targets)
    for batch in validation_batches(val, cfg.data.batch_size, max_batches=cfg.data.val_batches,
                                    rank=distributed.rank(), world_size=distributed.world_size()):
        for micro in to_device(batch, device).chunk(cfg.data.grad_accum):  # a training step's memory, same windows
            inputs, targets, documents = split_windows(micro)
            with autocast(cfg, device, mesh):
                logits = model(inputs, documents=documents).logits
            count = (targets != IGNORE).sum()
            total += torch.stack([lm_loss(logits, targets) * count, count.float()])
    total = distributed.average(total, mesh)
    return float(total[0] / total[1])


def to_device(batch: torch.Tensor | PackedBatch, device: torch.device) -> torch.Tensor | PackedBatch:
    """A host batch onto the device: pinned and copied asynchronously when that device is a GPU."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


# ---- a whole run ----

def train(cfg: TrainConfig, out: str | Path, *, resume: bool | Literal["auto"] = False, progress: bool = True,
          mesh: DeviceMesh | None = None, overlap: bool = True, device: torch.device | str = "auto",
          same_data: bool = True) -> dict[str, Any]:
    """Train on `device` in run directory `out` (fresh, or continued from its newest checkpoint; resume="auto": where
    it has one, as `--auto-resume`); returns a summary. A resume refuses data that differs from the checkpoint's
    unless same_data=False (`--accept-changed-data`: it goes on with the data as it is now, not bit for bit).
    `device`: a torch.device, or a name as `longcat train --device` takes it (auto: CUDA when available, cuda
    refused by name where there is none); made this process's current device.

    Under torchrun, `mesh` is the (dp, ep) layout (distributed.build_mesh): FSDP2 shards the model over the world
    and the experts over ep, every rank takes its slice of the global batch, and only rank 0 writes the small
    files; `overlap` is the ScMoE overlap switch. The global generators and deterministic flags the run sets are
    put back as they were when it returns, and the run directory's lock is released however it ends.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig (build_config(...) or recipe(...)), got {type(cfg).__name__}")
    if not str(out).strip():  # Path("") is the current directory: a run would write its files all over it
        raise ValueError("the run directory is empty; give a path (a new or empty directory, or a run to resume)")
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"the run directory {out} is a file")
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume={resume!r}: give True, False or 'auto' (continue where `out` holds a checkpoint)")
    found = has_checkpoint(out) if resume == "auto" else None  # said in the header: a typo in `out` starts afresh
    resume = found if found is not None else resume
    device = resolve_device(device) if isinstance(device, str) else device  # a torch.device: the caller's own
    use_device(device)
    made = not Path(out).exists()
    with global_state_restored():
        try:
            return _train(cfg, Path(out), resume=resume, progress=progress, mesh=mesh, overlap=overlap,
                          device=device, auto_new=found is False, same_data=same_data)
        finally:  # a failed run frees its directory too: another process may resume it while this one goes on
            _release(Path(out), made)


def _release(out: Path, made: bool) -> None:
    """Give the run directory's lock back. A directory this call made that holds nothing but its lock and the
    tokenizer a run writes first is a start refused before it trained (bad data, a typo in a flag, nodes that do not
    share it): it goes, its files removed by the process that holds its lock while it holds it; another rank, or a
    second process that made it at the same moment, removes the folder only once it is empty."""
    try:
        if made and run_lock.holds(out) and {p.name for p in out.iterdir()} <= {RUN_LOCK_FILE, TOKENIZER_FILE,
                                                                                 CONFIG_FILE}:
            for name in (TOKENIZER_FILE, CONFIG_FILE, RUN_LOCK_FILE):
                (out / name).unlink(missing_ok=True)
    except OSError:  # written into meanwhile, or not ours to read
        pass
    run_lock.release(out)
    if made:
        with suppress(OSError):  # not empty: another process's files, or a run that trained
            out.rmdir()


def _train(cfg: TrainConfig, out: Path, *, resume: bool, progress: bool, mesh: DeviceMesh | None, overlap: bool,
           device: torch.device, auto_new: bool = False, same_data: bool = True) -> dict[str, Any]:
    main = distributed.is_main()
    run = setup(cfg, out, resume=resume, progress=progress if main else None, mesh=mesh, overlap=overlap,
                device=device, same_data=same_data)
    cfg, state = run.cfg, run.state
    log = MetricsLog(run.out, state.step, cfg.max_steps, tensorboard=cfg.tensorboard, progress=progress) if main \
        else _Silent()
    log.note((f"no checkpoint to resume in {run.out} yet: " if auto_new else "") + _header(run))
    try:
        with no_deterministic_kernel_named():
            while state.step < cfg.max_steps:
                record = _timed_step(run)
                if (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == cfg.max_steps:
                    record["val_loss"] = evaluate(run.model, run.val, cfg, run.mesh)
                    log.note(f"step {state.step}: lm_loss {record['lm_loss']:.4f}  val_loss {record['val_loss']:.4f}  "
                             f"(loss {record['loss']:.4f}: lm + the MTP, z and balance terms)")  # like with like
                log.write(record)
                _check_skips(run, record)
                if state.step % cfg.checkpoint.save_every == 0 or state.step == cfg.max_steps:
                    save_checkpoint(run)
    except KeyboardInterrupt:  # Ctrl-C
        log.note(_interrupted(run))
        raise
    finally:
        log.close()
    return finish(run)


def _interrupted(run: Run) -> str:
    """Where a resume of an interrupted run goes on from (the steps after it are trained again)."""
    saved = training.list_checkpoints(run.out / CHECKPOINTS)
    if not saved:
        return (f"interrupted after step {run.state.step}: no checkpoint yet (the first at step "
                f"{min(run.cfg.checkpoint.save_every, run.cfg.max_steps)}); a new run starts over")
    return (f"interrupted after step {run.state.step}: resuming {run.out} goes on from step "
            f"{int(saved[-1].name.removeprefix(training.STEP_PREFIX))}, its newest checkpoint")


def _header(run: Run) -> str:
    cfg, m = run.cfg, run.cfg.model
    tokens = cfg.data.batch_size * cfg.data.seq_len
    split = len(run.sampler.dataset) * cfg.data.seq_len  # small corpora and SFT sets are well under 0.1M tokens
    split_text = f"{split / 1e6:.1f}M" if split >= 1e5 else f"{split:,}"
    start = f"resuming at step {run.state.step}" if run.state.step else "starting"
    return (f"{start}: {run.model.num_parameters() / 1e6:.1f}M parameters ({m.num_layers} layers, "
            f"{m.n_routed_experts} FFN + {m.zero_expert_num} zero experts, top-{m.moe_topk}, K_e "
            f"{cfg.ffn_expert_target:g}); {tokens} tokens/step, {cfg.max_steps} steps, "
            f"{split_text} tokens in the training split; "
            f"{cfg.dtype} compute on {run.device}" + (f", FSDP over {run.mesh.size()} ranks (ep {run.mesh['ep'].size()})" if run.mesh else "")
            + (f"; from {cfg.init_from}" + ("" if run.state.step else _init_changes(cfg)) if cfg.init_from else "")
            + "".join(f"\n{data.report}" for data in (run.sampler.dataset, run.val)
                      if isinstance(data, (ConversationDataset, CopyMix)))
            + yarn_note(m) + ("" if run.state.step or not cfg.init_from else yarn_restage_note(cfg))
            + idle_mtp_note(cfg) + (f"\n{run.resume_note}" if run.resume_note else ""))


def _init_changes(cfg: TrainConfig) -> str:
    """What the run's model changes from init_from's config.json (the tokenizer's ids and vocabulary aside)."""
    changes = model_changes(cfg.init_from, cfg.model, skip=TOKENIZER_FIELDS)
    return f", changing {', '.join(changes)}" if changes else ""


def _timed_step(run: Run) -> dict[str, Any]:
    start = time.perf_counter()
    batch = to_device(run.sampler.next_batch(run.cfg.data.batch_size), run.device)  # (B, S+1)
    metrics = train_step(run.model, run.optimizer, run.controller, batch, run.cfg, run.state.step, run.mesh)
    seconds = time.perf_counter() - start
    tokens = batch.shape[0] * (batch.shape[1] - 1) * distributed.world_size()  # the global batch
    run.state.step += 1
    run.state.tokens += tokens
    return {"step": run.state.step, **metrics, "tokens": run.state.tokens, "tokens_per_s": tokens / seconds,
            "step_s": seconds}


def _check_skips(run: Run, record: dict[str, Any]) -> None:
    state = run.state
    state.skipped += record["skipped"]
    state.consecutive_skips = state.consecutive_skips + 1 if record["skipped"] else 0
    if state.consecutive_skips >= run.cfg.max_consecutive_skips:
        latest = training.latest_checkpoint(run.out / CHECKPOINTS)
        raise TrainingStopped(
            f"stopping at step {state.step}: {state.consecutive_skips} consecutive steps had a non-finite loss "
            f"or gradient (last loss={record['loss']}, grad_norm={record['grad_norm']}). Lower optim.lr or "
            f"raise schedule.warmup_steps; the last good checkpoint is {latest or 'none'}")


class _Silent:
    """The metrics sink of ranks other than 0: rank 0 logs the (rank-averaged) metrics for everyone."""

    def write(self, record: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


def finish(run: Run) -> dict[str, Any]:
    """Write the model in the HF layout beside the tokenizer (streamed one tensor at a time: sharded weights are
    gathered one by one and rank 0 writes them), and a generated sample."""
    cfg, tok = run.cfg, run.tokenizer
    hf.save_pretrained(run.model, run.out, writer=distributed.is_main(), dtype=cfg.checkpoint.export_dtype)
    text = cfg.sample_prompt
    if cfg.sft.data is not None:  # the sample prompt is a user message
        text = tok.apply_chat_template([{"role": "user", "content": text}])
    prompt = tok.encode(text, allow_special=cfg.sft.data is not None) or [tok.bos_id]
    ids = generate(run.model, prompt, cfg.sample_tokens, temperature=cfg.sample_temperature,
                   generator=torch.Generator(run.device).manual_seed(cfg.seed), eos_id=tok.eos_id,
                   max_context=cfg.data.seq_len)
    sample = text + tok.decode(ids)
    if distributed.is_main():
        (run.out / SAMPLE_FILE).write_text(sample + "\n")
    return {"out": str(run.out), "steps": run.state.step, "tokens": run.state.tokens,
            "skipped": run.state.skipped, "sample": sample}


# ---- setup ----

def _files_no_run_wrote(out: Path) -> list[str]:
    """The files of `out` a new run writes and would replace, not left by an earlier run there: a config.json (a
    run writes it last, with checkpoints already refused), or any of RUN_FILES in a directory no run has locked (a
    run that failed before its first checkpoint leaves its tokenizer, settings, metrics and lock, and is simply
    started again)."""
    names = RUN_FILES if not (out / RUN_LOCK_FILE).exists() else ("config.json",)
    return [name for name in names if (out / name).exists()]


def _data_no_run_wrote(out: Path) -> list[str]:
    """The corpus files (.txt, .md, .py, .jsonl, ...) below `out` that are not a run's own: the folder, once a
    run's, is no longer read as data, so a corpus above it would lose them unsaid. A log beside them (`tee
    OUT/train.log`, a scheduler's job output) is no data and stays welcome."""
    if not out.is_dir():
        return []
    own = {out / name for name in (*RUN_FILES, CHECKPOINTS, TENSORBOARD_DIR)}
    found = [path for path in tree_files(out) if not own.intersection((path, *path.parents))]
    return sorted(str(path.relative_to(out)) for path in found if corpus_kind(path) in DOC_SUFFIXES)


def _check_out(cfg: TrainConfig, out: Path, resume: bool) -> None:
    """Refuse an `out` a run must not write into: one holding checkpoints (without --resume), the model it
    starts from, its own data, a model, the user's corpus files, or files a run would overwrite."""
    if not resume and training.list_checkpoints(out / CHECKPOINTS):
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue it, or choose another --out")
    if not resume and cfg.init_from is not None and Path(cfg.init_from).resolve() == out.resolve():
        raise ValueError(f"--out {out} is the model the run starts from (init_from): its weights would be "
                         "overwritten; choose another --out")
    data = [cfg.sft.data, cfg.sft.val_data, None if Corpus(cfg.data.source).is_stdlib else cfg.data.source]
    if any(path is not None and Path(path).expanduser().resolve() == out.resolve() for path in data):
        raise ValueError(f"--out {out} is the folder of the data the run trains on: a run's directory is not read as "
                         "data, so the run would find none there; choose another --out")
    if not resume and any((out / name).exists() for name in (hf.SINGLE_FILE, hf.INDEX_FILE)):
        raise ValueError(f"{out} already holds a model; a run writes its own there: choose another --out")
    if not resume and (data := _data_no_run_wrote(out)):
        raise ValueError(f"{out} holds {', '.join(data[:3])}{', ...' if len(data) > 3 else ''}, data no run wrote, "
                         "which a corpus above it would no longer read once the folder is a run's: a run goes into "
                         "a new or empty directory (or its own, to start it again): choose another --out")
    if not resume and (foreign := _files_no_run_wrote(out)):
        raise ValueError(f"{out} holds {' and '.join(foreign)}, which a run would overwrite with its own: choose "
                         "another --out")


def setup(cfg: TrainConfig, out: Path, *, resume: bool = False, progress: bool | None = True,
          mesh: DeviceMesh | None = None, overlap: bool = True, device: torch.device | None = None,
          same_data: bool = True) -> Run:
    """Build (or, with resume, restore) every object of a run in `out` (see `train` for mesh, overlap and
    same_data).
    `progress`: bars for the minutes-long phases (the tokenizer, tokenizing), else a line as each starts and ends;
    None (the other ranks): silent.

    The model is built on the meta device, sharded (under torchrun), then materialised on `device` rank by rank:
    no process ever holds the full model, and each fills only its own rows (train.optim.init_parameters)."""
    device = torch.device("cpu") if device is None else device
    cfg = dataclasses.replace(cfg, dtype=compute_dtype(cfg.dtype, device), checkpoint=_export_dtype(cfg))
    cfg = absolute_paths(cfg)  # saved with the run: `--resume RUN_DIR` reads the same files from anywhere
    world = distributed.world_size()
    if cfg.data.batch_size % (world * cfg.data.grad_accum):
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is the global batch: it must be a multiple of the "
                         f"world size {world} times data.grad_accum={cfg.data.grad_accum}")
    check_fits(cfg, device, world)
    if mesh is not None:
        distributed.check_shardable(cfg.model, mesh["ep"].size())
    if cfg.tensorboard:
        require_tensorboard()
    set_deterministic(cfg.deterministic, device)
    seed_everything(cfg.seed)
    with distributed.main_first():  # a live run there is named before what its files say (a second run was told
        if distributed.is_main() and (out / RUN_LOCK_FILE).exists():  # to --resume); the other ranks quiet
            run_lock.hold(out)
    checkpoint = newest_checkpoint(out) if resume else None
    if checkpoint is None:  # a resumed run keeps the config it was saved with
        check_text_field(cfg)
    _check_out(cfg, out, resume)
    pretrained = cfg.init_from if checkpoint is None else None  # a resumed run continues its own checkpoint
    if pretrained is not None:
        check_same_shapes(pretrained, cfg.model)
    make_folder(out, "--out")
    with distributed.main_first():  # a refusal is one line from rank 0, the other ranks quiet
        if distributed.is_main():
            run_lock.hold(out)  # before anything is written there
    distributed.check_shared_directory(out)
    with distributed.main_first():  # rank 0 trains the tokenizer and tokenizes the corpus; the others reuse both
        tokenizer = build_tokenizer(cfg, out, reuse=resume or not distributed.is_main(), progress=progress)
        cfg = dataclasses.replace(cfg, model=cfg.model.replace(
            bos_token_id=tokenizer.bos_id, eos_token_id=run_eos_ids(cfg, tokenizer), pad_token_id=tokenizer.pad_id,
            vocab_size=max(cfg.model.vocab_size, tokenizer.vocab_size)))  # SFT may add the chat markers
        if checkpoint is not None:  # the model as the run saved it: its tokenizer's ids and size (SFT's markers)
            check_resumable(cfg, saved_train_config(checkpoint))
        train_set, val_set = build_datasets(cfg, tokenizer, progress)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    distributed.parallelize(model, mesh, bf16=cfg.dtype == "bfloat16", overlap=overlap,
                         activation_checkpointing=cfg.activation_checkpointing)
    model.to_empty(device=device)
    scale = init_parameters(model, cfg.scaling, cfg.seed)
    if pretrained is not None:
        load_pretrained(model, pretrained)  # each rank its own rows; new vocabulary rows: the mean row
    m = cfg.model
    controller = BudgetController(cfg.budget, m.num_layers, m.n_routed_experts, m.moe_topk, cfg.ffn_expert_target,
                                  device) if cfg.budget.enabled and m.zero_expert_num else None
    run = Run(cfg, out, tokenizer, model, build_optimizer(model, cfg.optim, scale), controller,
              ResumableSampler(train_set, cfg.seed, rank=distributed.rank(), world_size=distributed.world_size()), val_set,
              TrainState(), mesh, device)
    if checkpoint is not None:
        run.resume_note = load_checkpoint(run, checkpoint, same_data)  # a refused resume leaves the run as it was
        if run.state.step > cfg.max_steps:
            raise ValueError(f"{out}'s checkpoint is at step {run.state.step}, past max_steps={cfg.max_steps}: resume "
                             f"with --max-steps of at least {run.state.step}")
    if distributed.is_main():
        (out / RUN_CONFIG_FILE).write_text(cfg.to_json())
        if pretrained is not None:
            copy_generation_config(Path(pretrained), out, cfg)
    return run


def _export_dtype(cfg: TrainConfig) -> CheckpointConfig:
    """checkpoint.export_dtype resolved (auto: the dtype init_from stores its weights in, else float32), and saved
    so: a resumed run exports as it would have."""
    if cfg.checkpoint.export_dtype != "auto":
        return cfg.checkpoint
    source = Path(cfg.init_from) if cfg.init_from is not None else None
    stored = stored_dtype(source) if source is not None and source.is_dir() else torch.float32  # resumed: gone
    return dataclasses.replace(cfg.checkpoint, export_dtype=str(stored).removeprefix("torch."))




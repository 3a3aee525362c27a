"""TrainConfig: every knob of a training run as nested frozen dataclasses, and recipes as functions; the typed
`--set section.field=value` overrides are train/overrides.py.

The model shape is a section too (`model`, a ModelConfig), so `--set model.num_layers=2` works like any other
field. Every invalid value fails here, naming the field, before any data is read.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..checkpoint import training
from ..checkpoint.hf import checkpoint_config, model_directory
from ..config import ModelConfig
from ..data.corpus import STDLIB
from ..data.dataset_folders import RUN_CONFIG_FILE
from ..presets import get_preset
from ..tokenizer import TRAINED_VOCAB_MIN
from .overrides import apply_overrides, build, coerce, override_keys, parse_text, type_name
from .unread_fields import unread_fields

# The run-directory layout shared by the trainer and `longcat grow` (see trainer.py; its config file and lock are
# named in data/dataset_folders.py, which skips the directories that hold them).
CHECKPOINTS = "checkpoints"
SHARDED = "sharded"  # a checkpoint's subdirectory of sharded model weights and Adam moments


def _check(ok: bool, section: str, name: str, value: Any, allowed: str) -> None:
    """A ValueError naming the field as --set spells it (TrainConfig's own fields have no section prefix)."""
    if not ok:
        key = name if section == TrainConfig.section else f"{section}.{name}"
        raise ValueError(f"{key} must be {allowed}, got {value!r}")


def _check_types(obj: Any) -> None:
    """Every field of a config section holds its annotated type (a Literal field one of its values), however the
    section was built: by --set or from_dict (which coerce first), by hand or with dataclasses.replace (which did
    not, so `dtype="bf16"` trained in fp32 and saved a config no resume could read)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        key = f.name if obj.section == TrainConfig.section else f"{obj.section}.{f.name}"
        if dataclasses.is_dataclass(hint):
            _check(isinstance(value, hint), obj.section, f.name, value, hint.__name__)
            continue
        coerced = coerce(value, hint, key)
        widened = type(coerced) is float and type(value) is int  # an int where a float goes is that float
        if coerced != value or (type(coerced) is not type(value) and not widened):
            raise ValueError(f"{key} must be {type_name(hint)}, got {value!r}")


def _positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(not number or math.isfinite(value), obj.section, name, value, "a finite number")
        ok = number and (value >= 0 if allow_zero else value > 0)
        _check(ok, obj.section, name, value, ">= 0" if allow_zero else "> 0")


def _named(obj: Any, *names: str) -> None:
    """Path and name fields hold something when set: an empty --data was the current directory's files."""
    for name in names:
        value = getattr(obj, name)
        _check(value is None or value.strip() != "", obj.section, name, value, "a non-empty path or name")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW. eps defaults to the report's 1e-16: far below any gradient RMS, so it never damps the update."""

    section: ClassVar[str] = "optim"
    lr: float = 2e-3  # peak LR of the hidden matrices at the proxy width (see scaling)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-16
    weight_decay: float = 0.1  # matrices only; embeddings, norms and biases are never decayed
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "lr", "eps")
        _positive(self, "weight_decay", "grad_clip", allow_zero=True)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), self.section, "betas", self.betas,
               "two numbers in [0, 1)")


@dataclass(frozen=True)
class ScheduleConfig:
    """LR multiplier over steps: linear warmup, then cosine to min_lr_ratio, or WSD (warmup-stable-decay)."""

    section: ClassVar[str] = "schedule"
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays linearly to min_lr_ratio

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "warmup_steps", allow_zero=True)
        _check(0 <= self.min_lr_ratio <= 1, self.section, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _check(0 < self.decay_fraction <= 1, self.section, "decay_fraction", self.decay_fraction, "in (0, 1]")


@dataclass(frozen=True)
class BudgetConfig:
    """The expert-bias controller's settings (report §2.1.1; the update rule: train/budget.py BudgetController)."""

    section: ClassVar[str] = "budget"
    enabled: bool = True
    mode: Literal["pid", "sign"] = "pid"
    target: float | None = None  # K_e, FFN experts per token; None = 2/3 of moe_topk (the report's 8 of 12)
    rate: float = 1.0  # μ at step 0
    kp: float = 1.0  # the report's rule is kp=1, ki=kd=0
    ki: float = 0.0
    kd: float = 0.0
    integral_limit: float = 0.5  # anti-windup: |Σe_i| is clamped here
    decay_every: int = 100  # μ is multiplied by decay_factor every decay_every steps ...
    decay_factor: float = 0.5
    min_rate_ratio: float = 0.1  # ... but never below min_rate_ratio * rate

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "rate", "decay_every", "decay_factor", "integral_limit")
        _positive(self, "kp", "ki", "kd", allow_zero=True)
        _check(self.decay_factor <= 1, self.section, "decay_factor", self.decay_factor, "in (0, 1]")
        _check(0 <= self.min_rate_ratio <= 1, self.section, "min_rate_ratio", self.min_rate_ratio, "in [0, 1]")
        gains = (self.kp, self.ki, self.kd)
        if self.mode == "sign" and gains != (1.0, 0.0, 0.0):
            raise ValueError(f"budget.mode=sign steps by rate * sign(error) and reads no gains, but kp, ki, kd = "
                             f"{gains}; leave them at 1, 0, 0 or use mode=pid")
        if self.enabled and self.mode == "pid" and gains == (0.0, 0.0, 0.0):
            raise ValueError("budget: kp = ki = kd = 0 would never move the biases; set budget.enabled=false")


@dataclass(frozen=True)
class LossConfig:
    """loss = lm + mtp_weight*mtp + z_weight*z + balance_alpha*balance (report §2.1.2, §3.1.3, docs/budget_pid.md)."""

    section: ClassVar[str] = "loss"
    balance_alpha: float = 5e-4  # α of the device-level balance loss (mean over layers); keeps R_g < ~0.1
    balance_groups: int = 4  # D: FFN experts form D groups; the zero experts are group D+1
    z_weight: float = 1e-6  # λ of the hidden z-loss on the last hidden state before the final norm
    mtp_weight: float = 0.3
    mtp_start_step: int = 0  # steps done before the MTP head trains: with N, it first trains at logged step N + 1
    monitor_every: int = 25  # router-gradient ratio R_g and router cosine similarity every N steps; 0 = never
    logits_chunk: int = 8192  # tokens per chunk of the LM / MTP cross-entropy: the most (tokens, V) logits held
    # at once (recomputed in backward); 0 = the whole micro-batch in one piece

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "balance_alpha", "z_weight", "mtp_weight", "mtp_start_step", "monitor_every",
                  "logits_chunk", allow_zero=True)
        _positive(self, "balance_groups")


@dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and batching. batch_size sequences of seq_len tokens make one optimizer step."""

    section: ClassVar[str] = "data"
    source: str = "stdlib"  # "stdlib", a directory, a quoted glob, a text file, a .jsonl or a .parquet
    text_field: str = "text"  # the field read from .jsonl / .parquet
    max_bytes: int | None = None  # cap on corpus bytes tokenized
    seq_len: int = 256
    batch_size: int = 8
    # micro-batches per step; batch_size must be a multiple of it. The balance loss counts each micro-batch's
    # expert choices, so it is (slightly) another optimisation than one micro-batch (docs/expert_parallel.md)
    grad_accum: int = 1
    val_fraction: float = 0.01  # the last fraction of the token stream is held out
    val_batches: int = 4
    # share of the training windows that are runs of random tokens given twice (data/copying.py): teaches a small
    # model to copy from its context, which tool calls need; the validation split stays the corpus alone
    copy_fraction: float = 0.0
    tokenizer: str | None = None  # a tokenizer.json (or a directory holding one); None trains a byte-level BPE
    tokenizer_sample_bytes: int = 8_000_000  # corpus bytes the BPE is trained on
    cache_dir: str | None = None  # token shards, tokenized SFT rows; None = $XDG_CACHE_HOME/longcat-flash/tokens

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "seq_len", "batch_size", "grad_accum", "val_batches", "tokenizer_sample_bytes")
        _named(self, "source", "text_field", "tokenizer", "cache_dir")
        if self.max_bytes is not None:
            _positive(self, "max_bytes")
        _check(0 < self.val_fraction < 1, self.section, "val_fraction", self.val_fraction, "in (0, 1)")
        _check(0 <= self.copy_fraction < 1, self.section, "copy_fraction", self.copy_fraction, "in [0, 1)")
        _check(self.batch_size % self.grad_accum == 0, self.section, "batch_size", self.batch_size,
               f"a multiple of data.grad_accum={self.grad_accum}")


@dataclass(frozen=True)
class ScalingConfig:
    """Initialisation and width transfer (report §2.3, §3.1.1; train/optim.py).

    proxy_width: the hidden size the LRs and init_std were tuned at. With s = hidden_size / proxy_width,
    hidden and unembedding matrices get LR / s and init variance / s; embeddings and norms keep theirs.
    variance_alignment: "preset" keeps the model config; "on" sets the MLA scales and γ = routed_scaling_factor
    = ffn_hidden_size / expert_ffn_hidden_size (the granularity m); "off" removes both (an ablation).
    """

    section: ClassVar[str] = "scaling"
    proxy_width: int | None = None  # None: no transfer (s = 1)
    init_std: float | None = None  # None: model.initializer_range
    variance_alignment: Literal["preset", "on", "off"] = "preset"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.proxy_width is not None:
            _positive(self, "proxy_width")
        if self.init_std is not None:
            _positive(self, "init_std")


@dataclass(frozen=True)
class CheckpointConfig:
    section: ClassVar[str] = "checkpoint"
    save_every: int = 100  # steps between training checkpoints (the last step is always saved)
    keep: int = 2  # newest checkpoints kept in OUT/checkpoints
    # the dtype of the model written to OUT at the end (training keeps fp32 weights); auto: init_from's, else fp32
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "save_every", "keep")


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on conversations (`longcat sft`, docs/sft.md). `data` set makes the run an SFT run:
    rows of OpenAI `messages` (+ `tools`) rendered with the tokenizer's chat template, loss on assistant tokens
    only, conversations packed into data.seq_len + 1 token windows with no attention across them."""

    section: ClassVar[str] = "sft"
    data: str | None = None  # .jsonl, .json (or .gz), .parquet, .arrow or a directory of them; None = pre-training
    val_data: str | None = None  # held-out conversations; None = a data.val_fraction share of `data`
    overlong: Literal["truncate", "skip"] = "truncate"  # conversations longer than data.seq_len + 1 tokens
    ignore_columns: tuple[str, ...] = ()  # row fields that are not part of a conversation (e.g. id,source): skipped

    def __post_init__(self) -> None:
        _check_types(self)
        _named(self, "data", "val_data")
        _check(self.val_data is None or self.data is not None, self.section, "val_data", self.val_data,
               "unset unless sft.data is set")
        _check(self.val_data is None or _resolved(self.val_data) != _resolved(self.data), self.section, "val_data",
               self.val_data, "other conversations than sft.data (held out, not trained on)")


def aligned_model_config(cfg: ModelConfig, mode: str) -> ModelConfig:
    """`scaling.variance_alignment`: keep the preset, or switch the MLA scales and the expert γ on or off.

    "on" sets γ = routed_scaling_factor = m, the expert granularity ffn_hidden_size / expert_ffn_hidden_size:
    splitting an FFN into m experts shrinks the MoE output variance by m twice (gating dilution and width), and
    γ = sqrt(m·m) = m restores it (report §2.3.2).
    """
    if mode == "preset":
        return cfg
    on = mode == "on"
    gamma = cfg.ffn_hidden_size / cfg.expert_ffn_hidden_size if on else 1.0
    return cfg.replace(mla_scale_q_lora=on, mla_scale_kv_lora=on, routed_scaling_factor=gamma)


@dataclass(frozen=True)
class TrainConfig:
    """A whole run. Build one with `recipe(preset)`, then `apply_overrides(cfg, ["a.b=value", ...])`; or, as the
    CLI does, with `build_config(preset, overrides)`, which starts the model from init_from's config.json (a recipe's
    model given init_from keeps the recipe's non-shape fields: the run's header names what differs)."""

    section: ClassVar[str] = "train"
    preset: str = "small"  # where `model` came from (informational)
    model: ModelConfig = field(default_factory=lambda: get_preset("small"))
    init_from: str | None = None  # an HF model directory whose weights and tokenizer start the run (its config.json
    # is the model; model.* overrides may change anything but a weight shape)
    seed: int = 0
    max_steps: int = 300
    eval_every: int = 50  # validation loss every N steps (and at the end); 0 = only at the end
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast compute dtype; weights and Adam stay fp32.
    # auto: bfloat16 where the device has fast bf16 matmuls (a GPU, an AVX-512 / AMX CPU), else float32; a run
    # saves the dtype it resolved to, so that --resume computes as it started
    deterministic: bool = True  # torch.use_deterministic_algorithms: same seed -> bitwise identical losses
    max_consecutive_skips: int = 5  # steps with a non-finite loss or gradient in a row before the run stops
    tensorboard: bool = False  # also write OUT/tensorboard (needs the tensorboard package)
    activation_checkpointing: bool = False  # recompute each layer in backward: activations of one layer at a time
    sample_prompt: str = "def "
    sample_tokens: int = 96
    sample_temperature: float = 0.8  # 0 = greedy
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        _check_types(self)
        # the model a run builds, so that --print-config, the resume check and the saved config all show it
        object.__setattr__(self, "model", aligned_model_config(self.model, self.scaling.variance_alignment))
        _positive(self, "max_steps", "max_consecutive_skips")
        _named(self, "init_from")
        _positive(self, "seed", "eval_every", "sample_tokens", "sample_temperature", allow_zero=True)
        _check(self.seed < 2**63, self.section, "seed", self.seed, "in [0, 2^63) (torch's generators take an int64)")
        m = self.model
        _check(self.data.seq_len <= m.max_position_embeddings, "data", "seq_len", self.data.seq_len,
               f"<= model.max_position_embeddings={m.max_position_embeddings} (inputs sit at positions 0..seq_len-1)")
        _check(m.n_routed_experts % self.loss.balance_groups == 0, "loss", "balance_groups",
               self.loss.balance_groups, f"a divisor of model.n_routed_experts={m.n_routed_experts}")
        if self.budget.target is not None:
            ok = 0 < self.budget.target < m.moe_topk if m.zero_expert_num else self.budget.target == m.moe_topk
            _check(ok, "budget", "target", self.budget.target,
                   f"in (0, model.moe_topk={m.moe_topk}) with zero experts, == moe_topk without")
        if self.ffn_expert_target > m.most_ffn_experts:
            raise ValueError(f"budget.target: K_e={self.ffn_expert_target:g} FFN experts per token cannot be reached: "
                             f"a token picks at most model.n_routed_experts={m.n_routed_experts} of them (set "
                             f"budget.target <= {m.most_ffn_experts}, or more FFN experts)")
        if self.ffn_expert_target < m.fewest_ffn_experts:
            raise ValueError(f"budget.target: K_e={self.ffn_expert_target:g} FFN experts per token "
                             f"{'(the default, 2/3 of moe_topk) ' if self.budget.target is None else ''}cannot be "
                             f"reached: a token picks at least model.moe_topk - model.zero_expert_num = "
                             f"{m.fewest_ffn_experts} (set budget.target >= {m.fewest_ffn_experts}, or more zero "
                             "experts)")
        trains_tokenizer = self.data.tokenizer is None and self.init_from is None
        _check(not trains_tokenizer or m.vocab_size >= TRAINED_VOCAB_MIN, "model", "vocab_size", m.vocab_size,
               f">= {TRAINED_VOCAB_MIN} when the run trains its tokenizer (every byte, the special tokens and the "
               "tool-call tags are tokens)")
        _check(self.loss.mtp_weight == 0 or m.num_nextn_predict_layers == 1, "loss", "mtp_weight",
               self.loss.mtp_weight, "0 for a model without an MTP head (model.num_nextn_predict_layers=0)")
        _check(self.loss.mtp_weight == 0 or self.data.seq_len >= 2, "data", "seq_len", self.data.seq_len,
               ">= 2 while the MTP head trains (it predicts two tokens ahead; or set loss.mtp_weight=0)")

    @property
    def ffn_expert_target(self) -> float:
        """K_e: the budget controller's and the balance loss's expected FFN experts per token."""
        return self.model.default_ffn_expert_target if self.budget.target is None else float(self.budget.target)

    # ---- serialisation (OUT/train_config.json, checkpoints) ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        return build(cls, raw, "")

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def settings(cfg: TrainConfig, omit: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every settable key (`section.field`, as --set names it) with its current value, but the sections named in
    `omit`."""
    found: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                found[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return {key: value for key, value in found.items() if key.partition(".")[0] not in omit}


def describe(cfg: TrainConfig, omit: tuple[str, ...] = ()) -> str:
    """Every settable key with its current value, one per line (`longcat train --print-config`), but the sections
    named in `omit`."""
    return "\n".join(f"{key}={value!r}" for key, value in settings(cfg, omit).items())


# ---- recipes: one function per preset ----

def small() -> TrainConfig:
    """The default run: `longcat train --preset small` (its time on 2 cores, with and without AMX: README)."""
    return TrainConfig(preset="small", model=get_preset("small"))


def tiny() -> TrainConfig:
    """Seconds per run, for tests: the tiny model, 64-token windows."""
    base = TrainConfig(preset="tiny", model=get_preset("tiny"), max_steps=40,
                       eval_every=10, sample_tokens=16)
    return dataclasses.replace(
        base, schedule=ScheduleConfig(warmup_steps=5), checkpoint=CheckpointConfig(save_every=10),
        data=DataConfig(seq_len=64, batch_size=4, val_fraction=0.05, val_batches=2,
                        tokenizer_sample_bytes=1_000_000),
        budget=BudgetConfig(decay_every=20))


def sft() -> TrainConfig:
    """`longcat sft`: the model comes from init_from (its config.json); conversations packed into 2048-token
    windows (one with a few tool schemas is ~650 tokens: three fit), a lower peak LR than pre-training, a short
    warmup (docs/sft.md)."""
    base = TrainConfig(preset="sft", max_steps=300, eval_every=50, sample_prompt="Hi! What is 12 times 3?",
                       sample_tokens=48, sample_temperature=0.0)
    return dataclasses.replace(base, optim=OptimConfig(lr=1e-3), schedule=ScheduleConfig(warmup_steps=10),
                               data=DataConfig(seq_len=2048, batch_size=2, val_fraction=0.05, val_batches=8))


def bench() -> TrainConfig:
    """The ~1B `bench` shape; far too slow for 2 CPU cores, meant for a GPU."""
    return TrainConfig(preset="bench", model=get_preset("bench"), data=DataConfig(batch_size=16))


RECIPES: dict[str, Callable[[], TrainConfig]] = {"tiny": tiny, "small": small, "bench": bench, "sft": sft}


def recipe(preset: str) -> TrainConfig:
    if preset not in RECIPES:
        raise ValueError(f"no training recipe for preset {preset!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[preset]()


ALIGNED_FIELDS = ("model.mla_scale_q_lora", "model.mla_scale_kv_lora", "model.routed_scaling_factor")


def build_config(preset: str | None, overrides: Sequence[str], saved: TrainConfig | None = None) -> TrainConfig:
    """The run's config: a preset's recipe (default small) or, when resuming, the saved config; then overrides.
    A model field that scaling.variance_alignment sets is refused beside it (the alignment would overwrite it)."""
    cfg = _overridden(preset, overrides, saved)
    unread_by = unread_fields(cfg)
    if unread := sorted(set().union(*map(override_keys, overrides)) & unread_by.keys()):
        raise ValueError(f"{unread[0]} is not read by {unread_by[unread[0]]}; drop it (it would be recorded, and do "
                         "nothing)")
    alignment = cfg.scaling.variance_alignment
    if alignment != "preset" and (set_too := [k for k in ALIGNED_FIELDS if _last_value(overrides, k) is not None]):
        raise ValueError(f"scaling.variance_alignment={alignment} sets {', '.join(ALIGNED_FIELDS)}; --set "
                         f"{set_too[0]} contradicts or repeats it: give one of them (variance_alignment=preset keeps "
                         "the model's own values)")
    return cfg


def check_resumable(cfg: TrainConfig, saved: TrainConfig) -> None:
    """Refuse a config that a run resumed from a checkpoint saved with `saved` cannot honour: it keeps its model,
    initialisation and width transfer, tokenizer, data windows, train/val split and seed, has no budget controller
    if it had none, and goes on from its own checkpoint, not init_from. The
    CLI's overrides and `train(cfg, resume=...)`'s config alike (the API took any config and changed the model
    mid-run)."""
    changed = [f"model.{f.name}" for f in dataclasses.fields(cfg.model)
               if getattr(cfg.model, f.name) != getattr(saved.model, f.name)]
    if changed and cfg.scaling.variance_alignment != saved.scaling.variance_alignment:  # said by the field set
        raise ValueError(f"a resumed run keeps its model, but scaling.variance_alignment="
                         f"{cfg.scaling.variance_alignment} changes {', '.join(changed)}: start a run with init_from "
                         "to train with another alignment")
    if changed:
        grow = "; `longcat grow` deepens a trained model" if "model.num_layers" in changed else ""
        raise ValueError(f"a resumed run keeps its model, but the config changes {', '.join(changed)}: start a new "
                         f"run from this one's checkpoint to change it (longcat train --set init_from=RUN, longcat "
                         f"sft --model RUN){grow}")
    if _resolved(cfg.init_from) != _resolved(saved.init_from):  # the run goes on from its own checkpoint
        raise ValueError(f"a resumed run continues from its own checkpoint: init_from={cfg.init_from!r} would "
                         f"be recorded but not read (start a new run with init_from to begin from another model)")
    if cfg.data.seq_len != saved.data.seq_len:  # the sampler's position counts windows of seq_len + 1 tokens
        raise ValueError(f"a resumed run keeps its data windows: data.seq_len={cfg.data.seq_len} differs from the "
                         f"run's {saved.data.seq_len} (start a run with init_from to train at another length)")
    # which windows are held out, so which are trained (sft.val_data holds them out instead)
    if cfg.data.val_fraction != saved.data.val_fraction and cfg.sft.val_data is None:
        raise ValueError(f"a resumed run keeps its train/val split: data.val_fraction={cfg.data.val_fraction} "
                         f"differs from the run's {saved.data.val_fraction}")
    tokenizing = ["data.tokenizer"] * (_resolved(cfg.data.tokenizer) != _resolved(saved.data.tokenizer))
    tokenizing += ["data.tokenizer_sample_bytes"] * (cfg.data.tokenizer_sample_bytes
                                                      != saved.data.tokenizer_sample_bytes)
    if tokenizing:  # the run reads its own tokenizer.json, which its token ids and embeddings are of
        raise ValueError(f"a resumed run keeps its tokenizer (the run's tokenizer.json), but the config changes "
                         f"{', '.join(tokenizing)}: it would be recorded and not used")
    if initialisation := [f"scaling.{name}" for name in ("init_std", "proxy_width")
                          if getattr(cfg.scaling, name) != getattr(saved.scaling, name)]:
        raise ValueError(f"a resumed run keeps its initialisation and width transfer, but the config changes "
                         f"{', '.join(initialisation)} (init_std is read once, to initialise; proxy_width sets the "
                         "hidden and unembedding matrices' LRs): start a run with init_from to change them")
    if cfg.budget.enabled and not saved.budget.enabled and cfg.model.zero_expert_num:
        raise ValueError("a resumed run cannot turn the budget controller on: budget.enabled=true, but the run "
                         "trained without it (its checkpoints hold no controller state); start a run with init_from "
                         "to train with it")
    if cfg.seed != saved.seed:  # the order the windows are drawn in, which the checkpoint is part way through
        raise ValueError(f"a resumed run keeps its seed: seed={cfg.seed} differs from the run's {saved.seed} (the "
                         "data order follows it)")


def _overridden(preset: str | None, overrides: Sequence[str], saved: TrainConfig | None) -> TrainConfig:
    if _last_value(overrides, "preset") is not None:
        raise ValueError("preset is chosen with --preset, which picks the whole recipe; --set preset=... would only "
                         "rename the run")
    if saved is not None and preset is not None and preset != saved.preset:
        raise ValueError(f"--preset {preset} differs from the resumed run's preset {saved.preset!r}; "
                         f"a resumed run keeps its model (use `longcat grow` to change its depth)")
    if saved is not None:
        cfg = apply_overrides(saved, overrides)
        check_resumable(cfg, saved)
        return cfg
    base = recipe(preset or "small")
    raw = _last_value(overrides, "init_from")
    init_from = None if raw is None else parse_text(raw)  # as apply_overrides reads it (null in any case: None)
    if init_from is not None:  # the model is the checkpoint's, then the overrides (checked together)
        model = pretrained_model_config(str(init_from))
        loss = base.loss if model.num_nextn_predict_layers else dataclasses.replace(base.loss, mtp_weight=0.0)
        start = dataclasses.replace(base, data=dataclasses.replace(base.data, seq_len=2), loss=loss)
        context = apply_overrides(start, overrides, model).model.max_position_embeddings  # as the overrides leave it
        # the recipe's windows, at most the model's context before the overrides and after them
        windows = min(base.data.seq_len, model.max_position_embeddings, context)
        cfg = apply_overrides(dataclasses.replace(start, data=dataclasses.replace(base.data, seq_len=windows)),
                              overrides, model)
        if all(_last_value(overrides, k) is None for k in ("data.seq_len", "data")):  # a longer context holds more
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=min(base.data.seq_len,
                                                                                         context)))
        return cfg
    return apply_overrides(base, overrides)


def _resolved(path: str | None) -> str | None:
    """A path as a run saves it (absolute_paths), to compare with a saved one: `~` expanded, then resolved."""
    return None if path is None else str(Path(path).expanduser().resolve())


def _last_value(assignments: Sequence[str], key: str) -> str | None:
    values = [raw.strip() for k, sep, raw in (a.partition("=") for a in assignments) if sep and k.strip() == key]
    return values[-1] if values else None


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its file and directory fields (corpus, tokenizer, token cache, conversations, init_from) made
    absolute, as a run saves it: a relative path would resolve against whatever directory `--resume` runs in."""
    source = cfg.data.source if cfg.data.source == STDLIB else _resolved(cfg.data.source)
    data = dataclasses.replace(cfg.data, source=source, tokenizer=_resolved(cfg.data.tokenizer),
                               cache_dir=_resolved(cfg.data.cache_dir))
    sft = dataclasses.replace(cfg.sft, data=_resolved(cfg.sft.data), val_data=_resolved(cfg.sft.val_data))
    return dataclasses.replace(cfg, data=data, sft=sft, init_from=_resolved(cfg.init_from))


def pretrained_model_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of an HF model directory (`init_from`), with a clear error when it is not one, or when it is
    a run whose model is older than its newest checkpoint (resumed and stopped before it finished)."""
    path = Path(directory).expanduser()  # `--set init_from=~/base`: no shell expands a ~ after the `=`
    unfinished = _unfinished_run(path)
    try:  # a setting: rank 0 says it
        model_directory(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"init_from={directory}: {err}") from None
    if unfinished:
        raise ValueError(f"init_from={directory}: the run there has not finished ({unfinished}), so its model "
                         "files are an earlier finish's, not its newest weights: resume it to the end first")
    dropout = json.loads((path / "config.json").read_text()).get("attention_dropout")
    if dropout not in (None, 0, 0.0):  # inference has none either, but there it changes nothing
        raise ValueError(f"init_from={directory}: config.json asks for attention_dropout={dropout!r}, which training "
                         "here does not apply (no attention dropout); set it to 0.0 to train without it")
    return checkpoint_config(path)


def _unfinished_run(path: Path) -> str | None:
    """For a training run's directory whose newest checkpoint is short of its max_steps (killed, or grown and not
    yet resumed): its newest step and max_steps, said; else None."""
    saved, recorded = training.latest_checkpoint(path / CHECKPOINTS), path / RUN_CONFIG_FILE
    if saved is None or not recorded.is_file():
        return None
    try:
        max_steps = json.loads(recorded.read_text())["max_steps"]
        step = int(saved.name.removeprefix(training.STEP_PREFIX))
    except (ValueError, KeyError, TypeError):
        return None
    if type(max_steps) is not int or step >= max_steps:  # unreadable (edited by hand), or finished
        return None
    return f"its newest checkpoint is at step {step} of {max_steps}"

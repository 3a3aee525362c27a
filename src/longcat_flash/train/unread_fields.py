"""The settings a run never reads, each with what makes it so: given as overrides, build_config refuses them by
name (train/config.py), rather than recording a value that does nothing."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..data.corpus import STDLIB

if TYPE_CHECKING:
    from .config import BudgetConfig, TrainConfig


def _is_sft(cfg: TrainConfig) -> bool:
    """An SFT run: conversations given, or the sft recipe (`longcat sft --print-config` before any data)."""
    return cfg.sft.data is not None or cfg.preset == "sft"


def unread_fields(cfg: TrainConfig) -> dict[str, str]:
    """The fields the run never reads, each with what makes it so: the token ids (the tokenizer's are the run's;
    a run from init_from keeps more eos ids, a chat template's end of turn), the budget controller's when it is off,
    the WSD decay's share under another schedule, the tokenizer sample when no tokenizer is trained; the corpus's
    and its token cache's under SFT (the corpus too when the tokenizer comes from a file or init_from), the held-out
    share when sft.val_data holds the held-out conversations, the conversations' handling in pre-training, the
    text field of the stdlib corpus, the MTP loss's start when it has no weight, the minimum LR of a constant
    schedule, the initialisation of a model loaded from init_from, the zero experts' kind without zero experts, the
    sample's temperature without a sample."""
    overwritten = ("bos_token_id", "pad_token_id", *(("eos_token_id",) if cfg.init_from is None else ()))
    unread = dict.fromkeys((f"model.{name}" for name in overwritten), "a run: its tokenizer's ids are the model's "
                           "(data.tokenizer's, or the one trained on the corpus; from init_from, more eos ids may be "
                           "added to its tokenizer's)")
    if not cfg.model.zero_expert_num or not cfg.budget.enabled:  # trainer.py builds no controller then
        off = ("a model without zero experts (model.zero_expert_num=0): no expert bias to control"
               if not cfg.model.zero_expert_num else "a run with budget.enabled=false")
        kept = {"target"} | ({"enabled"} if cfg.model.zero_expert_num else set())  # target: K_e, the balance loss's too
        unread.update(dict.fromkeys((f"budget.{f.name}" for f in dataclasses.fields(cfg.budget) if f.name not in kept),
                                    off))
    else:
        unread.update(_unread_budget_fields(cfg.budget))
    if cfg.schedule.kind != "wsd":
        unread["schedule.decay_fraction"] = f"schedule.kind={cfg.schedule.kind} (only wsd decays over a last share)"
    if cfg.schedule.kind == "constant":
        unread["schedule.min_lr_ratio"] = "schedule.kind=constant (it never decays to a minimum)"
    if cfg.init_from is not None:
        loaded = "a run from init_from (its weights are loaded, not drawn; new vocabulary rows take the mean row)"
        unread.update(dict.fromkeys(("scaling.init_std", "model.initializer_range"), loaded))
    if not cfg.model.zero_expert_num:
        unread["model.zero_expert_type"] = "a model without zero experts (model.zero_expert_num=0)"
    if cfg.sample_tokens == 0:
        unread["sample_temperature"] = "a run with sample_tokens=0 (it writes no sample)"
    if cfg.loss.mtp_weight == 0:
        unread["loss.mtp_start_step"] = "a run with loss.mtp_weight=0 (the MTP head never trains)"
    if cfg.data.source == STDLIB:
        unread["data.text_field"] = "the stdlib corpus (Python files, not records with a text field)"
    trains_tokenizer = cfg.data.tokenizer is None and cfg.init_from is None
    if not trains_tokenizer:
        unread["data.tokenizer_sample_bytes"] = "a run whose tokenizer comes from data.tokenizer or init_from"
    if not _is_sft(cfg):
        return {**unread, **dict.fromkeys(("sft.overlong", "sft.ignore_columns"), "pre-training (sft.data is unset)")}
    corpus = ("data.source", "data.text_field", "data.tokenizer_sample_bytes")
    unread.update(dict.fromkeys(("data.max_bytes", *(() if trains_tokenizer else corpus)), "an SFT run"))
    if cfg.sft.val_data is not None:
        unread["data.val_fraction"] = "an SFT run given --val-data (sft.val_data: the held-out conversations)"
    return unread


def _unread_budget_fields(budget: BudgetConfig) -> dict[str, str]:
    """The running controller's settings its update rule never reads: the rate's decay schedule when it does not
    decay. (The integral's clamp is read without an integral term: the integral is kept, and checkpointed, for a
    resume that sets budget.ki.)"""
    if budget.decay_factor != 1:
        return {}
    return dict.fromkeys(("budget.decay_every", "budget.min_rate_ratio"), "budget.decay_factor=1 (the rate never "
                         "decays)")

"""The notes a run's header adds when its settings will not do what they seem to: an MTP head that never trains,
a YaRN factor left from an earlier context, a YaRN stage counted from the wrong original length."""
from __future__ import annotations

import math
from pathlib import Path

from ..checkpoint import hf
from ..config import ModelConfig
from .config import TrainConfig


def idle_mtp_note(cfg: TrainConfig) -> str:
    """A head the run never trains is still written to OUT (its config says it has one): say so, since drafts from
    random weights make `--speculative` slower, never wrong."""
    if not cfg.model.num_nextn_predict_layers:
        return ""
    if cfg.loss.mtp_weight == 0:
        why = "loss.mtp_weight=0"
    elif cfg.loss.mtp_start_step >= cfg.max_steps:
        why = f"loss.mtp_start_step={cfg.loss.mtp_start_step} >= max_steps={cfg.max_steps}"
    else:
        return ""
    return (f"\nnote: the MTP head does not train in this run ({why}): it is saved as the run starts it (random, "
            "unless init_from's was trained), and speculative decoding drafts from it poorly (or set "
            "model.num_nextn_predict_layers=0)")


def yarn_note(m: ModelConfig) -> str:
    """YaRN interpolates for factor x original positions: a factor that does not give max_position_embeddings is
    most often a stale one (the context raised, the factor left), which transformers warns of on loading too."""
    rope = m.rope_scaling
    if rope.rope_type != "yarn" or rope.original_max_position_embeddings is None:
        return ""
    implied = m.max_position_embeddings / rope.original_max_position_embeddings
    if math.isclose(rope.factor, implied):
        return ""
    return (f"\nnote: model.rope_scaling.factor={rope.factor:g} interpolates for {rope.factor:g} x "
            f"{rope.original_max_position_embeddings} positions, but max_position_embeddings="
            f"{m.max_position_embeddings} is {implied:g} x (a factor left from an earlier context?)")


def yarn_restage_note(cfg: TrainConfig) -> str:
    """A second YaRN stage (the report's 32k, then 128k) keeps the length before the first one and raises the
    factor: counted from the first stage's context instead, it interpolates no further than that stage did, and
    moves the frequencies the model was trained at."""
    before, now = hf.checkpoint_config(Path(cfg.init_from)).rope_scaling, cfg.model.rope_scaling
    restaged = before.rope_type == now.rope_type == "yarn"
    if not restaged or now.original_max_position_embeddings == before.original_max_position_embeddings:
        return ""
    first = before.original_max_position_embeddings
    return (f"\nnote: init_from was extended with YaRN from {first} positions (factor {before.factor:g}); this run "
            f"counts from original_max_position_embeddings={now.original_max_position_embeddings}. A further YaRN "
            f"stage keeps {first} and raises the factor (to {cfg.model.max_position_embeddings / first:g} here); "
            "else it interpolates no further than the first stage did")

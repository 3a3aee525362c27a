"""Starting a run from an HF model directory (`init_from`): check that the run's model has the checkpoint's weight
shapes, then fill each rank's rows of every weight from the official-layout safetensors.

The model is built on the meta device, sharded and materialised first (trainer.setup), exactly as for a fresh
run; loading then reads one checkpoint tensor at a time and copies only the rows this process holds (FSDP and
expert shards), so no rank ever holds the whole model. The vocabulary may grow (`longcat sft` adding the chat
markers to a tokenizer that lacks them): the new rows of the embeddings and the LM head start as the mean of the
checkpoint's rows, so a new token starts as an average token rather than a random one. A tied checkpoint read
into an untied run (how a tied model trains under torchrun) starts its LM head as a copy of the embedding.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from ..checkpoint import hf
from ..config import ModelConfig
from ..model import Transformer
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .optim import local_rows, param_name

VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight", "model.mtp.embed_tokens.weight")


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight's shape for a model config (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")  # the run's tokenizer sets them


def model_changes(directory: str | Path, cfg: ModelConfig, skip: tuple[str, ...] = ()) -> list[str]:
    """The fields in which `cfg` differs from the config.json in `directory`, as `model.name=run's (checkpoint:
    its)`: what a run from init_from changes, on purpose (context extension) or not (a config built from a recipe
    rather than with train.config.build_config, which starts from the checkpoint's)."""
    saved = hf.checkpoint_config(Path(directory))
    return [f"model.{f.name}={getattr(cfg, f.name)!r} (checkpoint: {getattr(saved, f.name)!r})"
            for f in dataclasses.fields(saved) if f.name not in skip and getattr(cfg, f.name) != getattr(saved, f.name)]


def check_same_shapes(directory: str | Path, cfg: ModelConfig) -> None:
    """`cfg` (the checkpoint's config.json with the run's model.* overrides) must keep every weight shape: an
    override may change rope_theta or max_position_embeddings, not a layer count or a width."""
    saved, changed = hf.checkpoint_config(Path(directory)), model_changes(directory, cfg)
    theirs, ours = weight_shapes(saved), weight_shapes(cfg)
    if theirs != ours:
        differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        raise ValueError(f"init_from={directory}: the run's model does not have the checkpoint's weight shapes "
                         f"({differ[0]}: {theirs.get(differ[0])} there, {ours.get(differ[0])} here); only "
                         f"overrides that keep every shape apply on top of init_from. Changed: "
                         f"{', '.join(changed) or 'none'}")


@torch.no_grad()
def load_pretrained(model: Transformer, directory: str | Path) -> None:
    """Copy the checkpoint in `directory` into this process's part of `model` (materialised, possibly sharded).

    Every weight and persistent buffer (router biases) must be in the checkpoint with the model's shape, except
    the vocabulary rows, which may be more in the model (see the module docstring)."""
    cfg, saved = model.config, hf.checkpoint_config(Path(directory))
    targets = {param_name(k): t for k, t in model.state_dict(keep_vars=True).items()}
    if cfg.tie_word_embeddings:
        targets.pop(hf.LM_HEAD, None)
    untie = saved.tie_word_embeddings and not cfg.tie_word_embeddings  # the head starts as the embedding it was
    filled: set[str] = set()
    experts_seen: dict[str, set[tuple[int, str]]] = {}
    expected = {name: target.shape for name, target in targets.items()}
    for key, native, expert, proj, tensor in hf.model_tensors(Path(directory), cfg, expected):
        hf.check_finite(key, tensor, tensor)  # every rank, whichever rows it holds: all refuse alike, rank 0 says it
        if expert is None:
            grow = native in VOCAB_ROWS
            if grow and tensor.shape[0] != saved.vocab_size:  # the rows the run's vocabulary grows from
                raise ValueError(f"checkpoint key {key!r} has {tensor.shape[0]} rows, but its config.json says "
                                 f"vocab_size={saved.vocab_size}")
            for name in (native, hf.LM_HEAD) if untie and native == hf.EMBEDDING else (native,):
                _copy_rows(*local_rows(targets[name]), tensor, key, tuple(targets[name].shape), grow=grow)
                filled.add(name)
        else:
            local, first = local_rows(targets[native])
            if first <= expert < first + len(local):  # this rank holds the expert
                part = hf.expert_slice(local, expert - first, proj, cfg)
                _copy_rows(part, 0, tensor, key, tuple(part.shape), grow=False)
            experts_seen.setdefault(native, set()).add((expert, proj))
            filled.add(native)
    hf.check_complete(filled, experts_seen, expected, cfg)  # an expert's missing tensor too (it trained from random)


def _copy_rows(local: torch.Tensor, first: int, tensor: torch.Tensor, key: str, shape: tuple[int, ...],
               grow: bool) -> None:
    """local: rows first.. of a weight of full `shape`; tensor: the checkpoint's whole weight."""
    fits = tuple(tensor.shape) == shape or (grow and tensor.shape[0] < shape[0]
                                           and tuple(tensor.shape[1:]) == shape[1:])
    if not fits:
        raise ValueError(f"checkpoint key {key!r} has shape {tuple(tensor.shape)}, the model expects {shape}")
    have = max(0, min(len(local), tensor.shape[0] - first))  # rows of `local` the checkpoint holds
    local[:have].copy_(tensor[first:first + have])
    hf.check_finite(key, tensor, local[:have])
    if have < len(local):
        local[have:].copy_(tensor.float().mean(0).to(local.dtype))


def run_eos_ids(cfg: TrainConfig, tokenizer: Tokenizer) -> int | tuple[int, ...] | None:
    """The run's eos ids: the tokenizer's eos; a model from init_from (or resumed) keeps the
    others it stops at too (a chat model's `<|im_end|>` beside `<|endoftext|>`), which a single id would drop from
    the saved config. With another tokenizer (data.tokenizer) only those that are special tokens of it: init_from's
    id 2 was `"` in a GPT-2 vocabulary, and generation stopped at every quote."""
    kept = cfg.model.eos_token_ids if cfg.init_from is not None else ()
    if cfg.data.tokenizer is not None:
        kept = tuple(i for i in kept if i in tokenizer.special_ids.values())
    eos = tuple(dict.fromkeys(i for i in (tokenizer.eos_id, *kept) if i is not None))
    return eos if len(eos) > 1 else eos[0] if eos else None


def copy_generation_config(pretrained: Path, out: Path, cfg: TrainConfig) -> None:
    """init_from's generation_config.json (its sampling defaults, its eos ids) into the run; with another tokenizer
    (data.tokenizer) its token ids are the run's (cfg's model, after run_eos_ids)."""
    source = pretrained / hf.GENERATION_CONFIG
    if not source.is_file():
        return
    if cfg.data.tokenizer is None:
        shutil.copyfile(source, out / hf.GENERATION_CONFIG)
        return
    fields = hf.generation_config(pretrained)
    fields["eos_token_id"] = list(cfg.model.eos_token_ids)  # run_eos_ids' (init_from's config merges these)
    fields["bos_token_id"], fields["pad_token_id"] = cfg.model.bos_token_id, cfg.model.pad_token_id
    (out / hf.GENERATION_CONFIG).write_text(json.dumps(fields, indent=2) + "\n")

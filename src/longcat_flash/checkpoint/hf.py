"""Safetensors I/O in the official Hugging Face layout of LongCat-Flash (docs/architecture.md §3).

Our module names already are the official ones, with two exceptions, both declared in the tables below:
  * FFN experts are stacked for grouped compute: native `mlp.experts.gate_up_proj` (E, 2F, D) and
    `mlp.experts.down_proj` (E, D, F) <-> official `mlp.experts.{e}.{gate,up,down}_proj.weight`;
  * the MTP head is flattened: official `model.mtp.layers.0.enorm.m.weight` <-> native `model.mtp.enorm.weight`,
    `...transformer_layer.mlp.*` <-> `model.mtp.mlp.*`, and so on.
Loading streams one tensor at a time into preallocated storage, checks every shape and names the key on any
mismatch. Only safetensors are read: nothing is ever unpickled.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..data.dataset_folders import RUN_CONFIG_FILE
from ..device import resolve_device
from ..files import atomic_write_text, temporary_file
from ..model import Transformer
from .safetensors_files import (EMBEDDING, INDEX_FILE, LM_HEAD, SINGLE_FILE, checkpoint_dtype,
                                checkpoint_files, read_tensors, write_safetensors)
from .training import MANIFEST

log = logging.getLogger(__name__)

SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")  # the shards of a sharded export
GENERATION_CONFIG = "generation_config.json"  # transformers' generation defaults, beside config.json
FP32_KEYS = re.compile(r"\.mlp\.router\.")  # router weight and correction bias stay fp32 (docs/architecture.md §5.1)

# official prefix <-> native prefix, for the MTP head (docs/architecture.md §3.3)
MTP_PREFIXES = [
    ("model.mtp.layers.0.enorm.m.", "model.mtp.enorm."),
    ("model.mtp.layers.0.hnorm.m.", "model.mtp.hnorm."),
    ("model.mtp.layers.0.transformer_layer.mlp.", "model.mtp.mlp."),
    ("model.mtp.layers.0.", "model.mtp."),  # eh_proj, input_layernorm, self_attn, post_attention_layernorm
]
EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def official_to_native(key: str) -> tuple[str, int | None, str | None]:
    """Official key -> (native key, expert index or None, expert projection or None)."""
    match = EXPERT_KEY.match(key)
    if match:
        prefix, expert, proj = match.groups()
        return f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}", int(expert), proj
    for official, native in MTP_PREFIXES:
        if key.startswith(official):
            return native + key[len(official):], None, None
    return key, None, None


def native_to_official(key: str) -> str:
    for official, native in MTP_PREFIXES[:-1]:
        if key.startswith(native):
            return official + key[len(native):]
    if key.startswith("model.mtp.") and not key.startswith(("model.mtp.embed_tokens.", "model.mtp.norm.")):
        return "model.mtp.layers.0." + key[len("model.mtp."):]
    return key


# ---------------------------------------------------------------------------------------------- loading

def checkpoint_config(path: Path, prequantized: bool = False) -> ModelConfig:
    """config.json, read as the files hold it: a config naming an MTP head whose weights are not in the files
    (transformers' `save_pretrained` drops them: its model has no MTP head) is a model without one, and one that
    leaves the field out over files holding the head is a model with it; the eos ids
    of generation_config.json end generation too, as in transformers' `generate` (a chat model's end of turn,
    `<|im_end|>`, is often only there). `prequantized`: as ModelConfig.from_dict."""
    cfg = ModelConfig.from_json(path, prequantized)
    raw = json.loads((path / "config.json").read_text())
    if (written_by := raw.get("transformers_version")) and (ignored := transformers_ignores(cfg)):
        _warn_transformers_computes_another_model(path.resolve(), str(written_by), ", ".join(ignored))
    if "num_layers" in raw and raw.get("num_hidden_layers") == cfg.num_layers:  # SGLang's spelling
        _warn_transformers_halves_the_layers(path.resolve(), cfg.num_layers)
    named = "num_nextn_predict_layers" in raw
    if cfg.num_nextn_predict_layers or not named:
        has_head = any(k.startswith("model.mtp.") for k in checkpoint_files(path))
        if cfg.num_nextn_predict_layers and not has_head:
            _warn_no_mtp_weights(path.resolve())
            cfg = cfg.replace(num_nextn_predict_layers=0)
        elif not named and has_head:  # the official config's default is one head (transformers' has no field)
            cfg = cfg.replace(num_nextn_predict_layers=1)
    eos = tuple(dict.fromkeys((*cfg.eos_token_ids, *_token_ids(generation_config(path), "eos_token_id", path))))
    if eos != cfg.eos_token_ids:
        try:
            cfg = cfg.replace(eos_token_id=eos if len(eos) > 1 else eos[0])
        except ValueError as err:
            raise ValueError(f"{path / GENERATION_CONFIG}: {err}") from None
    return cfg


def generation_config(path: Path) -> dict[str, Any]:
    """generation_config.json's fields (none without the file)."""
    file = Path(path) / GENERATION_CONFIG
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: must hold a JSON object, not {type(raw).__name__}")
    return raw


def _token_ids(fields: dict[str, Any], key: str, path: Path) -> tuple[int, ...]:
    value = fields.get(key)
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{Path(path) / GENERATION_CONFIG}: {key} must be a token id or a list of them, "
                         f"got {value!r}")
    return tuple(ids)


@functools.lru_cache(maxsize=None)
def _warn_no_mtp_weights(path: Path) -> None:
    """Once per checkpoint and process (a run reads its config more than once)."""
    log.warning("%s: config.json names an MTP head but the checkpoint holds no model.mtp.* weights (a transformers "
                "save_pretrained drops them): read as a model without the head, so no speculative decoding", path)


@functools.lru_cache(maxsize=None)
def _warn_transformers_halves_the_layers(path: Path, layers: int) -> None:
    log.warning("%s: config.json gives num_hidden_layers=%d, as many as num_layers: read here as %d ScMoE layers, "
                "but transformers' LongcatFlash takes num_hidden_layers as two per layer and builds %d (drop the "
                "field, or write %d)", path, layers, layers, layers // 2, 2 * layers)


@functools.lru_cache(maxsize=None)
def _warn_transformers_computes_another_model(path: Path, version: str, ignored: str) -> None:
    log.warning("%s: config.json was written by transformers %s, whose LongcatFlash ignores %s: its outputs differ "
                "from this model's, which honours them", path, version, ignored)


def _target_dtype(native: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if FP32_KEYS.search(native):
        return torch.float32
    return dtype or tensor.dtype


def model_tensors(path: Path, cfg: ModelConfig, expected: dict[str, torch.Size]
                  ) -> Iterator[tuple[str, str, int | None, str | None, torch.Tensor]]:
    """The checkpoint's tensors that have a place in a model of `cfg` (whose weights have the `expected` shapes),
    one at a time, as (official key, native name, expert id or None, projection or None, tensor).

    Passed over, each after its check: a tied model's copy of the embedding (it must be one; alone, it is the
    embedding), the zero-expert stubs
    transformers 5.0-5.24 write, and an MTP head config.json leaves out (said once). Any other key is an error."""
    ignored, dropped_mtp, tied_copy, tied_key, embedding = 0, False, None, None, None
    sources: dict[tuple[str, int | None, str | None], str] = {}  # the key that filled each weight or part of one
    for key, tensor in read_tensors(path):
        native, expert, proj = official_to_native(key)
        _check_filled_once(key, native, expert, proj, sources)
        if native == LM_HEAD and cfg.tie_word_embeddings:
            tied_copy, tied_key = tensor, key  # a copy of the embedding some writers keep: checked against it below
            continue
        if expert is not None and expert >= cfg.n_routed_experts:
            _check_zero_expert_stub(key, native, expert, proj, tensor, expected, cfg)
            ignored += 1
            continue
        if native.startswith("model.mtp.") and not cfg.num_nextn_predict_layers:
            dropped_mtp = True  # config.json drops the head: its weights are skipped, as transformers does
            continue
        if native not in expected:
            raise KeyError(f"checkpoint key {key!r} has no place in this model (config: {cfg.num_layers} layers, "
                           f"{cfg.n_routed_experts} experts, MTP={cfg.num_nextn_predict_layers})")
        if native == EMBEDDING and cfg.tie_word_embeddings:
            embedding = tensor
        yield key, native, expert, proj, tensor
    if ignored:
        log.info("ignored %d tensors for zero-expert ids (written by transformers 5.x, never used)", ignored)
    if dropped_mtp:
        log.warning("%s: the checkpoint holds model.mtp.* weights but config.json names no MTP head "
                    "(num_nextn_predict_layers 0): read without them, so no speculative decoding", path)
    if tied_copy is not None and embedding is not None:
        _check_tied_copy(tied_copy, embedding)
    elif tied_copy is not None:  # the tied weight under the head's name alone (safetensors' save_model keeps one
        yield tied_key, EMBEDDING, None, None, tied_copy  # name per shared tensor, and lm_head sorts first)


def _check_filled_once(key: str, native: str, expert: int | None, proj: str | None,
                       sources: dict[tuple[str, int | None, str | None], str]) -> None:
    """A weight (or an expert's part of one) given twice, as per-expert and stacked expert keys side by side or an
    official MTP key beside its native spelling: the later in the file overwrote the earlier, silently."""
    whole, part, any_part = (native, None, None), (native, expert, proj), (native, -1, None)
    earlier = sources.get(whole) or sources.get(part if expert is not None else any_part)
    if earlier is not None:
        raise ValueError(f"checkpoint keys {earlier!r} and {key!r} both hold {native}"
                         f"{f' (expert {expert})' if expert is not None else ''}: one weight given twice")
    sources[part] = key
    sources.setdefault(any_part, key)


def load_state_dict(path: Path, cfg: ModelConfig, expected: dict[str, torch.Size],
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read an official checkpoint into native tensors on `device`, checking keys and shapes against `expected`.

    Each tensor is allocated on `device` and filled from the file one key at a time: no full CPU copy."""
    out: dict[str, torch.Tensor] = {}
    experts_seen: dict[str, set[tuple[int, str]]] = {}
    for key, native, expert, proj, tensor in model_tensors(path, cfg, expected):
        if native not in out:
            out[native] = torch.empty(expected[native], dtype=_target_dtype(native, tensor, dtype), device=device)
        target = out[native] if expert is None else expert_slice(out[native], expert, proj, cfg)
        if target.shape != tensor.shape:
            raise ValueError(f"checkpoint key {key!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(target.shape)}")
        target.copy_(tensor)
        check_finite(key, tensor, target)
        if expert is not None:
            experts_seen.setdefault(native, set()).add((expert, proj))
    check_complete(out, experts_seen, expected, cfg)
    return out


def check_finite(key: str, stored: torch.Tensor, loaded: torch.Tensor) -> None:
    """A NaN or Inf weight makes every logit NaN: greedy decoding would then print nothing, and sampling fail.
    The sum is the fast test (one pass, no mask: +0.4 s on the 0.8 s warm load of the bench preset's 1.7 GB of
    bf16, 2 cores); isfinite confirms what it flags."""
    if not bool(loaded.sum(dtype=torch.float32).isfinite()) and not bool(loaded.isfinite().all()):
        cause = ("holds NaN or Inf values (the run that wrote it diverged, or the file is corrupt)"
                 if not bool(stored.isfinite().all()) else f"overflows {loaded.dtype} (load it in another dtype)")
        raise ValueError(f"checkpoint key {key!r} {cause}")


def _check_tied_copy(stored: torch.Tensor, embedding: torch.Tensor) -> None:
    """transformers drops the LM head of a tied checkpoint; that is only the same model when it is the embedding."""
    if stored.shape != embedding.shape or not torch.equal(stored.to(embedding.dtype), embedding):
        raise ValueError(f"config.json ties the embeddings (tie_word_embeddings: true), but the checkpoint's "
                         f"{LM_HEAD} is not a copy of {EMBEDDING}: set tie_word_embeddings to false to use it")


def _check_zero_expert_stub(key: str, native: str, expert: int, proj: str | None, tensor: torch.Tensor,
                            expected: dict[str, torch.Size], cfg: ModelConfig) -> None:
    """A routed-expert key past the FFN experts may only be the stub transformers writes for a zero expert: a gate
    or up matrix of an expert's shape, for an id in [E, E + Z), in a layer this model has."""
    if not (native in expected and proj in ("gate_proj", "up_proj") and expert < cfg.n_experts_total
            and tuple(tensor.shape) == (cfg.expert_ffn_hidden_size, cfg.hidden_size)):
        raise KeyError(f"checkpoint key {key!r} (shape {tuple(tensor.shape)}) has no place in this model (config: "
                       f"{cfg.n_routed_experts} FFN experts, {cfg.zero_expert_num} zero experts)")


def expert_slice(stacked: torch.Tensor, expert: int, proj: str, cfg: ModelConfig) -> torch.Tensor:
    F = cfg.expert_ffn_hidden_size
    if proj == "down_proj":
        return stacked[expert]  # (D, F)
    return stacked[expert, :F] if proj == "gate_proj" else stacked[expert, F:]  # (F, D)


def check_complete(out: Collection[str], experts_seen: dict[str, set[tuple[int, str]]],
                   expected: dict[str, torch.Size], cfg: ModelConfig) -> None:
    """Every `expected` weight was read (`out`: the names filled), each expert stack with all its experts'
    projections (`experts_seen`)."""
    missing = [native_to_official(k) for k in expected if k not in out]
    for native, seen in experts_seen.items():
        projs = ("down_proj",) if native.endswith("down_proj") else ("gate_proj", "up_proj")
        prefix = native.rsplit(".", 1)[0]
        missing += [f"{prefix}.{e}.{p}.weight" for e in range(cfg.n_routed_experts) for p in projs
                    if (e, p) not in seen]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        raise KeyError(f"checkpoint is missing {len(missing)} tensor(s): {shown}"
                       f"{' ...' if len(missing) > 5 else ''}")


def _expected_shapes(model: Transformer) -> dict[str, torch.Size]:
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop(LM_HEAD, None)
    return shapes


def model_directory(path: str | Path) -> Path:
    """`path` as a model directory in the official layout, or a one-line error saying what it is instead."""
    if not str(path):
        raise ValueError("no model directory given")
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise NotADirectoryError(f"{path} is a file; a model is a directory (config.json, safetensors, "
                                     "tokenizer.json)")
        raise FileNotFoundError(f"model directory {path} does not exist")
    if (path / MANIFEST).is_file() and not (path / "config.json").is_file():
        raise ValueError(f"{path} is a training checkpoint (one step of a run), not a model: a run exports its model "
                         "into the run directory when it ends; `--resume RUN_DIR` continues the run")
    if not (path / "config.json").is_file() and (path / RUN_CONFIG_FILE).is_file():  # grown, or killed early
        raise FileNotFoundError(f"{path} is a training run with no model yet: a run writes its model there when it "
                                f"ends; `longcat {_run_command(path)} --resume {shlex.quote(str(path))}` trains it to "
                                "its end")
    if not (path / "config.json").is_file():  # (before the tokenizer is looked for: the folder is the problem)
        raise FileNotFoundError(f"{path} is not a model directory: it has no config.json (a model is config.json, "
                                "safetensors and tokenizer.json)")
    return path


def _run_command(run: Path) -> str:
    """The command that continues a run directory: sft when its recorded config has conversations."""
    try:
        sft = json.loads((run / RUN_CONFIG_FILE).read_text()).get("sft") or {}
    except (OSError, ValueError, AttributeError):  # unreadable, or not an object: taken for pre-training
        return "train"
    return "sft" if isinstance(sft, dict) and sft.get("data") else "train"


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype of DTYPES, given as torch's or by name ("bfloat16", ...); None or "auto": the caller's default."""
    if dtype is None or dtype == "auto":
        return None
    if dtype not in DTYPES and dtype not in DTYPES.values():  # torch.int8 wrote a model of zeros
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES.get(dtype, dtype)


def from_pretrained(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                    cls: type[Transformer] = Transformer) -> Transformer:
    """Build the model from `config.json` on the meta device and load the official-layout safetensors in `path`
    straight onto `device` (no full copy on the CPU first).

    dtype None (or "auto"): the checkpoint's (the one most of its weights are in: checkpoint_dtype); a torch dtype
    or its name otherwise. The router is always fp32.
    """
    dtype = parse_dtype(dtype)
    path = model_directory(path)
    cfg = checkpoint_config(path)
    with torch.device("meta"):
        model = cls(cfg)
    device = device if isinstance(device, torch.device) else resolve_device(device)  # "cuda" without one: said
    state = load_state_dict(path, cfg, _expected_shapes(model), dtype or checkpoint_dtype(path), device)
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rotary()  # non-persistent: in no checkpoint
    return model.eval()


# ----------------------------------------------------------------------------------------------- saving

def official_tensors(model: Transformer, zero_expert_stubs: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under official keys, experts unstacked, produced lazily (one at a time).

    A sharded weight (FSDP, expert parallelism: a DTensor) is gathered whole when its turn comes; that is a
    collective, so under a process group every rank iterates this in step.
    zero_expert_stubs: also write what the installed transformers' loader needs besides the official tensors:
    transformers 5.0-5.24 sizes `gate_up_proj` for E+Z experts and refuses a checkpoint without zero gate/up tensors
    for the zero-expert ids; 5.25 sizes it for E and refuses the stubs (`transformers_gate_up_experts`). The official
    layout (and SGLang/vLLM) has exactly E experts, so this is off by default.
    """
    cfg = model.config
    stubs = range(cfg.n_routed_experts, transformers_gate_up_experts(cfg) if zero_expert_stubs else 0)
    for native, tensor in model.state_dict().items():
        if native == LM_HEAD and cfg.tie_word_embeddings:
            continue
        tensor = _whole(tensor) if hasattr(tensor, "full_tensor") else tensor
        prefix, _, leaf = native.rpartition(".")
        if prefix.endswith(".mlp.experts"):
            projections = ("down_proj",) if leaf == "down_proj" else ("gate_proj", "up_proj")
            for e in range(tensor.shape[0]):
                for proj in projections:
                    yield f"{prefix}.{e}.{proj}.weight", expert_slice(tensor, e, proj, cfg)
            if leaf == "gate_up_proj":
                shape = (cfg.expert_ffn_hidden_size, cfg.hidden_size)
                for e in stubs:
                    yield f"{prefix}.{e}.gate_proj.weight", tensor.new_zeros(shape)
                    yield f"{prefix}.{e}.up_proj.weight", tensor.new_zeros(shape)
        else:
            yield native_to_official(native), tensor


def transformers_gate_up_experts(cfg: ModelConfig) -> int:
    """How many gate/up experts per layer the installed transformers' LongcatFlash allocates for this config (read
    off its experts module built on the meta device): E + Z up to 5.24, E from 5.25; E + Z without transformers."""
    try:
        from transformers import LongcatFlashConfig
        from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashExperts
    except ImportError:
        return cfg.n_experts_total
    theirs = LongcatFlashConfig(n_routed_experts=cfg.n_routed_experts, zero_expert_num=cfg.zero_expert_num,
                                hidden_size=cfg.hidden_size, expert_ffn_hidden_size=cfg.expert_ffn_hidden_size)
    with torch.device("meta"):
        return LongcatFlashExperts(theirs).gate_up_proj.shape[0]


def transformers_ignores(cfg: ModelConfig) -> list[str]:
    """The config values transformers' LongcatFlash (5.25) computes as if they were the release's: its forward
    always scales the MLA queries and latent, never adds the router bias, never renormalises the top-k gates, and
    its zero experts always return their input."""
    release = {"mla_scale_q_lora": True, "mla_scale_kv_lora": True, "router_bias": False, "norm_topk_prob": False,
               "zero_expert_type": "identity"}
    if not cfg.zero_expert_num:  # no zero experts: their kind computes nothing
        del release["zero_expert_type"]
    return [f"{name}={getattr(cfg, name)!r}" for name, value in release.items() if getattr(cfg, name) != value]


def save_pretrained(model: Transformer, path: str | Path, max_shard_bytes: int = 2 * 1024**3,
                    zero_expert_stubs: bool = False, writer: bool = True, dtype: str | torch.dtype | None = None
                    ) -> None:
    """Write config.json and safetensors, streamed: tensors are gathered (when sharded) and written out one file
    of at most `max_shard_bytes` at a time, so no process ever holds the whole model. Above one file the shards
    are named model-XXXXX-of-YYYYY.safetensors with an index.

    Each file is written under a temporary name and renamed at the end, so a crash never leaves a truncated or
    mixed set. writer=False: take part in the gathers of a sharded model but write nothing (every rank but one).
    zero_expert_stubs: see `official_tensors` (needed only for transformers' own loader).
    dtype: the weights' dtype in the files, a torch dtype or its name (default: the model's); the routers stay
    fp32 whatever it is. A torch.compile'd model is saved as the model it wraps (its keys carry no `_orig_mod.`).
    """
    model, dtype, path = getattr(model, "_orig_mod", model), parse_dtype(dtype), Path(path)
    if type(max_shard_bytes) is not int or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}")
    _check_savable(model, path)
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        if ignored := transformers_ignores(model.config):
            log.warning("%s: transformers' LongcatFlash ignores %s: loaded there, this checkpoint computes another "
                        "model", path, ", ".join(ignored))
    parts: list[tuple[Path | None, list[str], int]] = []  # (temp file or None off the writer, keys, bytes)
    chunk: dict[str, torch.Tensor] = {}  # the writer's next file (other ranks keep only its keys)
    keys: list[str] = []
    size = 0

    def flush() -> None:
        parts.append((_write_part(path, len(parts) + 1, chunk) if writer else None, list(keys), size))
        chunk.clear()
        keys.clear()

    try:
        for key, tensor in official_tensors(model, zero_expert_stubs):
            if dtype is not None and tensor.is_floating_point() and not FP32_KEYS.search(key):
                if dtype == torch.float16 and tensor.abs().amax() > torch.finfo(torch.float16).max:
                    raise ValueError(f"{key} holds values beyond float16's range (up to {tensor.abs().amax():.4g}): "
                                     "it would be saved as inf; save in bfloat16 or float32")
                tensor = tensor.to(dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if keys and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            if writer:
                chunk[key] = tensor.detach().to("cpu").contiguous()
            keys.append(key)
            size += nbytes
        flush()
        if writer:
            _commit_parts(model, path, parts, dtype or model.lm_head.weight.dtype)
    except BaseException:  # the parts written so far go with the error (each up to max_shard_bytes)
        for tmp, _, _ in parts:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise


def _check_savable(model: Transformer, path: Path) -> None:
    """Refuse, before writing anything, a model whose weights are not the model's own: one fused or quantized for
    inference in place (`load_engine`, `load_for_inference`) holds stacked, packed or scaled tensors under other
    names, which no loader reads back."""
    with torch.device("meta"):
        own = Transformer(model.config).state_dict().keys()
    if other := sorted(set(model.state_dict()) - set(own)):
        raise ValueError(f"cannot save to {path}: the model holds weights in a layout of its own ({other[0]!r}): "
                         "a model fused or quantized for inference is not saved; save the model "
                         "LongcatFlash.from_pretrained returns")


def _write_part(path: Path, number: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one file of the export under a temporary name (renamed with the others once all are written)."""
    with temporary_file(path / f"model-part-{number:05d}.safetensors") as tmp:
        write_safetensors(tensors, tmp, metadata={"format": "pt"}, shown=f"cannot write the model into {path}")
    return tmp


def _commit_parts(model: Transformer, path: Path, parts: list[tuple[Path | None, list[str], int]],
                  dtype: torch.dtype) -> None:
    """Rename the written parts to their final names, write the index (when sharded) and config.json."""
    names = [SINGLE_FILE] if len(parts) == 1 else [
        f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    weight_map = {key: name for name, (_, keys, _) in zip(names, parts) for key in keys}
    for name, (tmp, _, _) in zip(names, parts):
        try:
            os.replace(tmp, path / name)
        except OSError as err:  # named as the model file, not the hidden temporary (save_pretrained removes it)
            raise OSError(err.errno, f"cannot write the model into {path}: {err.strerror}", str(path / name)) \
                from None
    for stale in path.glob("model*.safetensors"):  # an earlier export's: other files there are the user's
        if stale.name not in names and (stale.name == SINGLE_FILE or SHARD_FILE.match(stale.name)):
            stale.unlink()
    for dead in path.glob(".model-part-*.safetensors.*.tmp"):  # a part of an export killed mid-write (ours are
        dead.unlink()  # renamed by now): up to max_shard_bytes each, hidden
    if len(parts) > 1:
        index = {"metadata": {"total_size": sum(p[2] for p in parts)}, "weight_map": weight_map}
        atomic_write_text(path / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True))
    elif (path / INDEX_FILE).exists():
        (path / INDEX_FILE).unlink()
    model.config.save_json(path / "config.json", dtype=str(dtype).removeprefix("torch."))


def _whole(tensor: Any) -> torch.Tensor:
    """A DTensor gathered whole on every rank. An expert stack sharded over dp and ep takes two all_gathers, which
    DTensor warns about on every rank ("may give inconsistent results between ranks due to different reduction
    orders"): a gather reduces nothing, so that cannot happen here, and the warning is held back."""
    redistribute = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute.level
    redistribute.setLevel(logging.ERROR)
    try:
        return tensor.full_tensor()
    finally:
        redistribute.setLevel(level)


class LongcatFlash(Transformer):
    """The model with official-layout checkpoint I/O: `LongcatFlash.from_pretrained(dir)`, `.save_pretrained`."""

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> LongcatFlash:
        return from_pretrained(path, dtype=dtype, device=device, cls=cls)  # type: ignore[return-value]

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 2 * 1024**3,
                        zero_expert_stubs: bool = False, dtype: str | torch.dtype | None = None) -> None:
        save_pretrained(self, path, max_shard_bytes, zero_expert_stubs, dtype=dtype)

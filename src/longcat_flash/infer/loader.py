"""Load a checkpoint for inference: weights in the serving dtype, fused inference modules, optional quantization."""
from __future__ import annotations

import numbers
from pathlib import Path

import torch

from ..checkpoint.hf import LongcatFlash, checkpoint_config, parse_dtype
from ..config import ModelConfig
from ..device import fast_bf16, resolve_device, use_device
from ..model import Transformer
from ..runtime import release_free_heap
from ..tokenizer import Tokenizer
from . import kernels
from .engine import Engine, EngineConfig
from .fused import fuse_for_inference
from .quant import (
    KEEP_SENSITIVE,
    QuantReport,
    choose_kept,
    choose_sensitive,
    parse_quantize,
    quantize_model,
)


def inference_device(spec: str | torch.device) -> torch.device:
    """A `--device` value ("auto", "cpu", "cuda", "cuda:N") resolved, or a torch.device a caller already
    resolved, taken as is; made this process's current device (DeviceError for one this machine lacks)."""
    device = spec if isinstance(spec, torch.device) else resolve_device(spec)
    use_device(device)
    return device


def check_speculative(path: str | Path, speculative: int, quantize: str | None = None,
                      device: str | torch.device = "auto") -> None:
    """Refuse speculative decoding for a checkpoint without an MTP head from its files alone, before the minutes
    that loading (and quantizing) a large model take; and, on the CPU, a verify step of more rows than the row-exact
    kernels take (past them a row's logits depend on the rows beside it, and greedy tokens are no longer exactly
    plain greedy's: docs/mtp.md)."""
    if speculative and not checkpoint_config(Path(path)).num_nextn_predict_layers:
        raise ValueError(f"speculative decoding needs a model with an MTP head (num_nextn_predict_layers=1); "
                         f"{path} has none")
    rows, most = speculative + 1, kernels.MAX_EXACT_VERIFY_ROWS
    on_cpu = (device if isinstance(device, torch.device) else resolve_device(device)).type == "cpu"
    if speculative and rows > most and on_cpu:
        raise ValueError(f"speculative decoding of {speculative} drafts verifies {rows} rows a step; past {most} rows "
                         f"on the CPU a product leaves the row-exact kernels (oneDNN's GEMM for plain weights, the "
                         f"AMX tile GEMM for {quantize or 'quantized'} ones in bf16), so its tokens would not be "
                         f"exactly plain greedy's; use at most {most - 1} drafts")


def load_engine(path: str | Path, config: EngineConfig | None = None, *, dtype: str | None = None,
                quantize: str | None = None, device: str | torch.device = "auto") -> tuple[Engine, Tokenizer]:
    """The checkpoint's tokenizer and an engine over its model (`load_for_inference`), checked against each other
    before the weights are read: every id the tokenizer makes has an embedding; and its EOS token ends generation
    besides config.json's, as in vLLM (the end of turn a chat template writes is often only there). config None:
    the engine's defaults, as Engine takes it."""
    if config is not None and not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig (EngineConfig(**settings)), got {type(config).__name__}")
    config = config or EngineConfig()
    check_speculative(path, config.speculative, quantize, device)
    tokenizer = Tokenizer.load(path)
    tokenizer.check_fits(checkpoint_config(Path(path)).vocab_size)
    model, _ = load_for_inference(path, dtype=dtype, quantize=quantize, device=device)
    return Engine(model, config, eos_ids=() if tokenizer.eos_id is None else (tokenizer.eos_id,)), tokenizer


def _check_keep_options(quantize: str | None, keep_top: int, keep_fraction: float,
                        calibration: torch.Tensor | None) -> None:
    """Each option only with the format that reads it: one it would ignore is refused, not dropped."""
    mixed = quantize is not None and quantize.endswith("-mixed")
    if isinstance(keep_top, bool) or not isinstance(keep_top, int) or keep_top < 0:  # True read as 1
        raise ValueError(f"keep_top must be an integer >= 0, got {keep_top!r}")
    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, numbers.Real) or not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1] (the share of units kept at int8; plain int4 keeps "
                         f"none), got {keep_fraction!r}")
    if keep_top and quantize is None:
        raise ValueError("keep_top keeps units of a quantized model in its dtype: give quantize (int8 / fp8 / int4)")
    if keep_top and mixed:
        raise ValueError(f"keep_top applies to int8 / fp8 / int4, not to {quantize}: it keeps units by keep_fraction")
    if keep_fraction != KEEP_SENSITIVE and not mixed:
        raise ValueError(f"keep_fraction applies to int4-mixed only, not to {quantize}")
    if keep_top and calibration is None:
        raise ValueError("keep_top picks units by their error on calibration ids: pass calibration too")
    if calibration is not None and not (keep_top or mixed):  # else it would be read by nothing
        raise ValueError("calibration ids pick the units kept at higher precision: they apply with keep_top > 0 "
                         "(int8 / fp8 / int4) or with int4-mixed")


def _check_calibration(ids: torch.Tensor, cfg: ModelConfig) -> None:
    """Calibration ids (B, S): integers in the vocabulary, 2 <= S <= the context (the MTP head needs a next token)."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"calibration must be a tensor of token ids (batch, tokens), got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool or ids.dim() != 2:
        raise ValueError(f"calibration must be integer token ids of shape (batch, tokens), got {ids.dtype} of "
                         f"shape {tuple(ids.shape)}")
    if not 2 <= ids.shape[1] <= cfg.max_position_embeddings or ids.shape[0] < 1:
        raise ValueError(f"calibration: {tuple(ids.shape)} ids; each row needs 2 to {cfg.max_position_embeddings} "
                         "tokens (the model's context), and there must be a row")
    if not 0 <= int(ids.min()) <= int(ids.max()) < cfg.vocab_size:
        raise ValueError(f"calibration token ids must be in [0, {cfg.vocab_size})")


def load_for_inference(path: str | Path, *, dtype: str | None = None, quantize: str | None = None,
                       calibration: torch.Tensor | None = None, keep_top: int = 0,
                       keep_fraction: float = KEEP_SENSITIVE,
                       device: str | torch.device = "cpu") -> tuple[Transformer, QuantReport | None]:
    """The model from `path` on `device`, ready for the engine; with `quantize` (quant.CHOICES), quantized weights.

    dtype None or "auto": the checkpoint's, except that a bf16 checkpoint computes in fp32 on a device without fast
    bf16 matmuls (a CPU with AVX2 only), a float16 one in fp32 on any CPU, and a float64 one in fp32 anywhere;
    "bfloat16" forces bf16.
    The weights are read straight onto the device, then fused and quantized there (no CPU copy of the model).
    int8/fp8/int4: keep_top > 0 with calibration ids (B, S) keeps that many units per criterion in the model dtype.
    int4-mixed: the keep_fraction most sensitive units (measured on calibration ids if given) stay at int8.
    """
    fmt, keep_fmt = parse_quantize(quantize) if quantize is not None else (None, None)
    _check_keep_options(quantize, keep_top, keep_fraction, calibration)
    if calibration is not None:
        _check_calibration(calibration, ModelConfig.from_json(path))
    device = inference_device(device)
    asked = parse_dtype(dtype)
    model = LongcatFlash.from_pretrained(path, dtype=asked, device=device)
    stored = model.lm_head.weight.dtype
    if asked is None and ((stored == torch.bfloat16 and not fast_bf16(device))
                          or (stored == torch.float16 and device.type == "cpu") or stored == torch.float64):
        model.float()  # auto: bf16 matmuls here would be 6-20x slower than fp32 ones (device.fast_bf16), fp16
        # ones on any CPU (a float16 checkpoint decoded 15x slower than in fp32 on the 2-core EPYC); float64
        # (a model saved after .double()) only doubles the bytes a token reads
    fuse_for_inference(model, moe=device.type == "cpu" or fmt is not None)  # a GPU's grouped MoE: fused.py
    if device.type == "cpu":
        kernels.kernel_available()  # a first build of the compiled kernels (a minute) happens here, not in a request
    report = None
    if fmt:
        calibration = None if calibration is None else calibration.to(device)
        keep = []
        if keep_fmt:
            keep = choose_sensitive(model, calibration, fmt, keep_fraction).kept
        elif keep_top:  # _check_keep_options: with calibration
            keep = choose_kept(model, calibration, fmt, keep_top).kept
        report = quantize_model(model, fmt, keep, keep_fmt)
    release_free_heap()  # the weights as read, where converted or quantized: freed, but kept by a tuned heap
    return model.eval(), report

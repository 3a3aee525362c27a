"""Load a checkpoint for inference: weights in the serving dtype, fused inference modules, optional quantization."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.hf import LongcatFlash
from ..model import Transformer
from .fused import fuse_for_inference
from .quant import QuantReport, choose_kept, quantize_model

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {name!r}")
    return DTYPES[name]


def load_for_inference(path: str | Path, *, dtype: str | None = None, quantize: str | None = None,
                       calibration: torch.Tensor | None = None, keep_top: int = 0
                       ) -> tuple[Transformer, QuantReport | None]:
    """The model from `path` ready for the engine; with `quantize`, block-quantized weights.

    keep_top > 0 with calibration ids (B, S) keeps that many units per criterion in the model dtype (quant.py).
    """
    model = LongcatFlash.from_pretrained(path, dtype=parse_dtype(dtype))
    fuse_for_inference(model)
    report = None
    if quantize:
        keep = choose_kept(model, calibration, quantize, keep_top).kept if keep_top and calibration is not None else []
        report = quantize_model(model, quantize, keep)
    return model.eval(), report

"""dtype "auto": bf16 only where the device multiplies bf16 fast. On a CPU with AVX2 only, ATen's bf16 matmul is a
plain loop (20-100x slower than fp32), so training and inference there compute in fp32 unless asked otherwise.
Both answers of `device.fast_bf16` are forced here, so each branch runs on any machine."""
from __future__ import annotations

import json

import pytest
import torch
from train_support import make_corpus, tiny_config

from longcat_flash import device as device_mod
from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.infer import loader
from longcat_flash.presets import tiny
from longcat_flash.train.trainer import setup

CPU = torch.device("cpu")


@pytest.mark.parametrize("fast", [True, False])
def test_auto_autocast_computes_in_bf16_only_where_it_is_fast(fast, monkeypatch):
    monkeypatch.setattr(device_mod, "fast_bf16", lambda device: fast)
    a = torch.randn(4, 8)
    with device_mod.autocast(CPU, "auto"):
        assert (a @ a.T).dtype == (torch.bfloat16 if fast else torch.float32)
    with device_mod.autocast(CPU, "bfloat16"):  # asked for: bf16 either way
        assert (a @ a.T).dtype == torch.bfloat16
    with device_mod.autocast(CPU, "float32"):
        assert (a @ a.T).dtype == torch.float32


@pytest.mark.parametrize("fast", [True, False])
def test_a_run_records_the_dtype_auto_resolved_to(fast, monkeypatch, tmp_path):
    """The run's saved config holds the resolved dtype, so that --resume computes as the run started."""
    monkeypatch.setattr(device_mod, "fast_bf16", lambda device: fast)
    corpus = make_corpus(tmp_path / "corpus")
    cfg = tiny_config(corpus, tmp_path / "cache", "max_steps=1")
    assert cfg.dtype == "auto"
    run = setup(cfg, tmp_path / "run", progress=False)
    expected = "bfloat16" if fast else "float32"
    assert run.cfg.dtype == expected
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["dtype"] == expected


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return init_checkpoint(tiny(), tmp_path_factory.mktemp("bf16"), dtype=torch.bfloat16)


@pytest.mark.parametrize("fast", [True, False])
def test_auto_loads_a_bf16_checkpoint_in_fp32_where_bf16_is_slow(fast, bf16_checkpoint, monkeypatch):
    monkeypatch.setattr(loader, "fast_bf16", lambda device: fast)
    model, _ = loader.load_for_inference(bf16_checkpoint)
    dtypes = {p.dtype for name, p in model.named_parameters() if "router" not in name}
    assert dtypes == {torch.bfloat16 if fast else torch.float32}
    model, _ = loader.load_for_inference(bf16_checkpoint, dtype="bfloat16")  # asked for: kept
    assert model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("fast", [True, False])
def test_auto_loads_a_float16_checkpoint_in_fp32_on_a_cpu(fast, tmp_path, monkeypatch):
    """A float16 checkpoint (transformers' `model.half().save_pretrained`) decoded in fp16 on the CPU, ~15x slower
    than in fp32 (2-core EPYC), without a word."""
    monkeypatch.setattr(loader, "fast_bf16", lambda device: fast)
    fp16 = init_checkpoint(tiny(), tmp_path / "fp16", dtype=torch.float16)
    model, _ = loader.load_for_inference(fp16)
    assert {p.dtype for name, p in model.named_parameters() if "router" not in name} == {torch.float32}


@pytest.mark.parametrize("capability, fast", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_gpus_that_only_emulate_bf16_compute_in_fp32(capability, fast, monkeypatch):
    """V100 (sm70) and T4 (sm75) can hold bf16 tensors (torch.cuda.is_bf16_supported() says yes) but have no bf16
    tensor cores: auto must not pick bf16 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gpu = torch.device("cuda", 0)
    assert device_mod.fast_bf16(gpu) is fast
    assert device_mod.compute_dtype("auto", gpu) == ("bfloat16" if fast else "float32")

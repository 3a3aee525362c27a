"""Training and inference on an accelerator, checked on the CPU: under tests/fake_accelerator.py the model lives on
a stand-in device and any CPU tensor or CPU generator that meets its tensors fails the test, as it would fail on
a GPU.

Each test runs the same thing on plain CPU and on the stand-in and wants the same tokens: the stand-in
computes on CPU shadows with CPU random streams, so only misplaced tensors can make the runs differ (or fail).
"""
from __future__ import annotations

import copy
import shutil
from collections.abc import Callable

import pytest
import torch
from fake_accelerator import fake_accelerator, to_accelerator
from infer_support import one_thread, prompts, randomized  # noqa: F401  (autouse fixture)
from safetensors.torch import load_file
from train_support import make_corpus, tiny_config

from longcat_flash.analysis.explain import explain
from longcat_flash.checkpoint import fresh
from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.checkpoint.hf import save_pretrained
from longcat_flash.infer import extension
from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.loader import load_for_inference
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.presets import tiny
from longcat_flash.serve.local import generate_text, load_session
from longcat_flash.train.metrics import read_metrics
from longcat_flash.train.trainer import train

SMALL = dict(prefill_chunk=8, token_budget=64, page_size=4, cache_tokens=256, max_running=4)
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
CONTROLLED = SamplingParams(max_new_tokens=6, temperature=0.9, seed=5, ignore_eos=True, presence_penalty=0.5,
                            frequency_penalty=1.0, repetition_penalty=1.3, min_p=0.05, logit_bias=((7, 3.0),))


# ---------------------------------------------------------------------------------------------- the harness

def test_mixing_the_model_device_with_cpu_tensors_fails():
    with fake_accelerator() as device:
        x = torch.randn(3, 4, device=device)
        with pytest.raises(AssertionError, match=r"aten.add.Tensor mixes .* shapes \[\(4,\)\]"):
            x + torch.ones(4)
        with pytest.raises(AssertionError, match="aten.index.Tensor mixes"):
            x[torch.tensor([0, 2])]
        assert (x * torch.tensor(2.0)).shape == (3, 4)  # a 0-dim CPU tensor is a scalar, as on CUDA


def test_generators_must_live_on_the_model_device():
    with fake_accelerator() as device:
        probs = torch.ones(5, device=device)
        with pytest.raises(AssertionError, match="CPU torch.Generator"):
            torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0))
        on_device = torch.Generator(device=device).manual_seed(0)
        assert on_device.device == device
        with pytest.raises(AssertionError, match="generator for a CPU tensor"):
            torch.rand((), generator=on_device)
        drawn = torch.multinomial(probs, 3, generator=on_device).tolist()
    assert drawn == torch.multinomial(torch.ones(5), 3, generator=torch.Generator().manual_seed(0)).tolist()


@torch.inference_mode()
def placed_computation(x: torch.Tensor, lin: torch.nn.Linear, device: torch.device) -> tuple:
    """Views, in-place writes, list and tensor indexing, constructors, host reads: everything the engine does."""
    y = lin(x).softmax(-1)  # (4, 3)
    y[1:3].mul_(torch.tensor([[2.0, 3.0, 4.0]], device=device))
    picked = y[[0, 2], torch.arange(2, device=device)]
    z = torch.zeros(4, 3, device=device).index_add_(0, torch.tensor([3, 0], device=device), y[:2])
    grown = torch.mul(z, 2, out=torch.empty(0, device=device))  # out= resizes its argument
    return y.cpu(), picked.tolist(), grown.sum().item(), y.argmax(-1).tolist(), x.new_tensor([5]).tolist()


def test_a_placed_computation_gives_the_cpu_numbers():
    torch.manual_seed(0)
    x, lin = torch.randn(4, 5), torch.nn.Linear(5, 3)
    expected = placed_computation(x, lin, torch.device("cpu"))
    with fake_accelerator() as device:
        moved = x.to(device)
        assert moved.device == device and not moved.is_meta  # to the code under test, a device like any other
        got = placed_computation(moved, to_accelerator(copy.deepcopy(lin)), device)
        assert lin.weight.device.type == "cpu" and got[0].device.type == "cpu"
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1:] == expected[1:]


# ---------------------------------------------------------------------------------------------- inference

@pytest.fixture(scope="module")
def model():
    return randomized()


def on_both(run: Callable[[torch.device], object]) -> None:
    """run(device) on the CPU and on the stand-in give the same result."""
    expected = run(torch.device("cpu"))
    with fake_accelerator() as device:
        assert run(device) == expected


@pytest.mark.parametrize("k", [0, 2])  # plain decode; MTP drafts with rejection sampling
@pytest.mark.parametrize("params", [[GREEDY, SEEDED, GREEDY], [GREEDY, CONTROLLED, SEEDED]],
                         ids=["plain", "logit-controls"])
def test_engine_on_the_device(model, k, params):
    ps = prompts((5, 11, 3), seed=3)

    def run(device: torch.device) -> list[list[int]]:
        placed = model if device.type == "cpu" else to_accelerator(copy.deepcopy(model))
        engine = Engine(placed, EngineConfig(speculative=k, **SMALL))
        return engine.generate(ps, params)

    on_both(run)


@pytest.mark.parametrize("quantize, keep", [("int8", {"keep_top": 1}), ("int4-mixed", {})])
def test_quantized_fused_model_loads_and_runs_on_the_device(model, tmp_path, monkeypatch, quantize, keep):
    """load_for_inference builds, fuses and quantizes on the device (int4's clip search too), calibrating with host
    ids. The CPU run takes the dequantize reference too (the AVX-512 kernel is CPU-only and rounds differently), so
    tokens compare exactly."""
    monkeypatch.setattr(extension, "compiled", lambda: None)
    save_pretrained(model, tmp_path)
    ps, calibration = prompts((4, 9), seed=4), torch.tensor(prompts((12,), seed=5))  # (1, 12) on the host

    def run(device: torch.device) -> tuple:
        loaded, report = load_for_inference(tmp_path, quantize=quantize, calibration=calibration, device=device,
                                            **keep)
        return report.kept, Engine(loaded, EngineConfig(speculative=2, **SMALL)).generate(ps, [SEEDED, GREEDY])

    on_both(run)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return init_checkpoint(tiny(), tmp_path_factory.mktemp("device") / "tiny", dtype=torch.float32)


@pytest.mark.parametrize("direct_max_params", [fresh.DIRECT_MAX_PARAMS, 0])  # built there; laid out on meta first
def test_fresh_checkpoint_is_built_on_the_device(tmp_path, monkeypatch, direct_max_params):
    monkeypatch.setattr(fresh, "DIRECT_MAX_PARAMS", direct_max_params)

    def run(device: torch.device) -> dict[str, torch.Tensor]:
        out = init_checkpoint(tiny(), tmp_path / device.type, dtype=torch.float32, device=device)
        return load_file(out / "model.safetensors")

    expected = run(torch.device("cpu"))
    with fake_accelerator() as device:
        got = run(device)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert all(t.isfinite().all() for t in got.values())


def test_generate_text_and_explain_on_the_device(checkpoint):
    """Off the CPU, unquantized, the MoE stays the model's (grouped GEMMs, no host reads of the routing); the text
    is the CPU's, whose MoE twin loops over the hit experts."""
    from longcat_flash.infer.fused import FusedMoE

    def run(device: torch.device) -> tuple:
        engine, tokenizer = load_session(checkpoint, speculative=1, device=device)
        assert engine.device == device
        twins = [m for m in engine.model.modules() if isinstance(m, FusedMoE)]
        assert bool(twins) == (device.type == "cpu")
        text = generate_text(engine, tokenizer, tokenizer.encode("def f(x):"), SEEDED).text
        return text, explain(checkpoint, "for i in range(3): print(i)", device=device).counts

    on_both(run)


# ---------------------------------------------------------------------------------------------- training

def test_training_runs_on_the_device(tmp_path):
    """A whole run on the stand-in: build on meta and materialise, train steps (losses, budget controller, metric
    reductions, monitors), validation, checkpoints, the HF export and the sample, all on the model's device; the
    losses equal the CPU run's (to rounding: off the CPU the MoE computes every slot's row and masks the zero-expert
    ones instead of cutting them, so the GEMMs block differently), and the device's step-2 checkpoint resumes on the
    CPU to the same curve. (Resuming on the stand-in itself is not possible: DCP treats meta tensors as "allocate
    for me".)"""
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    cfg = tiny_config(corpus, cache, "max_steps=4", "dtype=float32", "checkpoint.save_every=2", "eval_every=2",
                      "sample_tokens=4", "loss.monitor_every=3", "checkpoint.keep=2")

    def run(device: torch.device) -> list[float]:
        out = tmp_path / device.type
        summary = train(cfg, out, progress=False, device=device)
        assert summary["sample"].startswith(cfg.sample_prompt) and (out / "model.safetensors").is_file()
        return [r["loss"] for r in read_metrics(out)]

    expected = run(torch.device("cpu"))
    with fake_accelerator() as device:
        assert run(device) == pytest.approx(expected, rel=1e-6)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "meta", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    train(cfg, resumed, resume=True, progress=False)
    assert [r["loss"] for r in read_metrics(resumed)] == pytest.approx(expected, rel=1e-6)

"""Helpers shared by the inference tests: a randomized tiny model, one thread, a reference greedy decoder, a
record of the compiled kernels' calls, and the check of a bf16 GEMM's result."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longcat_flash.infer import extension
from longcat_flash.model import Transformer
from longcat_flash.presets import tiny


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and an OpenMP barrier on a busy 2-core box costs ms.
    Import it into a test module to make it autouse there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomized(cfg=None, seed: int = 0) -> Transformer:
    """Weights large enough that routing, attention and the MTP head all matter (std 0.1, biased routers)."""
    torch.manual_seed(seed)
    model = Transformer(cfg or tiny()).eval()
    model.init_weights(0.1)
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.normal_(0.0, 0.05)
    return model


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Full forward over the whole sequence for every new token: no cache at all."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(lengths: tuple[int, ...], vocab: int = 256, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def record_kernel_calls(monkeypatch, names: set[str]) -> list[str]:
    """From now on (for the test), the names of the compiled kernels' entry points in `names` called, in order."""
    build, calls = extension.compiled, []

    class Counted:
        def __getattr__(self, name):
            fn = getattr(build(), name)
            return (lambda *args: calls.append(name) or fn(*args)) if name in names else fn

    monkeypatch.setattr(extension, "compiled", lambda: Counted())
    return calls


def assert_bf16_gemm(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y == x @ w^T summed in fp32 and rounded once to bf16, up to the order of the fp32 sums: every value within
    one bf16 step of it, and all but a few exactly equal (a weight off by 0.1% moves a quarter of them)."""
    expected = F.linear(x.float(), w.float()).bfloat16()
    assert y.dtype == torch.bfloat16 and y.shape == expected.shape
    step = expected.float().abs().clamp(min=1e-3) * 2 ** -7
    assert bool(((y.float() - expected.float()).abs() <= step).all())
    assert float((y == expected).float().mean()) > 0.97


def bos_adding(tokenizer):
    """`tokenizer` with a Llama-style post-processor that puts bos before every text encoded with special tokens."""
    import tokenizers

    from longcat_flash.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_id)])
    return Tokenizer(backend)

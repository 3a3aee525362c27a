"""Helpers shared by the inference tests: a randomized tiny model, one thread, and a reference greedy decoder."""
from __future__ import annotations

import pytest
import torch

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

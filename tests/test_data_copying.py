"""Copy windows (data.copy_fraction): what they hold, what is trained, and how they mix into the batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longcat_flash.data import IGNORE, CopyMix, ResumableSampler, TokenDataset, ordinary_ids, split_windows
from longcat_flash.data.copying import RUN_LENGTHS

RESERVED = (0, 1, 2, 3, 4)  # pad, bos, eos and the tool-call tags


@pytest.fixture
def text() -> TokenDataset:
    return TokenDataset(np.arange(40 * 256 + 1) % 500 + 5, seq_len=256, val_fraction=0.0)  # 40 windows


def mix(text: TokenDataset, fraction: float = 0.2, seed: int = 0) -> CopyMix:
    return CopyMix(text, fraction, ordinary_ids(512, RESERVED), seed)


def pairs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run-and-copy in a copy window, read off its labels: each pair is an untrained stretch
    (the run and the copy's first token) followed by a trained one (the rest of the copy)."""
    trained = (labels != IGNORE).tolist()
    edges = [i for i in range(1, len(trained)) if trained[i - 1] and not trained[i]]  # a trained stretch ends
    starts = [0, *edges]
    return list(zip(starts, [*edges, len(trained)]))


def test_a_copy_window_is_runs_given_twice_and_only_second_copies_train(text: TokenDataset) -> None:
    data = mix(text)
    whole = 0
    for i in range(len(text), len(data)):
        batch = data.batch([i])
        tokens, labels = batch.tokens[0], batch.labels[0]
        assert (batch.documents == 0).all() and len(tokens) == text.seq_len + 1  # one document per window
        assert not np.isin(tokens.numpy(), RESERVED).any()
        for start, end in pairs(labels):
            run_tokens, run_labels = tokens[start:end], labels[start:end]
            trained = (run_labels != IGNORE).nonzero().flatten()
            if end == len(tokens) and (len(trained) == 0 or len(run_tokens) < 2 * (int(trained[0]) - 1)):
                continue  # the window's end cuts the last pair
            n = int(trained[0]) - 1  # the run's length: the copy's first token is not trained
            assert RUN_LENGTHS[0] <= n <= RUN_LENGTHS[1] and len(run_tokens) == 2 * n
            assert torch.equal(run_tokens[n:], run_tokens[:n])  # the second copy repeats the first
            assert (run_labels[: n + 1] == IGNORE).all() and torch.equal(run_labels[n + 1:], run_tokens[n + 1:])
            whole += 1
    assert whole >= 2 * (len(data) - len(text))  # 257 tokens hold at least two whole pairs of runs <= 64


def test_copy_windows_depend_on_index_and_seed_only(text: TokenDataset) -> None:
    a, b, other = mix(text), mix(text), mix(text, seed=1)
    i = len(text) + 3
    one, two = a.batch([i]), b.batch([i, i - 1])
    assert torch.equal(one.tokens[0], two.tokens[0]) and torch.equal(one.labels[0], two.labels[0])
    assert not torch.equal(a.batch([i]).tokens, other.batch([i]).tokens)
    assert not torch.equal(a.batch([i]).tokens, a.batch([i + 1]).tokens)


def test_text_windows_are_unchanged_and_fully_trained(text: TokenDataset) -> None:
    data = mix(text)
    picked = [len(text), 5, len(text) + 1, 17]
    batch = data.batch(picked)
    inputs, targets, documents = split_windows(batch)
    assert documents is None  # every window is one document: the forward's plain causal path
    for row, i in ((1, 5), (3, 17)):
        assert torch.equal(batch.tokens[row], text.batch([i])[0])
        assert torch.equal(targets[row], text.batch([i])[0, 1:])


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.75])
def test_the_sampler_mixes_about_the_asked_share(text: TokenDataset, fraction: float) -> None:
    data = mix(text, fraction)
    assert abs(data.num_copies / len(data) - fraction) < 0.02
    sampler = ResumableSampler(data, seed=3)
    drawn = sampler.next_indices(len(data))
    assert sorted(drawn.tolist()) == list(range(len(data)))  # one epoch: every text and copy window once


def test_bad_fraction_or_vocabulary_is_refused(text: TokenDataset) -> None:
    with pytest.raises(ValueError, match="copy fraction"):
        CopyMix(text, 1.0, ordinary_ids(512, RESERVED), 0)
    with pytest.raises(ValueError, match="ordinary token ids"):
        CopyMix(text, 0.5, ordinary_ids(3, (0, 1, 2)), 0)

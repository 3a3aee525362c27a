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


def test_a_copy_window_is_runs_given_twice_and_only_second_copies_train(text: TokenDataset) -> None:
    data = mix(text)
    whole_pairs = 0
    for i in range(len(text), len(data)):
        batch = data.batch([i])
        tokens, labels, documents = batch.tokens[0], batch.labels[0], batch.documents[0]
        docs = documents.unique_consecutive()
        assert torch.equal(docs, torch.arange(len(docs)))  # one document per pair, in order
        for doc in docs:
            run_tokens, run_labels = tokens[documents == doc], labels[documents == doc]
            last = doc == docs[-1]
            trained = (run_labels != IGNORE).nonzero().flatten()
            if len(trained) == 0:  # only the window's end may cut a pair before its second copy trains
                assert last
                continue
            n = int(trained[0]) - 1  # the run's length: the second copy's first token is not trained
            assert RUN_LENGTHS[0] <= n <= RUN_LENGTHS[1] and (len(run_tokens) == 2 * n or last)
            assert torch.equal(run_tokens[n:], run_tokens[: len(run_tokens) - n])  # the second copy repeats the first
            assert (run_labels[: n + 1] == IGNORE).all() and torch.equal(run_labels[n + 1:], run_tokens[n + 1:])
            whole_pairs += not last
        assert not np.isin(tokens.numpy(), RESERVED).any() and len(tokens) == text.seq_len + 1
    assert whole_pairs >= len(data) - len(text)


def test_copy_windows_depend_on_index_and_seed_only(text: TokenDataset) -> None:
    a, b, other = mix(text), mix(text), mix(text, seed=1)
    i = len(text) + 3
    one, two = a.batch([i]), b.batch([i, i - 1])
    assert all(torch.equal(x[0], y[0]) for x, y in ((one.tokens, two.tokens), (one.labels, two.labels),
                                                      (one.documents, two.documents)))
    assert not torch.equal(a.batch([i]).tokens, other.batch([i]).tokens)
    assert not torch.equal(a.batch([i]).tokens, a.batch([i + 1]).tokens)


def test_text_windows_are_unchanged_and_fully_trained(text: TokenDataset) -> None:
    data = mix(text)
    picked = [len(text), 5, len(text) + 1, 17]
    batch = data.batch(picked)
    inputs, targets, documents = split_windows(batch)
    for row, i in ((1, 5), (3, 17)):
        assert torch.equal(batch.tokens[row], text.batch([i])[0])
        assert torch.equal(targets[row], text.batch([i])[0, 1:]) and (documents[row] == 0).all()


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

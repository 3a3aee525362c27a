"""The text side: incremental detokenization with stop strings (no server needed)."""
from __future__ import annotations

import pytest

from longcat_flash.serve.text import TextState
from longcat_flash.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["hello world, hello there. héllo wörld ✓ " * 50], 300)


def stream(state: TextState, ids: list[int]) -> list[str]:
    return [state.delta(ids[: i + 1], final=i == len(ids) - 1) for i in range(len(ids))]


def test_pieces_concatenate_to_the_decoded_text(tokenizer):
    ids = tokenizer.encode("héllo wörld ✓ done")
    assert "".join(stream(TextState(tokenizer), ids)) == tokenizer.decode(ids)


def test_no_piece_ends_inside_a_character(tokenizer):
    ids = tokenizer.encode("✓✓✓")  # 3-byte characters, byte-level tokens
    pieces = stream(TextState(tokenizer), ids)
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "✓✓✓"


def test_stop_string_is_cut_and_never_leaks(tokenizer):
    ids = tokenizer.encode("hello world, hello there.")
    state = TextState(tokenizer, stop=["o th"])
    pieces = []
    for i in range(len(ids)):
        pieces.append(state.delta(ids[: i + 1], final=False))
        if state.stop_hit(ids[: i + 1]):
            pieces.append(state.delta(ids[: i + 1], final=True))
            break
    assert "".join(pieces) == "hello world, hell" == state.text
    assert not any("o th" in p for p in pieces)

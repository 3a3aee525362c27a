"""The text side: incremental detokenization with stop strings (no server needed)."""
from __future__ import annotations

import time

import pytest
from tokenizer_support import sentencepiece_tokenizer

from longcat_flash.serve.text import MAX_PENDING_IDS, TextState
from longcat_flash.tokenizer import train_tokenizer

SAMPLE = "hello world, hello there. héllo wörld ✓ "


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([SAMPLE * 50], 300)


def stream(state: TextState, ids: list[int], step: int = 1) -> list[str]:
    """Feed `ids` `step` at a time (MTP speculation delivers several per engine step), the last batch final."""
    chunks = [ids[i: i + step] for i in range(0, len(ids), step)]
    return [state.feed(chunk, final=i == len(chunks) - 1) for i, chunk in enumerate(chunks)]


@pytest.mark.parametrize("step", [1, 3])
def test_pieces_concatenate_to_the_decoded_text(tokenizer, step):
    ids = tokenizer.encode("héllo wörld ✓ done")
    state = TextState(tokenizer)
    assert "".join(stream(state, ids, step)) == tokenizer.decode(ids) == state.text
    assert state.tokens == len(ids) and not state.stopped


def test_no_piece_ends_inside_a_character(tokenizer):
    ids = tokenizer.encode("✓✓✓")  # 3-byte characters, byte-level tokens
    pieces = stream(TextState(tokenizer), ids)
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "✓✓✓"


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("hello") + [tokenizer.eos_id] + tokenizer.encode(" there")
    assert "".join(stream(TextState(tokenizer), ids)) == "hello there"


def test_invalid_bytes_come_out_as_replacement_characters_and_stay_bounded(tokenizer):
    lead = tokenizer.encode("✓")[0]  # a lone UTF-8 lead byte never completes when repeated
    ids = [lead] * (3 * MAX_PENDING_IDS) + tokenizer.encode(" ok")
    state = TextState(tokenizer)
    pieces = stream(state, ids)
    assert "".join(pieces).endswith(" ok") and "\ufffd" in "".join(pieces)
    assert len(state._pending) == 0 and max(map(len, pieces)) <= MAX_PENDING_IDS + 3


@pytest.mark.parametrize("step", [1, 4])
def test_stop_string_is_cut_and_never_leaks(tokenizer, step):
    ids = tokenizer.encode("hello world, hello there.")
    state = TextState(tokenizer, stop=["o th", "zzz"])
    pieces = []
    for i in range(0, len(ids), step):
        pieces.append(state.feed(ids[i: i + step]))
        if state.stopped:
            break
    assert "".join(pieces) == "hello world, hell" == state.text
    completing = next(k for k in range(len(ids)) if "o th" in tokenizer.decode(ids[:k]))
    assert state.tokens == completing  # usage counts the ids up to the stop, not what the engine made after it
    assert state.feed(ids[-1:], final=True) == ""  # nothing after a stop, even from a late engine output


def test_tail_that_might_start_a_stop_string_waits_for_the_end(tokenizer):
    ids = tokenizer.encode("hello wor")
    state = TextState(tokenizer, stop=["world!"])
    assert "".join(state.feed([i]) for i in ids) == "hell"  # "o wor" could still become "world!"
    assert state.feed([], final=True) == "o wor" and not state.stopped


@pytest.mark.parametrize("blocks", [None, ("<T>", "</T>")])
def test_cost_per_token_does_not_grow_with_the_text(tokenizer, blocks):
    """O(1) per id: 10x the tokens costs about 10x the time (the old full re-decode was quadratic), inside a block
    too (a tool call's long argument: its text was searched whole at every id)."""
    ids = tokenizer.encode("<T>" + SAMPLE * 3000 if blocks else SAMPLE * 400)  # a block: long enough to tell

    def seconds(n: int) -> float:
        """This thread's CPU time, not the clock's: another test's processes may share the cores (pytest -n 2),
        and a 100 ms run is cut into time slices where a 3 ms one is not (the clock's ratio was 35-46 at a load of 6)."""
        state, start = TextState(tokenizer, stop=["never there"], blocks=blocks), time.thread_time()
        for token in ids[:n]:
            state.feed([token])
        return time.thread_time() - start
    seconds(200)
    assert min(seconds(len(ids)) for _ in range(3)) / min(seconds(len(ids) // 10) for _ in range(3)) < 25


@pytest.mark.parametrize("step", [1, 3])
def test_stop_strings_are_not_looked_for_inside_blocks(tokenizer, step):
    """A tool call's block passes whole, even a tag that arrives piece by piece; text around it is scanned."""
    ids = tokenizer.encode("ab<T>no stop</T>c stop d")
    state = TextState(tokenizer, stop=["stop"], blocks=("<T>", "</T>"))
    assert "".join(stream(state, ids, step)) == "ab<T>no stop</T>c " and state.stopped
    plain = TextState(tokenizer, stop=["stop"])
    assert "".join(stream(plain, ids, step)) == "ab<T>no " and plain.stopped


@pytest.mark.parametrize("step", [1, 2])
def test_the_first_token_reads_as_in_the_whole_sequence_after_the_prompt(step):
    """A SentencePiece decoder strips a text's leading space: decoded without the prompt before it, the reply to
    "hello" began "t t" where the sequence reads "hello t t" (and a stop string " t" matched one token late)."""
    tokenizer = sentencepiece_tokenizer()
    prompt, t = tokenizer.encode("hello"), tokenizer.backend.token_to_id("▁t")
    whole = tokenizer.decode([*prompt, t, t])
    assert "".join(stream(TextState(tokenizer, context=prompt), [t, t], step)) == " t t" == whole[len("hello"):]
    stopped = TextState(tokenizer, stop=[" t"], context=prompt)
    assert "".join(stream(stopped, [t, t], step)) == "" and stopped.tokens == 1


@pytest.mark.parametrize("step", [1, 3])
def test_a_closing_tag_inside_a_json_string_does_not_end_the_block(tokenizer, step):
    """A tool call's argument may hold the tag's text: the block ends at the first closing tag outside a string,
    as the tool-call parser reads it, so a stop string later in the argument does not cut the call."""
    ids = tokenizer.encode('a<T>{"x": "\\"</T> stop"}</T> stop b')
    state = TextState(tokenizer, stop=["stop"], blocks=("<T>", "</T>"))
    assert "".join(stream(state, ids, step)) == 'a<T>{"x": "\\"</T> stop"}</T> ' and state.stopped


@pytest.mark.parametrize("step", [1, 3])
def test_a_block_that_is_no_json_ends_at_its_first_closing_tag(tokenizer, step):
    """A malformed call (an odd quote) ends at its first closing tag as before, so a stop string after it still
    stops the reply (read as inside a string, the rest of the reply was one block, never scanned)."""
    ids = tokenizer.encode('a<T>{"q": "5" tall"}</T> more stop b')
    state = TextState(tokenizer, stop=["stop"], blocks=("<T>", "</T>"))
    assert "".join(stream(state, ids, step)) == 'a<T>{"q": "5" tall"}</T> more ' and state.stopped


@pytest.mark.parametrize("step", [1, 3])
def test_a_stop_string_the_opening_tag_starts_with_still_stops_where_no_tag_follows(tokenizer, step):
    ids = tokenizer.encode("ab<T>q</T>c<Tz")
    state = TextState(tokenizer, stop=["<T"], blocks=("<T>", "</T>"))
    assert "".join(stream(state, ids, step)) == "ab<T>q</T>c" and state.stopped
    ends_like_a_tag = TextState(tokenizer, stop=["b<"], blocks=("<T>", "</T>"))
    assert "".join(stream(ends_like_a_tag, tokenizer.encode("ab<"), step)) == "a" and ends_like_a_tag.stopped

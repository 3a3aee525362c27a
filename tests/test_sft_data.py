"""SFT data: rows are checked with errors naming file, line and field; the loss mask covers exactly the assistant
turns (found here from the rendered text, independently of the code under test); packing and over-long rows."""
from __future__ import annotations

import gzip
import json
import random
import re
import shutil

import numpy as np
import pytest
from sft_support import conversation, write_conversations

from longcat_flash.data.conversation_packing import conversation_datasets, pack
from longcat_flash.data.conversation_tokens import tokenize
from longcat_flash.data.conversations import ConversationError, parse_row, read_conversations
from longcat_flash.data.tool_dialogues import iter_conversations
from longcat_flash.tokenizer import Tokenizer, stdlib_tokenizer

CHATML = ("{% if tools %}<|im_start|>tools\n{{ tools | tojson }}\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
          "{% for c in m['tool_calls'] or [] %}<longcat_tool_call>{{ c['function']['name'] }}</longcat_tool_call>{% endfor %}"
          "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return stdlib_tokenizer(512)


def assistant_spans(text: str, template: str) -> list[tuple[int, int]]:
    """Where the assistant writes, read off the rendered text: from after its turn marker through eos."""
    start = " ASSISTANT:" if template == "longcat" else "<|im_start|>assistant\n"
    return [(m.end(), text.index("</s>", m.end()) + len("</s>")) for m in re.finditer(re.escape(start), text)]


def rows(n: int) -> list[dict]:
    rng = random.Random(1)
    return [conversation(rng) for _ in range(n)] + list(iter_conversations(12, seed=3))


@pytest.mark.parametrize("template", ["longcat", "chatml"])
def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer, template):
    if template == "chatml":
        tokenizer = Tokenizer(tokenizer.backend, chat_template=CHATML)
    for i, row in enumerate(rows(12)):
        conv = parse_row(row, f"row{i}")
        ids, trained = tokenize(tokenizer, conv)
        text = tokenizer.apply_chat_template(conv.messages, add_generation_prompt=False, tools=conv.tools)
        # each token's characters in the rendered text (the synthetic data is ASCII: one byte, one character)
        ends = [len(tokenizer.decode(ids[:k + 1], skip_special_tokens=False)) for k in range(len(ids))]
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        spans = assistant_spans(text, template)
        assert len(spans) == sum(m["role"] == "assistant" for m in conv.messages)
        expected = [any(a <= start and end <= b for a, b in spans) for start, end in zip([0, *ends[:-1]], ends)]
        assert trained.tolist() == expected, row
        assert trained.any() and not trained.all()
        assert ids[trained][-1] == tokenizer.eos_id  # the end-of-turn token is trained


@pytest.mark.parametrize("drop, field", [
    ("{% if tools %}<|im_start|>tools\n{{ tools | tojson }}\n{% endif %}", "tools"),
    ("{% for c in m['tool_calls'] or [] %}<longcat_tool_call>{{ c['function']['name'] }}</longcat_tool_call>{% endfor %}",
     "messages[1].tool_calls[0]"),
    ("{{ eos_token }}", "messages[1]"),
])
def test_a_template_that_drops_what_training_needs_is_refused_naming_the_field(tokenizer, drop, field):
    """A model's own template without tools or calls (a plain ChatML one) trained every tool-call turn as an empty
    answer, and one whose turns lack eos taught a model that never stops; both without a word."""
    assert drop in CHATML
    tokenizer = Tokenizer(tokenizer.backend, chat_template=CHATML.replace(drop, ""))
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    row = {"tools": [weather], "messages": [
        {"role": "user", "content": "get_weather in Oslo?"},  # the name in the text: still refused
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    with pytest.raises(ConversationError, match=re.escape(f"row: {field}")):
        tokenize(tokenizer, parse_row(row, "row"))


def test_an_assistant_message_of_weight_0_is_rendered_but_not_trained(tokenizer):
    """OpenAI's fine-tuning format: `weight: 0` on an assistant message leaves it in the context, out of the loss."""
    messages = [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "bleu"},
                {"role": "user", "content": "in English?"}, {"role": "assistant", "content": "blue"}]
    weighted = [*messages[:1], {**messages[1], "weight": 0}, *messages[2:3], {**messages[3], "weight": 1}]
    ids, trained = tokenize(tokenizer, parse_row({"messages": messages}, "x"))
    ids_w, trained_w = tokenize(tokenizer, parse_row({"messages": weighted}, "x"))
    assert np.array_equal(ids, ids_w)  # the same text: the weight is not rendered
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    first, second = assistant_spans(text, "longcat")
    ends = np.cumsum([len(tokenizer.decode([i], skip_special_tokens=False)) for i in ids])
    in_first = (ends > first[0]) & (ends <= first[1])
    assert trained[in_first].all() and not trained_w[in_first].any()
    assert np.array_equal(trained_w, trained & ~in_first)


def test_a_developer_message_reads_as_a_system_message(tokenizer):
    """OpenAI's newer name for the system role, read as the server reads it."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    as_developer = [{**messages[0], "role": "developer"}, *messages[1:]]
    want, got = tokenize(tokenizer, parse_row({"messages": messages}, "x")), \
        tokenize(tokenizer, parse_row({"messages": as_developer}, "x"))
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    assert "Be brief." in tokenizer.decode(got[0])


def test_trl_prompt_completion_rows_train_only_the_completion(tokenizer):
    """TRL's conversational prompt-completion rows: the conversation is prompt + completion, and the prompt's
    assistant turns are context (as `weight: 0` makes them), whatever the completion holds (text, a call, a
    result and an answer)."""
    for row in (r for r in rows(40) if sum(m["role"] == "assistant" for m in r["messages"]) >= 2):
        messages = row["messages"]
        cut = max(k for k, m in enumerate(messages) if m["role"] == "assistant")  # the completion: the last turn
        split = {"prompt": messages[:cut], "completion": messages[cut:], **({"tools": row["tools"]} if "tools" in row
                                                                            else {})}
        context = {**row, "messages": [{**m, "weight": 0} if m["role"] == "assistant" and k < cut else m
                                       for k, m in enumerate(messages)]}
        got, want = tokenize(tokenizer, parse_row(split, "x")), tokenize(tokenizer, parse_row(context, "x"))
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), row
        assert not np.array_equal(got[1], tokenize(tokenizer, parse_row(row, "x"))[1])  # the prompt's turns are out


SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "tool": "observation"}


def as_sharegpt(row: dict, calls_as_list: bool, one_observation: bool = False) -> dict:
    """`row` as LLaMA-Factory writes ShareGPT: a `system` column, tools as a JSON string of function objects, an
    assistant turn of calls as a `function_call` turn (one call, or a list of them); with `one_observation`, the
    results of a turn of several calls as one observation holding their JSON list (LLaMA-Factory's turns
    alternate)."""
    messages = row["messages"]
    turns = []
    for m in messages[1:] if messages[0]["role"] == "system" else messages:
        if one_observation and m["role"] == "tool" and turns[-1]["from"] == "observation":
            turns[-1]["value"] = json.dumps(json.loads(turns[-1]["value"]) + [m["content"]])
        elif one_observation and calls_as_list and m["role"] == "tool" and len(json.loads(turns[-1]["value"])) > 1:
            turns.append({"from": "observation", "value": json.dumps([m["content"]])})
        elif m.get("tool_calls"):
            calls = [c["function"] for c in m["tool_calls"]]
            turns.append({"from": "function_call", "value": json.dumps(calls if calls_as_list else calls[0])})
        else:
            turns.append({"from": SHAREGPT_FROM[m["role"]], "value": m["content"]})
    out = {"conversations": turns}
    if messages[0]["role"] == "system":
        out["system"] = messages[0]["content"]
    if "tools" in row:
        out["tools"] = json.dumps([t["function"] for t in row["tools"]])
    return out


def test_sharegpt_rows_read_as_the_openai_conversation(tokenizer):
    """ShareGPT rows render and train exactly as the same OpenAI rows."""
    compared = 0
    for k, row in enumerate(rows(40)):
        if any(m.get("content") and m.get("tool_calls") or len(m.get("tool_calls", [])) > 1 for m in row["messages"]):
            continue  # a ShareGPT turn holds text or calls, not both
        got = tokenize(tokenizer, parse_row(as_sharegpt(row, calls_as_list=k % 2 == 1), "x"))
        want = tokenize(tokenizer, parse_row(row, "x"))
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), row
        compared += 1
    assert compared >= 20
    plain = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    blank = {**plain, "tools": "", "system": " "}  # how converted data sets mark "no tools", "no system prompt"
    assert parse_row(blank, "x") == parse_row(plain, "x")
    assert parse_row({**plain, "tools": "null"}, "x") == parse_row(plain, "x")  # a missing column written as JSON
    with pytest.raises(ConversationError, match=r"x: conversations\[1\].from: 'bot' is not one of"):
        parse_row({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "a"}]}, "x")
    # errors name the row's own fields (they named the OpenAI fields it is read as: .content, .role, .tool_calls)
    call = json.dumps({"name": "f", "arguments": {}, "id": "c1"})
    for turns, field in (([{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}], r"conversations\[0\].value"),
                         ([{"from": "human", "value": "q"}, {"from": "function_call", "value": call}],
                          r"conversations\[1\].value.id"),
                         ([{"from": "human", "value": "q"}, {"from": "function_call", "value": f"[{call}]"}],
                          r"conversations\[1\].value\[0\].id"),
                         ([{"from": "gpt", "value": "a"}], r"conversations\[0\].from"),
                         ([{"from": "human", "value": "q"}, {"from": "system", "value": "s"}],
                          r"conversations\[1\].from")):
        with pytest.raises(ConversationError, match=rf"x: {field}: "):
            parse_row({"conversations": turns}, "x")


def test_sharegpt_parallel_calls_are_answered_per_call_or_by_one_observation_list(tokenizer):
    """A turn of several calls is answered by one observation per call, or by one observation holding the list of
    the results (a row whose turns alternate, as LLaMA-Factory requires); both read as the OpenAI rows."""
    compared = 0
    for row in rows(40):
        if not any(len(m.get("tool_calls", [])) > 1 and not m.get("content") for m in row["messages"]):
            continue
        want = tokenize(tokenizer, parse_row(row, "x"))
        for one in (False, True):
            got = tokenize(tokenizer, parse_row(as_sharegpt(row, calls_as_list=True, one_observation=one), "x"))
            assert all(np.array_equal(a, b) for a, b in zip(got, want)), row
        compared += 1
    assert compared >= 2
    calls = json.dumps([{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}])
    for answer in ("both done", "[ERROR] tool timed out", json.dumps(["only one"]), json.dumps({"f": 1, "g": 2})):
        turns = [{"from": "human", "value": "q"}, {"from": "function_call", "value": calls},
                 {"from": "observation", "value": answer}, {"from": "gpt", "value": "a"}]
        with pytest.raises(ConversationError, match=r"x: conversations\[2\].value: one observation answers the 2 "
                                                     r"calls .* a JSON list of 2 results"):
            parse_row({"conversations": turns}, "x")
    turns[2]["value"] = "[" * 120 + "]" * 120  # a list, but one no reader should walk: named as such
    with pytest.raises(ConversationError, match=r"x: conversations\[2\].value(\[0\])+: nested more than 100"):
        parse_row({"conversations": turns}, "x")


def test_alpaca_rows_read_as_the_openai_conversation(tokenizer):
    """Alpaca rows as LLaMA-Factory reads them: instruction and input on two lines as the user's turn, the output as
    the assistant's, `history` pairs as earlier turns (trained too), `system` first."""
    alpaca = {"instruction": "Translate to French.", "input": "good night", "output": "bonne nuit",
              "system": "Be brief.", "history": [["hi", "hello"], ["how are you?", "well"]]}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you?"},
                {"role": "assistant", "content": "well"},
                {"role": "user", "content": "Translate to French.\ngood night"},
                {"role": "assistant", "content": "bonne nuit"}]
    got, want = tokenize(tokenizer, parse_row(alpaca, "x")), tokenize(tokenizer, parse_row({"messages": messages}, "x"))
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    bare = parse_row({"instruction": "Name a colour.", "input": "", "output": "Blue."}, "x")
    assert bare.messages == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]


def as_legacy_functions(row: dict) -> dict:
    """`row` in OpenAI's legacy function-calling format: `functions` for `tools`, one `function_call` for an
    assistant turn's one call, a `function` message named after the call (no id) for its result."""
    messages, called = [], None
    for m in row["messages"]:
        legacy = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}
        if m.get("tool_calls"):
            (call,) = m["tool_calls"]
            legacy["function_call"], called = call["function"], call["function"]["name"]
        if m["role"] == "tool":
            legacy.update(role="function", name=called)
        messages.append(legacy)
    return {"messages": messages, **({"functions": [t["function"] for t in row["tools"]]} if "tools" in row else {})}


def test_openai_legacy_function_calling_rows_read_as_tool_calls(tokenizer):
    """`functions`, `function_call` and `function` messages (OpenAI's fine-tuning format before tools) render and
    train exactly as the same rows with tools, tool_calls and tool messages."""
    compared = 0
    for row in rows(40):
        if any(len(m.get("tool_calls", [])) > 1 for m in row["messages"]):
            continue  # a legacy assistant turn holds one call
        got = tokenize(tokenizer, parse_row(as_legacy_functions(row), "x"))
        want = tokenize(tokenizer, parse_row(row, "x"))
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), row
        compared += any(m.get("tool_calls") for m in row["messages"])
    assert compared >= 10


def test_columns_named_in_ignore_columns_are_skipped(tmp_path):
    """Data sets carry columns that are not part of a conversation (an id, a source): named, they are skipped;
    unnamed, the error says how to name them."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    plain = list(iter_conversations(10, seed=6))
    tagged = [{"id": i, "source": "synthetic", **r} for i, r in enumerate(plain)]
    for name, data in (("plain", plain), ("tagged", tagged)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        pq.write_table(pa.Table.from_pylist(data), tmp_path / f"{name}.parquet")
    canonical = lambda c: json.dumps([c.messages, c.tools], sort_keys=True)  # noqa: E731
    for suffix in ("jsonl", "parquet"):
        want = [canonical(c) for c in read_conversations(tmp_path / f"plain.{suffix}")]
        assert [canonical(c) for c in read_conversations(tmp_path / f"tagged.{suffix}", ("id", "source"))] == want
        with pytest.raises(ConversationError, match=r"tagged\.\w+:1: (id|source): unsupported field .*"
                                                     r"--set sft.ignore_columns="):
            read_conversations(tmp_path / f"tagged.{suffix}", ("id",) if suffix == "parquet" else ())


def test_tool_call_tags_are_single_trained_tokens(tokenizer):
    row = next(r for r in rows(30) if "tools" in r)
    ids, trained = tokenize(tokenizer, parse_row(row, "x"))
    open_id = tokenizer.encode("<longcat_tool_call>", allow_special=True)
    assert len(open_id) == 1
    tag_positions = np.flatnonzero(ids == open_id[0])
    # the tools block in the system prompt mentions the tag too (untrained); the call itself is trained
    assert trained[tag_positions].any() and not trained[tag_positions].all()


BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
     "messages[1].role: 'robot' is not one of system/user/assistant/tool"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]},
     "messages[0].content[0].type: 'image_url' is not supported (only text parts)"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "a"}]},
     "messages[0].name: unsupported field"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a",
                                                       "reasoning_content": "..."}]},
     "messages[1].reasoning_content: unsupported field"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a",
                                                       "annotations": [{"type": "url_citation"}]}]},
     "messages[1].annotations: unsupported field"),  # one that carries something is still refused
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages: no assistant message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments: not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "3"}]},
     "messages[1].role: a tool message must follow an assistant message with tool_calls"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "3"}]},
     "messages[2].tool_call_id: 'c2' answers none of the calls before it"),
    ({"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "a"}]},
     "messages[0].role: ['user'] is not one of"),  # was a TypeError traceback (unhashable)
    ({"conversations": [{"from": {"h": 1}, "value": "hi"}, {"from": "gpt", "value": "a"}]},
     "conversations[0].from: {'h': 1} is not one of"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "[]"}]},
     "conversations[1].value: an empty list of calls"),  # was "conversations[1].content: missing"
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get weather", "arguments": {}}}]}]},
     "messages[1].tool_calls[0].function.name: 'get weather' is not a function name the server accepts"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {}}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "b", "content": "3"}, {"role": "tool", "tool_call_id": "b", "content": "4"}]},
     "messages[2].tool_call_id: 'b' is result 1 but answers call 2"),  # the first call has no id
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}},
        {"id": "c1", "type": "function", "function": {"name": "g", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "tool", "tool_call_id": "c1", "content": "4"}]},
     "messages[1].tool_calls[1].id: 'c1' is also the id of call 1: each call needs its own"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}, {"role": "tool", "content": "4"}]},
     "messages[3].role: more tool results than the 1 call(s) before them"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}},
        {"id": "c2", "type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "3"},
        {"role": "tool", "tool_call_id": "c1", "content": "4"}]},
     "messages[2].tool_call_id: 'c2' is result 1 but answers call 2: results follow the order of the calls"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "name": "g", "content": "3"}]},
     "messages[2].name: 'g', but call 1, which result 1 answers (results follow the order of the calls: f) is to "
     "'f'"),
    ({"messages": [{"role": "user", "content": "w"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "a", "arguments": {}}},
        {"id": "y", "type": "function", "function": {"name": "b", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "x", "name": "b", "content": "1"}]},
     "messages[2].name: 'b', but the call 'x' it answers is to 'a'"),  # in order: the name alone is wrong
    ({"messages": [{"role": "user", "content": "w"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {}}},
        {"type": "function", "function": {"name": "time", "arguments": {}}}]},
        {"role": "tool", "name": "time", "content": "12:00"}, {"role": "tool", "name": "weather", "content": "21 C"}]},
     "messages[2].name: 'time', but call 1, which result 1 answers (results follow the order of the calls: "
     "weather, time) is to 'weather'"),  # trained as weather's result "12:00"; the server refuses this history
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "id": 7},
     "id: unsupported field"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
      "tools": [{"type": "retrieval"}]}, "tools[0].type: 'retrieval' is not supported"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "messages[0].content: must be a string or a list of text parts, got int"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0].content: missing"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "messages[1].weight: must be 0 or 1, got 0.5"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "weight": True}]},
     "messages[1].weight: must be 0 or 1, got True"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
      "tools": [{"name": "f"}, {"type": "function", "function": {"name": "f"}}]}, "tools: two tools are named 'f'"),
    ({"messages": [{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "a"}]},
     "messages[0].weight: unsupported field"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "messages: every assistant message has weight 0"),
    ({"prompt": "hi", "completion": "a"}, "prompt: a string (TRL's standard format)"),
    ({"prompt": [{"role": "user", "content": "hi"}]}, "completion: missing"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "a"}]},
     "completion: no assistant message"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "a",
                                                                     "thinking": "..."}]},
     "completion[0].thinking: unsupported field"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "a"}],
      "messages": []}, "prompt: unsupported field"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}, "conversations[1].value: missing"),
    # a call left without its result, before the conversation goes on (the server refuses such a history)
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}, {"role": "assistant", "content": "a"}]},
     "messages[1]: call 2 of its 2 (g) has no tool result before messages[3]"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "function_call": {"name": "f"}}],
      "completion": [{"role": "assistant", "content": "a"}]},
     "prompt[1]: call 1 of its 1 (f) has no tool result before completion[0]"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "1"},
                        {"from": "gpt", "value": "y"}]},
     "conversations[1].from: 'observation' answers no call: it must follow a function_call turn"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": '[{"name": "f"}, '
                                                                                            '{"name": "f"}]'},
                        {"from": "observation", "value": "1"}, {"from": "gpt", "value": "y"}]},
     "conversations[2].value: one observation answers the 2 calls of the function_call turn before it"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": '[{"name": "f"}, '
                                                                                            '{"name": "f"}, '
                                                                                            '{"name": "f"}]'},
                        {"from": "observation", "value": "1"}, {"from": "observation", "value": "2"},
                        {"from": "gpt", "value": "y"}]},
     "conversations[4].from: 1 call(s) of the function_call turn before have no observation"),
    ({"instruction": "hi", "input": "x"}, "output: missing"),
    ({"input": "x", "output": "y"}, "instruction: missing"),  # it blamed input, an Alpaca field, as unsupported
    ({"instruction": "hi", "output": ["a"]}, "output: expected a string"),
    ({"instruction": "hi", "output": "a", "history": [["q", "a", "b"]]}, "history[0]: a [user, assistant] pair"),
    ({"instruction": "hi", "output": "a", "response": "b"}, "response: unsupported field"),
    ({"instruction": "hi", "output": "a", "system": 5}, "system: expected a string, got int 5"),  # the column's name
    # a tag in a column's text named the `content` of the message made of it, which the row does not have
    ({"instruction": "hi", "output": "<longcat_tool_call>{}"}, "output: holds the tool-call tag"),
    ({"instruction": "hi", "output": "a", "system": "</longcat_tool_call>"}, "system: holds the tool-call tag"),
    ({"instruction": "hi", "output": "a", "history": [["q", "<longcat_tool_call>"]]},
     "history[0][1]: holds the tool-call tag"),
    ({"conversations": [{"from": "human", "value": "hi"}], "system": ["a"]}, "system: expected a string, got list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "function_call": {
        "name": "f", "arguments": "{oops"}}]}, "messages[1].function_call.arguments: not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "function_call": {"name": "f"},
                                                       "tool_calls": []}]},
     "messages[1].function_call: give tool_calls or function_call"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "tools": [],
      "functions": []}, "functions: give tools or functions"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
      "functions": [{"name": "f", "parameters": 3}]}, "functions[0].parameters: expected an object"),
    # tools the server would refuse: the tuned model could never be served them
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
      "tools": [{"name": "get weather!"}]}, "tools[0].name: 'get weather!' is not a function name"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters: must be a JSON Schema"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "[1]"}]},
     "conversations[1].value[0]: expected an object"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "nope", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "1"}, {"role": "assistant", "content": "a"}],
      "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
     "messages[1].tool_calls[0].function.name: 'nope' is not among the row's tools (get_weather)"),
    # valid JSON that is not text: the "\ud83d" escape of half an emoji (the tokenizer refused it naming no row)
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cut \ud83d"}]},
     "messages[1].content: holds a lone surrogate '\\ud83d' at character 4"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
      "tools": [{"name": "f", "description": "\udc00"}]}, "tools[0].description: holds a lone surrogate"),
    # arguments Python's json.dumps wrote from a float nan: trained, served calls would come back as text
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "function_call": {
        "name": "f", "arguments": '{"t": NaN}'}}]}, "messages[1].function_call.arguments: holds NaN or Infinity"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "function_call": {
        "name": "f", "arguments": {"t": float("inf")}}}]}, "messages[1].function_call.arguments: holds NaN"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": '{"properties": {"a": {"maximum": Infinity}}}'}}]},
     "tools[0].function.parameters: holds NaN or Infinity, which JSON has no place for (the prompt would show"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
      "tools": [{"name": "f\n"}]}, "tools[0].name: 'f\\n' is not a function name"),  # re.match's $ took it
    # a TRL row's replies are in its completion, not in a messages field it does not have
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "a",
                                                                     "weight": 0}]},
     "completion: every assistant message has weight 0"),
    # rendered into the prompt as it was: a tool the server refuses (strict is a boolean there)
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
      "tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
     "tools[0].function.strict: must be true or false, got 'yes'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
      "tools": [{"type": "function", "function": {"name": "f", "strict": 1}}]},
     "tools[0].function.strict: must be true or false, got 1"),
    # a call spelt out in content trained the tag tokens around an undeclared name and arguments that are no JSON
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content":
        '<longcat_tool_call>{"name": "delete_all files", "arguments": {not json}</longcat_tool_call>'}],
      "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
     "messages[1].content: holds the tool-call tag <longcat_tool_call>: write a call as tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a</longcat_tool_call>"}]},
                   {"role": "assistant", "content": "a"}]}, "messages[0].content: holds the tool-call tag"),
    # a tag inside a call's arguments was trained as the tag token mid-JSON: the served call would end there
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function",
         "function": {"name": "sh", "arguments": {"cmd": "echo </longcat_tool_call>"}}}]}]},
     "messages[1].tool_calls[0].function.arguments: holds the tool-call tag </longcat_tool_call>: the tokenizer reads"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "function_call": {
        "name": "sh", "arguments": '{"cmd": "<longcat_tool_call>"}'}}]},
     "messages[1].function_call.arguments: holds the tool-call tag <longcat_tool_call>"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=[m.split(":")[0] for _, m in BAD_ROWS])
def test_bad_row_names_file_line_and_field(tmp_path, row, message):
    path = write_conversations(tmp_path / "data.jsonl", 3)
    with path.open("a") as f:
        f.write("\n" + json.dumps(row) + "\n")  # a blank line still counts: the bad row is line 5
    with pytest.raises(ConversationError) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:5: {message}"), str(err.value)


def test_a_last_turn_of_calls_may_stand_without_results():
    """It trains the calls themselves; every call before the end has its result (the BAD_ROWS above)."""
    calls = [{"id": f"c{k}", "type": "function", "function": {"name": "f", "arguments": {}}} for k in (1, 2)]
    row = parse_row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": calls}]}, "x")
    assert [len(m.get("tool_calls") or []) for m in row.messages] == [0, 2]
    gpt = parse_row({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": '{"name": '
                                                                                                         '"f"}'}]}, "x")
    assert gpt.messages[-1]["tool_calls"][0]["function"]["name"] == "f"


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(conversation(random.Random(0))) + "\n{not json\n")
    with pytest.raises(ConversationError, match=r"data.jsonl:2: not valid JSON"):
        read_conversations(path)


def test_rows_wrapped_in_an_object_or_an_array_named_jsonl_are_said_to_be_so(tmp_path):
    """`{"data": [...]}` in a .json named its key an unsupported row field (and ignoring it led nowhere); a
    pretty-printed array named .jsonl got a bare "not valid JSON (Expecting value)"."""
    data = list(iter_conversations(3, seed=7))
    for key in ("data", "train"):
        (tmp_path / "wrapped.json").write_text(json.dumps({key: data}, indent=2))
        with pytest.raises(ConversationError, match=f"wrapped.json:1: {key}: holds rows, not a conversation: "):
            read_conversations(tmp_path / "wrapped.json")
    (tmp_path / "array.jsonl").write_text(json.dumps(data, indent=2))
    with pytest.raises(ConversationError, match=r"array.jsonl:1: not valid JSON .*: the file is one JSON array, not "
                                                r"JSON Lines; name it .json"):
        read_conversations(tmp_path / "array.jsonl")
    (tmp_path / "array.jsonl").write_text(json.dumps(data))  # on one line, it read as a row that is not an object
    with pytest.raises(ConversationError, match=r"array.jsonl:1: row: a JSON array, not an object: the file is one "
                                                r"JSON array, not JSON Lines; name it .json"):
        read_conversations(tmp_path / "array.jsonl")


def test_a_json_file_holds_an_array_of_rows_or_json_lines(tmp_path):
    """`.json`: one array of rows (LLaMA-Factory's data files), JSON Lines (what `datasets`' to_json writes under
    that name) or one row read like the .jsonl; errors still name the row."""
    data = list(iter_conversations(8, seed=7))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "array.json").write_text("\n  " + json.dumps(data, indent=1))
    (tmp_path / "lines.json").write_text((tmp_path / "a.jsonl").read_text())
    canonical = lambda c: json.dumps([c.messages, c.tools], sort_keys=True)  # noqa: E731
    want = [canonical(c) for c in read_conversations(tmp_path / "a.jsonl")]
    for name in ("array.json", "lines.json"):
        assert [canonical(c) for c in read_conversations(tmp_path / name)] == want
    (tmp_path / "bad.json").write_text(json.dumps([*data[:2], {"messages": [{"role": "bot"}]}]))
    with pytest.raises(ConversationError, match=r"bad.json:3: messages\[0\].role: 'bot'"):
        read_conversations(tmp_path / "bad.json")
    (tmp_path / "one.json").write_text(json.dumps(data[0], indent=2))  # one row, pretty-printed
    assert [canonical(c) for c in read_conversations(tmp_path / "one.json")] == want[:1]
    (tmp_path / "one_broken.json").write_text(json.dumps(data[0], indent=2)[:-1])
    with pytest.raises(ConversationError, match=r"one_broken.json:1: not valid JSON"):
        read_conversations(tmp_path / "one_broken.json")
    (tmp_path / "broken.json").write_text("[\n" + json.dumps(data[0]) + ",\n{oops}]")
    with pytest.raises(ConversationError, match=r"broken.json:3: not valid JSON"):
        read_conversations(tmp_path / "broken.json")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:  # as some data sets ship them
        f.write((tmp_path / "a.jsonl").read_text())
    with gzip.open(tmp_path / "array.json.gz", "wt") as f:
        f.write((tmp_path / "array.json").read_text())
    for name in ("a.jsonl.gz", "array.json.gz"):
        assert [canonical(c) for c in read_conversations(tmp_path / name)] == want
    (tmp_path / "cut.jsonl.gz").write_bytes((tmp_path / "a.jsonl.gz").read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: not a readable gzip file"):
        read_conversations(tmp_path / "cut.jsonl.gz")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match=r"a.csv: conversations come as .jsonl"):
        read_conversations(tmp_path / "a.csv")


def test_runs_and_models_inside_a_data_folder_are_not_rows(tmp_path):
    """`longcat sft --data . --out run` read the run's own tokenizer.json as rows (written before the data is read,
    beside only the run's lock); a model folder there (`--model ./base`) had its config.json read as rows too."""
    data = list(iter_conversations(4, seed=3))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("123\n")
    (tmp_path / "run" / "tokenizer.json").write_text('{"version": "1.0"}')
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"model_type": "longcat_flash"}')
    (tmp_path / "base" / "model.safetensors").write_bytes(b"")
    assert len(read_conversations(tmp_path)) == 4


def test_a_directory_reads_as_its_shards_in_name_order(tmp_path):
    """A data set as the hub lays it out: shards under data/, a README and a hidden cache beside them; with a second
    split beside the first, a glob pattern picks one."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    data = list(iter_conversations(30, seed=6))
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    root = tmp_path / "dataset"
    (root / "data").mkdir(parents=True)
    for k, part in reversed(list(enumerate((data[:10], data[10:25], data[25:])))):  # written last to first
        pq.write_table(pa.Table.from_pylist(part), root / "data" / f"train-{k:05d}-of-00003.parquet")
    (root / "README.md").write_text("# a data set card")
    (root / ".cache").mkdir()
    (root / ".cache" / "lock.json").write_text("{not rows")
    canonical = lambda c: json.dumps([c.messages, c.tools], sort_keys=True)  # noqa: E731
    assert [canonical(c) for c in read_conversations(root)] == \
        [canonical(c) for c in read_conversations(tmp_path / "all.jsonl")]
    (root / "data" / "test-00000-of-00001.jsonl").write_text(json.dumps(data[0]) + "\n")  # the held-out split
    with pytest.raises(ValueError, match=r"dataset holds the files of several splits \(test, train\)"):
        read_conversations(root)  # training on both would train on the held-out rows
    assert [canonical(c) for c in read_conversations(root / "data" / "train-*.parquet")] == \
        [canonical(c) for c in read_conversations(tmp_path / "all.jsonl")]
    assert len(read_conversations(f"{root}/**/test-*")) == 1
    with pytest.raises(ValueError, match=r"the pattern .*data/\* matches the files of several splits \(test, train\)"):
        read_conversations(root / "data" / "*")  # the hub's layout globbed whole: it trained on the test split
    (tmp_path / "evals").mkdir()  # evaluation sets, one named a test split: a pattern chose them all, as datasets
    for name in ("gsm8k_test.jsonl", "arc.jsonl"):  # reads data_files="evals/*.jsonl"
        (tmp_path / "evals" / name).write_text(json.dumps(data[0]) + "\n")
    assert len(read_conversations(tmp_path / "evals" / "*.jsonl")) == 2
    with pytest.raises(FileNotFoundError, match=r"no file matches .*validation-\*"):
        read_conversations(root / "data" / "validation-*")
    (root / "data" / "test-00000-of-00001.jsonl").unlink()
    (tmp_path / "linked").mkdir()  # a folder linking to the shards' folder: rglob did not follow the link
    (tmp_path / "linked" / "shards").symlink_to(root / "data", target_is_directory=True)
    assert [canonical(c) for c in read_conversations(tmp_path / "linked")] == \
        [canonical(c) for c in read_conversations(tmp_path / "all.jsonl")]
    (root / "test").mkdir()  # a link inside the tree to its test split, named first: the split is still named
    (root / "test" / "rows.jsonl").write_text(json.dumps(data[0]) + "\n")
    (root / "current").symlink_to(root / "test", target_is_directory=True)
    with pytest.raises(ValueError, match=r"dataset holds the files of several splits \(test, train\)"):
        read_conversations(root)
    (root / "current").unlink()
    shutil.rmtree(root / "test")
    for names in (("mydata_train.jsonl", "mydata_test.jsonl"), ("training.jsonl", "testing.jsonl"),
                  ("chat-train-0.jsonl", "chat-eval-0.jsonl")):  # the split word between separators, as `datasets`
        mixed = tmp_path / f"mixed-{names[0]}"
        mixed.mkdir()
        for name in names:
            (mixed / name).write_text(json.dumps(data[0]) + "\n")
        with pytest.raises(ValueError, match=r"holds the files of several splits \(test.*, train.*\)"):
            read_conversations(mixed)
    for names in (("mydata.jsonl", "mydata_test.jsonl"), ("chat.jsonl", "val.jsonl")):  # `datasets` reads these
        beside = tmp_path / f"beside-{names[1]}"  # as the held-out split alone: we trained on both
        beside.mkdir()
        for name in names:
            (beside / name).write_text(json.dumps(data[0]) + "\n")
        with pytest.raises(ValueError, match=rf"holds (test|validation \(val\)) files \({names[1]}\) beside files no "
                                             rf"split names \({names[0]}\)"):
            read_conversations(beside)
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("interval.jsonl", "devices.jsonl", "contest.jsonl"):  # no split word: one data set
        (plain / name).write_text(json.dumps(data[0]) + "\n")
    assert len(read_conversations(plain)) == 3
    (root / "data" / "train-00003-of-00003.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(ConversationError, match=r"train-00003-of-00003.jsonl:1: messages: empty"):
        read_conversations(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no conversation files .* in the directory .*empty"):
        read_conversations(tmp_path / "empty")


def test_files_written_by_datasets_read_as_their_rows(tmp_path):
    """`datasets`' save_to_disk (Arrow stream shards beside its own metadata JSON) and to_parquet; `datasets` 5
    stores messages of varying shape as JSON strings (its Json feature), read back as the objects they hold. A
    DatasetDict names its splits."""
    datasets = pytest.importorskip("datasets")
    data = list(iter_conversations(24, seed=7))
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    saved = datasets.Dataset.from_json(str(tmp_path / "all.jsonl"))
    saved.save_to_disk(str(tmp_path / "one"), num_shards=3)
    saved.to_parquet(str(tmp_path / "one.parquet"))
    assert len(list((tmp_path / "one").glob("*.arrow"))) == 3 and (tmp_path / "one" / "state.json").is_file()
    canonical = lambda c: json.dumps([c.messages, c.tools], sort_keys=True)  # noqa: E731
    want = [canonical(c) for c in read_conversations(tmp_path / "all.jsonl")]
    assert [canonical(c) for c in read_conversations(tmp_path / "one")] == want
    assert [canonical(c) for c in read_conversations(tmp_path / "one.parquet")] == want
    datasets.DatasetDict({"train": saved, "test": saved}).save_to_disk(str(tmp_path / "both"))
    with pytest.raises(ValueError, match=r"both holds a `datasets` DatasetDict \(splits: test, train\)"):
        read_conversations(tmp_path / "both")
    assert len(read_conversations(tmp_path / "both" / "train")) == len(data)
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    with pytest.raises(ValueError, match=r"junk.arrow: not an Arrow stream"):
        read_conversations(tmp_path / "junk.arrow")
    # a saved folder later loaded and mapped holds cache-*.arrow files too: its rows are the ones state.json lists
    datasets.load_from_disk(str(tmp_path / "one")).map(lambda r: r, load_from_cache_file=False)
    assert len(list((tmp_path / "one").glob("cache-*.arrow"))) >= 1
    assert [canonical(c) for c in read_conversations(tmp_path / "one")] == want
    nested = tmp_path / "nested"  # ... and so inside a folder given as --data: its cache was read as more rows
    nested.mkdir()
    shutil.copytree(tmp_path / "one", nested / "chat")
    assert [canonical(c) for c in read_conversations(nested)] == want


def test_files_from_other_tools_read_or_fail_naming_the_file(tmp_path):
    """A byte order mark (Windows tools), a pandas index column, and files that are not what their name says."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    data = list(iter_conversations(6, seed=5))
    text = "".join(json.dumps(r) + "\n" for r in data)
    (tmp_path / "plain.jsonl").write_text(text)
    want = [json.dumps([c.messages, c.tools]) for c in read_conversations(tmp_path / "plain.jsonl")]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    frame = pd.DataFrame({"messages": [r["messages"] for r in data], "tools": [json.dumps(r.get("tools"))
                                                                               for r in data]})
    frame[frame.index % 2 == 0].to_parquet(tmp_path / "filtered.parquet")  # the index is no RangeIndex: a column
    for name, rows in [("bom.jsonl", want), ("bom.json", want), ("filtered.parquet", want[::2])]:
        assert [json.dumps([c.messages, c.tools]) for c in read_conversations(tmp_path / name)] == rows, name
    shards = tmp_path / "shards"  # shards `datasets` reads and we do not: in a folder they were left out unsaid
    shards.mkdir()
    (shards / "part-0.jsonl").write_text(text)
    for name in ("part-1.jsonl.zst", "part-1.ndjson", "part-1.csv", "part-1.json.bz2"):
        (shards / name).write_bytes(b"rows")
        with pytest.raises(ValueError, match=rf"{name} in .*shards is a data file in a format not read here"):
            read_conversations(shards)
        (shards / name).unlink()
    (shards / "README.md").write_text("a card")  # not data: the folder still reads
    assert len(read_conversations(shards)) == len(data)
    # the position was counted from the text stream's buffer ("position 5310" of a row at byte 890046): the line
    (tmp_path / "latin1.jsonl").write_bytes(text.encode() * 200 + '{"messages": "caf\u00e9"}\n'.encode("latin-1"))
    at = len(text.encode()) * 200 + len('{"messages": "caf')
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "filtered.parquet").read_bytes()[:-100])
    for name, problem in [("latin1.jsonl", rf":{6 * 200 + 1}: not UTF-8 text \(byte b'\\xe9' at byte {at} of the file"),
                          ("cut.parquet", ": not a readable Parquet file")]:
        with pytest.raises(ValueError, match=rf"{name}{problem}"):
            read_conversations(tmp_path / name)


@pytest.mark.parametrize("where, field", [
    ("schema", "tools[0].parameters.properties.x.description"),
    ("key", "messages[1].tool_calls[0].function.arguments.\ud83d (the key)"),
    ("string", "messages[1].tool_calls[0].function.arguments.x"),  # arguments as JSON text: checked once decoded
])
def test_a_lone_surrogate_anywhere_names_its_field(where: str, field: str):
    """A half emoji deep inside a tool's schema or a call's arguments, where no field check looked: the tokenizer's
    error named a character offset in the rendered text, and in arguments given as a JSON string it was trained."""
    arguments = {"schema": {"x": 1}, "key": {"\ud83d": 1}, "string": '{"x": "\\ud83d"}'}[where]
    description = "\ud83d" if where == "schema" else "x"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": arguments}}]}],
           "tools": [{"name": "f",
                      "parameters": {"type": "object", "properties": {"x": {"description": description}}}}]}
    with pytest.raises(ConversationError, match=re.escape(f"rows.jsonl:7: {field}: holds a lone surrogate")):
        parse_row(row, "rows.jsonl:7")
    parse_row({**row, "tools": [], "messages": [row["messages"][0], {"role": "assistant", "content": "a"}],
               "source": {"\ud83d": "\ud83d"}}, "rows.jsonl:7", ignore=["source"])  # a column skipped is not read


def test_a_row_nested_too_deeply_is_an_error_naming_it(tmp_path):
    """Arguments nested thousands deep: a RecursionError traceback while the line was decoded."""
    deep = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "@"}}]}]}
    line = json.dumps(deep).replace('"@"', '{"a": ' * 5000 + "1" + "}" * 5000)
    (tmp_path / "deep.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=r"deep.jsonl:1: not valid JSON \(nested too deeply\)"):
        list(read_conversations(tmp_path / "deep.jsonl"))
    long_number = json.dumps(deep).replace('"@"', '{"n": ' + "9" * 5000 + "}")  # past Python's 4300 digits
    (tmp_path / "long.jsonl").write_text(long_number + "\n")  # a ValueError with no file, line or field
    with pytest.raises(ValueError, match=r"long.jsonl:1: not valid JSON \(a number with more than 4300 digits\)"):
        list(read_conversations(tmp_path / "long.jsonl"))
    as_text = json.loads(json.dumps(deep).replace('"@"', json.dumps('{"n": ' + "9" * 5000 + "}")))
    with pytest.raises(ConversationError, match=r"rows.jsonl:3: messages\[1\]\.tool_calls\[0\]\.function\.arguments: "
                                                r"a number with more than 4300 digits$"):
        parse_row(as_text, "rows.jsonl:3")  # valid JSON: not "must hold JSON", and no made-up position
    (tmp_path / "rows.json").write_text("[\n" + json.dumps(deep) + ",\n" + long_number + "\n]")
    with pytest.raises(ValueError, match=r"rows.json: not valid JSON \(a number with more than 4300 digits\)"):
        list(read_conversations(tmp_path / "rows.json"))  # json does not say where: no line 1 claimed
    shallow = json.loads(json.dumps(deep).replace('"@"', '{"a": ' * 150 + "1" + "}" * 150))
    with pytest.raises(ConversationError, match=r"rows.jsonl:2: messages\[1\]\.tool_calls\[0\]\.function\.arguments"
                                                r"(\.a)+: nested more than 100 levels deep"):
        parse_row(shallow, "rows.jsonl:2")


def test_file_suffixes_are_read_in_any_case(tmp_path):
    """ROWS.JSONL (as Windows tools name files) was refused as not .jsonl."""
    text = "".join(json.dumps(r) + "\n" for r in iter_conversations(4, seed=2))
    (tmp_path / "rows.jsonl").write_text(text)
    want = [json.dumps([c.messages, c.tools]) for c in read_conversations(tmp_path / "rows.jsonl")]
    (tmp_path / "ROWS.JSONL").write_text(text)
    with gzip.open(tmp_path / "ROWS.JSON.GZ", "wt") as f:
        f.write(text)
    for name in ("ROWS.JSONL", "ROWS.JSON.GZ"):
        assert [json.dumps([c.messages, c.tools]) for c in read_conversations(tmp_path / name)] == want, name


def test_parquet_rows_read_like_jsonl(tmp_path, tokenizer):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    data = [conversation(random.Random(i)) for i in range(12)]
    for row in data:  # parquet needs one type per column: arguments as strings, content of user turns as text
        row.setdefault("tools", None)  # and every column in the first row (the schema comes from it)
        for m in row["messages"]:
            if isinstance(m.get("content"), list):
                m["content"] = "".join(p["text"] for p in m["content"])
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "a.parquet")  # structs: absent keys come back null
    from_jsonl, from_parquet = read_conversations(tmp_path / "a.jsonl"), read_conversations(tmp_path / "a.parquet")
    for a, b in zip(from_jsonl, from_parquet, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(tokenize(tokenizer, a), tokenize(tokenizer, b)))
    # rows with different tools: Arrow stores all of them as one struct, each row's schemas and arguments holding
    # every other row's keys as nulls; they read back as written (a struct fixes one key order for all rows)
    varied = list(iter_conversations(30, seed=4))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in varied))
    pq.write_table(pa.Table.from_pylist(varied), tmp_path / "t.parquet")
    canonical = lambda c: json.dumps([c.messages, c.tools], sort_keys=True)  # noqa: E731
    assert [canonical(c) for c in read_conversations(tmp_path / "t.parquet")] == \
        [canonical(c) for c in read_conversations(tmp_path / "t.jsonl")]
    bad = [*data[:2], {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(ConversationError, match=r"bad.parquet:3: messages\[1\].role: 'bot'"):
        read_conversations(tmp_path / "bad.parquet")


def test_tools_and_schemas_stored_as_json_strings_read_as_objects(tmp_path):
    row = next(r for r in iter_conversations(20, seed=5) if r.get("tools"))
    as_strings = {**row, "tools": json.dumps([{**t, "function": {**t["function"], "parameters":
                                                                json.dumps(t["function"]["parameters"])}}
                                              for t in row["tools"]])}
    assert parse_row(as_strings, "x").tools == parse_row(row, "x").tools
    functions_alone = {**row, "tools": [t["function"] for t in row["tools"]]}  # no {"type", "function"} wrapper
    assert parse_row(functions_alone, "x").tools == parse_row(row, "x").tools
    responses_api = {**row, "tools": [{"type": "function", **t["function"]} for t in row["tools"]]}  # flat, typed
    assert parse_row(responses_api, "x").tools == parse_row(row, "x").tools
    with pytest.raises(ConversationError, match=r"x: tools\[0\].type: 'web_search' is not supported"):
        parse_row({**row, "tools": [{"type": "web_search", "name": "f"}]}, "x")
    with pytest.raises(ConversationError, match=r"x: tools: a string here must hold JSON"):
        parse_row({**row, "tools": "[{'type': 'function'}]"}, "x")
    with pytest.raises(ConversationError, match=r"x: tools\[0\].function.parameters: expected an object"):
        parse_row({**row, "tools": [{"type": "function", "function": {"name": "f", "parameters": "[1]"}}]}, "x")


def test_a_tools_string_reads_as_the_server_reads_the_same_tools():
    """`json.dumps` of an SDK tool's `model_dump()` has a null description and strict: refused before, though the
    same tools as a list were accepted. The function's own nulls count as absent (the server drops them too); a
    schema's `"default": null` is the writer's and stays (the server shows it), so the prompts are the same."""
    from longcat_flash.serve import protocol as p
    from longcat_flash.serve.tools import plan_tools

    unit = {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
    tool = {"type": "function", "function": {"name": "wx", "description": None, "strict": None,
                                             "parameters": {"type": "object", "properties": {"unit": unit}}}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}]
    parsed = parse_row({"messages": messages, "tools": json.dumps([tool])}, "x").tools
    body = p.ChatCompletionRequest.model_validate({"model": "m", "messages": messages[:1], "tools": [tool]})
    assert parsed == plan_tools(body).shown
    assert parsed[0]["function"]["parameters"]["properties"]["unit"]["default"] is None


def encoded(tokenizer, n=40):
    rng = random.Random(5)
    return [tokenize(tokenizer, parse_row(conversation(rng), "x")) for _ in range(n)]


def test_packing_keeps_whole_conversations_as_documents(tokenizer):
    convs = encoded(tokenizer)
    data = pack(convs, seq_len=500, pad_id=tokenizer.pad_id, split="train")
    assert data.tokens.shape[1] == 501
    assert len(data) < len(convs)  # several conversations share a window
    found = []
    for tokens, trained, docs in zip(data.tokens, data.trained, data.documents):
        assert (np.diff(docs) >= 0).all() and docs[0] == 0  # documents are contiguous, numbered from 0
        for d in np.unique(docs):
            if trained[docs == d].any():
                found.append(tuple(tokens[docs == d]))
            else:  # the padding after the last conversation
                assert d == docs[-1] and (tokens[docs == d] == tokenizer.pad_id).all()
    assert sorted(found) == sorted(tuple(ids) for ids, _ in convs)


def test_overlong_conversations_are_truncated_or_skipped_and_counted(tokenizer):
    convs = encoded(tokenizer)
    lengths = np.array([len(ids) for ids, _ in convs])
    seq_len = 60  # plain answers fit, two-round chats lose their second round, tool calls lose every turn
    over = int((lengths > seq_len + 1).sum())
    assert 0 < over < len(convs)
    skipped = pack(convs, seq_len, tokenizer.pad_id, "train", overlong="skip")
    assert f"{over} skipped" in skipped.report and "0 truncated" in skipped.report
    assert skipped.documents.max(axis=1).sum() == len(convs) - over  # one padding document per window
    truncated = pack(convs, seq_len, tokenizer.pad_id, "train", overlong="truncate")
    # a truncated one fills its window to the last token; one with no assistant token left in it is dropped, and
    # counted as that alone: each over-long conversation is counted once
    kept = re.search(r"(\d+) truncated", truncated.report)
    dropped = re.search(r"(\d+) dropped with no assistant token left", truncated.report)
    full = sum(int((d == d[-1]).all()) for d in truncated.documents)
    assert kept and dropped and full > 0 and int(kept.group(1)) == full
    assert int(kept.group(1)) + int(dropped.group(1)) == over


def agent_trace(calls: int) -> dict:
    """One long agent trace: `calls` rounds of a tool call and its ~600-character result, then an answer."""
    tool = {"type": "function", "function": {"name": "read_file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
    messages = [{"role": "user", "content": "Find where the bug is."}]
    for k in range(calls):
        messages += [{"role": "assistant", "content": f"Reading part {k}.", "tool_calls": [
                         {"id": f"call_{k}", "type": "function",
                          "function": {"name": "read_file", "arguments": json.dumps({"path": f"src/{k}.py"})}}]},
                     {"role": "tool", "tool_call_id": f"call_{k}", "content": f"def f{k}(x):\n    return x\n" * 24}]
    return {"messages": messages + [{"role": "assistant", "content": "It is in part 3."}], "tools": [tool]}


@pytest.mark.parametrize("template", ["longcat", "chatml"])
def test_a_long_trace_is_read_up_to_the_window_only_with_the_same_tokens_there(tokenizer, template, monkeypatch):
    """Each assistant turn is found by rendering its prefix, so a trace's cost grew with the square of its length
    (200 calls of ~8 KB results: 14 s, all before the cut to the window). Turns past the window are not looked
    for now; the window's tokens and trained flags are those of the whole reading."""
    if template == "chatml":
        tokenizer = Tokenizer(tokenizer.backend, chat_template=CHATML)
    conv = parse_row(agent_trace(60), "trace")
    whole_ids, whole_trained = tokenize(tokenizer, conv)
    renders = []
    render = Tokenizer.apply_chat_template
    monkeypatch.setattr(Tokenizer, "apply_chat_template", lambda self, *a, **k: renders.append(1) or
                        render(self, *a, **k))
    tokenize(tokenizer, conv)
    others = len(renders) - 2 * 61  # two renders per assistant turn looked for, and a few for the whole
    starts = np.flatnonzero(whole_trained[1:] & ~whole_trained[:-1]) + 1  # where each assistant turn begins
    for window in (300, 1000, 5000, len(whole_ids) + 1):
        renders.clear()
        ids, trained = tokenize(tokenizer, conv, window=window)
        assert ids[:window].tolist() == whole_ids[:window].tolist()
        assert trained[:window].tolist() == whole_trained[:window].tolist()
        assert not trained[window:].any() and len(ids) >= min(window + 1, len(whole_ids))
        looked_for = min(61, int((starts < window).sum()) + 1)  # those in the window, and the first past it
        assert (len(renders) - others) // 2 == looked_for


def test_a_conversation_is_encoded_once_whatever_its_turns(tokenizer, monkeypatch):
    """The window's count of each assistant turn encoded the trace from its start again (its text once per turn),
    then all of it again, the text at the start twice: 3000 synthetic tool conversations took 34-38 s to prepare
    for 1024-token windows, 14-15 s since each text is encoded once (the count's pieces are kept)."""
    conv = parse_row(agent_trace(60), "trace")
    whole_ids, _ = tokenize(tokenizer, conv)
    text = tokenizer.apply_chat_template(conv.messages, add_generation_prompt=False, tools=conv.tools)
    encoded = []
    many, one = Tokenizer._encode_many, Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "_encode_many", lambda self, encoder, texts, *a: encoded.extend(texts) or
                        many(self, encoder, texts, *a))
    monkeypatch.setattr(Tokenizer, "encode", lambda self, piece, **k: encoded.append(piece) or one(self, piece, **k))
    ids, _ = tokenize(tokenizer, conv, window=len(whole_ids) + 1)  # every turn counted, none cut away
    assert ids.tolist() == whole_ids.tolist()
    assert sum(map(len, encoded)) <= len(text)  # the special tokens' text is not encoded


@pytest.mark.parametrize("window", [None, 20])
def test_a_template_whose_turn_starts_inside_a_special_token_names_the_row(tokenizer, window):
    """The generation prompt ends in the middle of the assistant turn's `<s>`: no cut can fall there. The error
    names the row whether the final encoding or the window's count (the second turn's) meets it first."""
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}<s>{{ m.content }}</s>{% else %}"
                "{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<{% endif %}")
    odd = Tokenizer(tokenizer.backend, chat_template=template)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(ConversationError, match=r"^rows\.jsonl:4: a cut falls inside a special token"):
        tokenize(odd, parse_row(row, "rows.jsonl:4"), window=window)


def test_special_token_text_inside_a_message_stays_text(tokenizer):
    """HTML's <s>strike</s> in an answer must not become bos / eos: the model would learn to stop mid-answer."""
    row = {"messages": [{"role": "user", "content": "What does <s>old</s> mean?"},
                        {"role": "assistant", "content": "It strikes <s>old</s> through."},
                        {"role": "user", "content": "And </s>?"}, {"role": "assistant", "content": "Ends it."}]}
    ids, trained = tokenize(tokenizer, parse_row(row, "x:1"))
    assert tokenizer.decode(ids, skip_special_tokens=False) == tokenizer.apply_chat_template(
        row["messages"], add_generation_prompt=False)
    specials = [int(i) for i in ids if i in (tokenizer.bos_id, tokenizer.eos_id)]
    assert specials == [tokenizer.eos_id] * 2  # the template's two end-of-turn tokens, nothing from the text
    assert ids[trained].tolist().count(tokenizer.eos_id) == 2 and ids[trained][-1] == tokenizer.eos_id
    # a template that rewrites message text cannot tell its special tokens from the messages': an error, not a guess
    rewriting = Tokenizer(tokenizer.backend, chat_template=CHATML.replace("m['content'] or ''",
                                                                          "(m['content'] or '') | replace('s', 'ss')"))
    with pytest.raises(ConversationError, match=r"x:1: .*special token"):
        tokenize(rewriting, parse_row(row, "x:1"))


def test_held_out_conversations_come_from_the_file_or_a_separate_one(tmp_path, tokenizer):
    data = write_conversations(tmp_path / "train.jsonl", 40, seed=0)
    held = write_conversations(tmp_path / "val.jsonl", 10, seed=1)
    train, val = conversation_datasets(tokenizer, data, None, 0.25, 500, seed=0)
    assert train.report.startswith("sft train: 30 conversations") and val.report.startswith("sft val: 10 conv")
    train, val = conversation_datasets(tokenizer, data, held, 0.25, 500, seed=0)
    assert train.report.startswith("sft train: 40 conversations") and val.report.startswith("sft val: 10 conv")
    assert val.tokens.tobytes() == pack([tokenize(tokenizer, c) for c in read_conversations(held)], 500,
                                        tokenizer.pad_id, "val").tokens.tobytes()


def test_preparing_the_conversations_says_what_it_does_without_progress_bars(tmp_path, tokenizer, capsys):
    """`longcat sft --no-progress` on 50k conversations said nothing for three minutes (and with bars too: there
    was none for this phase); the other ranks of a torchrun stay silent (progress None)."""
    data = write_conversations(tmp_path / "train.jsonl", 12, seed=0)
    conversation_datasets(tokenizer, data, None, 0.25, 500, seed=0, progress=False)
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"rendering and tokenizing the conversations of {data}"
    assert said[1].startswith(f"tokenized 12 conversations of {data} in "), said
    conversation_datasets(tokenizer, data, None, 0.25, 500, seed=0, progress=None)
    assert capsys.readouterr().out == ""
    conversation_datasets(tokenizer, data, None, 0.25, 500, seed=0, progress=True)
    assert "12 conversations" in capsys.readouterr().err  # the bar
    with pytest.raises(FileNotFoundError, match="conversation file not found"):
        conversation_datasets(tokenizer, tmp_path / "missing.jsonl", None, 0.25, 500, seed=0, progress=False)
    assert capsys.readouterr().out == ""  # the error alone, not a line saying the work began


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_the_held_out_share_is_taken_from_conversations_that_fit(tmp_path, tokenizer, overlong):
    """Held out before it was packed, an over-long conversation that drew the validation slot ended the run ("sft
    val: no conversation fits") for some seeds while the train split had conversations to spare."""
    long = {"messages": [{"role": "user", "content": "word " * 600}, {"role": "assistant", "content": "Yes."}]}
    rows = [long] * 3 + [conversation(random.Random(k)) for k in range(3)]  # long: skipped, or cut before the reply
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for seed in range(8):
        train, val = conversation_datasets(tokenizer, data, None, 0.1, 256, seed=seed, overlong=overlong)
        assert val.report.startswith("sft val: 1 conversation -> 1 window") and "over-long" not in val.report
        assert train.report.startswith("sft train: 5 conversations") and "over-long" in train.report


def test_conversations_whose_replies_all_fall_past_the_window_name_the_cut():
    """A long tool list can fill the whole window before the first reply: the error says they were cut, not only
    that they had no assistant token."""
    prompt_only = np.zeros(40, dtype=bool)
    encoded = [(np.arange(50), np.concatenate([prompt_only, np.ones(10, dtype=bool)])) for _ in range(3)]
    with pytest.raises(ValueError, match=r"3 read, 0 skipped as longer than 17 tokens, 3 without an "
                                         r"assistant token within their first 17, 3 of them longer, cut to it\); "
                                         r"raise data.seq_len \(up to "
                                         r"the model's max_position_embeddings; past it, extend the model's context "
                                         r"first: docs/context_extension.md\)"):
        pack(encoded, seq_len=16, pad_id=0, split="train")


def test_openai_fine_tuning_rows_may_say_parallel_tool_calls():
    """A field of OpenAI's fine-tuning rows: false holds only where no turn makes two calls; it was refused."""
    call = {"id": "c1", "type": "function", "function": {"name": "wx", "arguments": "{}"}}
    tools = [{"type": "function", "function": {"name": "wx", "parameters": {"type": "object"}}}]
    results = [{"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    one = {"tools": tools, "messages": [{"role": "user", "content": "weather?"},
                                        {"role": "assistant", "content": None, "tool_calls": [call]}, *results]}
    for parallel in (True, False):
        assert parse_row({**one, "parallel_tool_calls": parallel}, "x") == parse_row(one, "x")
    two = {"tools": tools, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": "c2"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "windy"},
        {"role": "assistant", "content": "Sunny."}]}
    assert parse_row({**two, "parallel_tool_calls": True}, "x")
    with pytest.raises(ConversationError, match=r"x: messages\[1\].tool_calls: 2 calls in one turn"):
        parse_row({**two, "parallel_tool_calls": False}, "x")
    with pytest.raises(ConversationError, match="parallel_tool_calls: must be true or false"):
        parse_row({**one, "parallel_tool_calls": "no"}, "x")


def test_a_template_that_closes_every_render_with_eos_finds_its_turns(tokenizer):
    """Phi-3's template writes eos after the last message of any render without a generation prompt, so a prefix
    did not continue into the whole conversation: every multi-turn row was refused."""
    phi = Tokenizer(tokenizer.backend, chat_template=(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% else %}{{ eos_token }}{% endif %}"))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    ids, trained = tokenize(phi, parse_row({"messages": messages}, "x"), ends=["<s>", "</s>"])
    spans = tokenizer.decode(ids[trained], skip_special_tokens=False)
    assert spans == "hello<s>ciao<s>"  # each turn up to its end of turn, where generation stops


def test_what_the_template_writes_after_the_end_of_turn_is_not_trained(tokenizer):
    """ChatML's newline after `<|im_end|>` was trained as part of the turn, though generation stops at
    `<|im_end|>` and never writes it: the model learnt a token it is never asked for (counted in val_loss)."""
    chatml = Tokenizer(tokenizer.backend, chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    ids, trained = tokenize(chatml, parse_row({"messages": messages}, "x"), ends=["<|im_end|>"])
    assert tokenizer.decode(ids[trained], skip_special_tokens=False) == "hello<|im_end|>ciao<|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("ciao<|im_end|>\n")  # rendered, not trained


def test_eos_written_inside_a_message_is_no_end_of_turn(tokenizer):
    """The stop-token check looked for the eos text anywhere in the turn, so a reply quoting `</s>` passed for a
    template whose turns never end with the token."""
    chatml = Tokenizer(tokenizer.backend, chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    row = {"messages": [{"role": "user", "content": "strike it"}, {"role": "assistant", "content": "<s>old</s> new"}]}
    with pytest.raises(ConversationError, match=r"x: messages\[1\]: the chat template ends the assistant turn"):
        tokenize(chatml, parse_row(row, "x"))


def test_named_templates_and_call_formats_are_held_to_what_the_server_parses(tokenizer):
    """A `default` template beside a `tool_use` one (as Hermes models ship them) failed on a call when rendered
    without tools, an error with no row; and a template writing `<tool_call>` blocks trained calls `longcat serve`
    cannot parse, silently."""
    plain = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")  # no tools, no calls: fails on None
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    row = {"tools": [weather], "messages": [
        {"role": "user", "content": "Oslo?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    named = Tokenizer(tokenizer.backend, chat_template=plain, tool_chat_template=CHATML)
    ids, trained = tokenize(named, parse_row(row, "row"))
    assert tokenizer.decode(ids[trained], skip_special_tokens=False).startswith("<longcat_tool_call>get_weather")
    hermes = Tokenizer(tokenizer.backend, chat_template=CHATML.replace("longcat_tool_call", "tool_call"))
    for window in (None, 12):  # a later turn past the window: refused all the same (it was trained, silently)
        with pytest.raises(ConversationError, match=re.escape("row: tool_calls: the chat template writes tool calls "
                                                              "in another format than <longcat_tool_call>")):
            tokenize(hermes, parse_row(row, "row"), window=window)


def test_an_sdk_reply_logged_with_its_empty_fields_reads_as_the_plain_message():
    """The openai SDK's `model_dump()` of a reply carries `refusal: None`, `annotations: []`, `audio: None`: sft
    refused such logged conversations, which the server takes (fields that carry nothing are not unknown)."""
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}
    dumped = {"messages": [plain["messages"][0], {**plain["messages"][1], "refusal": None, "annotations": [],
                                                  "audio": None, "function_call": None}]}
    assert parse_row(dumped, "x").messages == parse_row(plain, "x").messages


SHAREGPT_TOOLS = [{"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("row, field", [
    ({"system": "S", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                       {"from": "gpt", "value": "ok"}]}, "conversations[2] is an assistant message"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "completion": [{"role": "assistant", "content": "c"}]}, "completion[0] is an assistant message"),
    ({"tools": SHAREGPT_TOOLS, "conversations": [
        {"from": "human", "value": "a"}, {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {}})},
        {"from": "observation", "value": "1"}, {"from": "gpt", "value": "ok"}]}, "conversations[1].value: 'f' is not"),
    ({"functions": [{"name": "g", "parameters": {"type": "object"}}], "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": None,
                                           "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": "1"}, {"role": "assistant", "content": "ok"}]},
     "messages[1].function_call.name: 'f' is not"),
    ({"tools": SHAREGPT_TOOLS, "conversations": [
        {"from": "human", "value": "a"}, {"from": "function_call", "value": json.dumps({"name": "g", "arguments": {}})},
        {"from": "observation", "value": "1"}, {"from": "gpt", "value": "ok"}]},
     "conversations[1].value: the chat template does not render this call"),
])
def test_errors_name_the_rows_own_fields(tokenizer, row, field):
    """ShareGPT, TRL and legacy rows were reported in the normalised messages' terms (`messages[3]` for the third
    ShareGPT turn after a system column, `tool_calls[0]` for a ShareGPT value or a legacy function_call)."""
    if "does not render this call" in field:  # a ChatML template without its tool-call loop
        calls = ("{% for c in m['tool_calls'] or [] %}<longcat_tool_call>{{ c['function']['name'] }}"
                 "</longcat_tool_call>{% endfor %}")
        tokenizer = Tokenizer(tokenizer.backend, chat_template=CHATML.replace(calls, ""))
    with pytest.raises(ConversationError) as err:
        tokenize(tokenizer, parse_row(row, "rows.jsonl:1"))
    assert str(err.value).startswith(f"rows.jsonl:1: {field}"), str(err.value)


def test_tokenized_conversations_are_cached_until_the_file_or_a_setting_changes(tmp_path, tokenizer, monkeypatch):
    """Every start and resume of `longcat sft` rendered and tokenized the whole file again (50k conversations:
    three minutes, on every rank of a torchrun)."""
    from longcat_flash.data import conversation_packing

    data, cache = write_conversations(tmp_path / "train.jsonl", 20, seed=0), tmp_path / "cache"
    first = conversation_datasets(tokenizer, data, None, 0.25, 500, seed=0, cache_dir=cache)
    calls = []
    real = conversation_packing.tokenize
    monkeypatch.setattr(conversation_packing, "tokenize", lambda *args: calls.append(1) or real(*args))
    again = conversation_datasets(tokenizer, data, None, 0.25, 500, seed=0, cache_dir=cache)
    assert not calls  # read back, not made again
    for a, b in zip(first, again):
        assert a.tokens.tobytes() == b.tokens.tobytes() and a.trained.tobytes() == b.trained.tobytes()
        assert a.documents.tobytes() == b.documents.tobytes() and a.report == b.report
    conversation_datasets(tokenizer, data, None, 0.25, 300, seed=0, cache_dir=cache)  # another window
    assert len(calls) == 20
    write_conversations(data, 21, seed=0)  # the file changed
    changed = conversation_datasets(tokenizer, data, None, 0.25, 500, seed=0, cache_dir=cache)
    assert len(calls) == 41 and changed[0].report != first[0].report
    assert len(list(cache.glob("conversations-train-*.npz"))) == 3


def test_a_cache_that_cannot_be_written_is_said_and_the_run_goes_on(tmp_path, tokenizer, caplog):
    """SFT read no cache before it had one: a cache folder it cannot write must not stop a run that worked."""
    data = write_conversations(tmp_path / "train.jsonl", 8, seed=0)
    (tmp_path / "a_file").write_text("not a folder")
    train, _ = conversation_datasets(tokenizer, data, None, 0.25, 500, seed=0, cache_dir=tmp_path / "a_file")
    assert train.report.startswith("sft train: 6 conversations")
    assert "the tokenized conversations are not cached (data.cache_dir" in caplog.text


def test_the_conversation_cache_is_made_again_for_other_template_tokens_or_when_damaged(tmp_path, tokenizer):
    """A bos_token fixed in tokenizer_config.json (a template that writes `{{ bos_token }}`) kept the old cached
    renderings; a cache cut short (a partial copy) stopped the run with zipfile's traceback; a killed write's
    temporary file stayed forever."""
    import os
    import time

    from longcat_flash.data import conversation_cache

    data, cache = write_conversations(tmp_path / "train.jsonl", 8, seed=0), tmp_path / "cache"
    template = "{{ bos_token }}" + CHATML
    with_bos = Tokenizer(tokenizer.backend, chat_template=template)
    without = Tokenizer(tokenizer.backend, chat_template=template, bos_token=None)
    where = [conversation_cache.cache_path(cache, [data], t, (), (), 501) for t in (with_bos, without)]
    assert where[0] != where[1]
    first = conversation_datasets(with_bos, data, None, 0.25, 500, seed=0, cache_dir=cache)
    (path,) = cache.glob("conversations-*.npz")
    for damaged in (path.read_bytes()[:1000], b""):
        path.write_bytes(damaged)
        assert conversation_cache.load(path) is None
        again = conversation_datasets(with_bos, data, None, 0.25, 500, seed=0, cache_dir=cache)
        assert again[0].tokens.tobytes() == first[0].tokens.tobytes()
    killed = cache / f".{path.name}.4242.tmp"
    killed.write_bytes(b"half")
    os.utime(killed, (time.time() - 7200,) * 2)
    conversation_datasets(without, data, None, 0.25, 500, seed=0, cache_dir=cache)  # a write: the old part goes
    assert not killed.exists()

"""The synthetic tool-use data set (`longcat data tools`, docs/tool_data.md)."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections import Counter

import pytest

from longcat_flash.cli import main
from longcat_flash.data.conversations import parse_row, read_conversations
from longcat_flash.data.tool_dialogues import (CASES, CITIES, INTENTS, PARAM_NAMES, SPLITS, VERBS, case_of,
                                               check_conversation, iter_conversations, same_json,
                                               validate_arguments)
from longcat_flash.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {split: list(iter_conversations(300, seed=7, split=split)) for split in SPLITS}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(["the weather in Paris", "call a tool"] * 10, vocab_size=300)


def test_same_seed_same_rows_other_seed_other_rows():
    first = list(iter_conversations(20, seed=3))
    assert first == list(iter_conversations(20, seed=3))
    assert first != list(iter_conversations(20, seed=4))
    assert first != list(iter_conversations(20, seed=3, split="heldout"))


@pytest.mark.parametrize("split", SPLITS)
def test_every_case_is_present(rows, split):
    counts = Counter(map(case_of, rows[split]))
    assert set(counts) == set(CASES)
    assert min(counts.values()) >= 30, counts


@pytest.mark.parametrize("split", SPLITS)
def test_every_row_renders_and_every_call_validates(rows, tok, split):
    for row in rows[split]:
        assert check_conversation(row) == []
        prompt = tok.apply_chat_template(row["messages"], add_generation_prompt=False, tools=row["tools"])
        calls = [c for m in row["messages"] for c in m.get("tool_calls") or []]
        assert prompt.count('<longcat_tool_call>{"name": "') == len(calls)  # the preamble's example has no quote
        assert prompt.count("<longcat_tool_response>") == sum(m["role"] == "tool" for m in row["messages"])


def test_rows_are_openai_shaped(rows):
    for row in rows["train"]:
        assert set(row) == {"messages", "tools"} and all(t["type"] == "function" for t in row["tools"])
        for message in row["messages"]:
            for call in message.get("tool_calls") or []:
                assert call["type"] == "function" and isinstance(call["function"]["arguments"], str)
                assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_check_conversation_catches_bad_calls(rows):
    row = json.loads(json.dumps(next(r for r in rows["train"] if case_of(r) == "single")))
    call = next(m for m in row["messages"] if m.get("tool_calls"))["tool_calls"][0]
    call["function"]["arguments"] = json.dumps({"nonsense": True})
    assert any("unexpected argument" in e for e in check_conversation(row))
    call["function"]["name"] = "no_such_tool"
    assert any("not offered" in e for e in check_conversation(row))


def test_validator_subset():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"},
                                               "u": {"type": "string", "enum": ["a", "b"]}, "f": {"type": "boolean"}},
              "required": ["n"], "additionalProperties": False}
    assert validate_arguments({"n": 1, "x": 2, "u": "a", "f": False}, schema) == []
    assert validate_arguments({"n": True}, schema) == ["'n' must be integer, got True"]
    assert validate_arguments({"n": 1, "u": "c"}, schema) == ["'u' must be one of ['a', 'b'], got 'c'"]
    assert validate_arguments({"x": 1.5}, schema) == ["missing required 'n'"]
    assert validate_arguments([], schema) == ["arguments must be an object, got []"]
    assert validate_arguments({"n": 71.0}, schema) == []  # an integer, as JSON Schema 2020-12 reads it
    assert validate_arguments({"n": 71.5}, schema) == ["'n' must be integer, got 71.5"]


def test_json_equality_is_by_value_not_by_text():
    """A reply's 25 against the expected 25.0 (the generator writes half-amounts as 61.0) scored wrong arguments."""
    assert same_json({"a": 25, "b": [1, {"c": 2.0}]}, {"b": [1.0, {"c": 2}], "a": 25.0})
    assert not same_json({"a": True}, {"a": 1}) and not same_json(0, False) and not same_json([1], [1, 1])
    assert not same_json({"a": 1}, {"a": 1, "b": None}) and not same_json("1", 1) and same_json(None, None)


def test_check_conversation_reads_what_a_model_writes_and_every_rule_of_a_row(rows):
    """Arguments that are not JSON raised JSONDecodeError, arguments as an object TypeError; a call left without its
    result, a result given twice, an id used twice and a row with no final answer all passed."""
    row = next(r for r in rows["train"] if case_of(r) == "parallel")
    call_turn = next(i for i, m in enumerate(row["messages"]) if m.get("tool_calls"))

    def changed(edit) -> list[str]:
        copy = json.loads(json.dumps(row))
        edit(copy["messages"], copy["messages"][call_turn]["tool_calls"])
        return check_conversation(copy)

    first = row["messages"][call_turn]["tool_calls"][0]
    assert changed(lambda m, calls: calls[0]["function"].update(arguments="{bad")) == [
        f"messages[{call_turn}] {first['function']['name']}: arguments are not JSON: '{{bad'"]
    as_object = json.loads(first["function"]["arguments"])
    assert changed(lambda m, calls: calls[0]["function"].update(arguments=as_object)) == []
    assert "were never answered" in changed(lambda m, calls: m.pop(call_turn + 2))[0]  # the second call's result
    assert "answers no call left open" in changed(lambda m, calls: m.insert(call_turn + 2, m[call_turn + 1]))[0]
    swapped = changed(lambda m, calls: m.insert(call_turn + 1, m.pop(call_turn + 2)))
    assert len(swapped) == 1 and "answers a call out of order (the next to answer is" in swapped[0]
    assert any("is used twice" in e for e in changed(lambda m, calls: calls[1].update(id=calls[0]["id"])))
    assert changed(lambda m, calls: m.pop()) == ["the conversation does not end with an assistant answer in text"]


def test_requests_read_as_english(rows):
    """The held-out split asked for "a an hour and a half countdown", both splits for "1 hours", and the words after
    "Please," or "... And" kept their capital ("And What is ...")."""
    texts = [m["content"] for split in SPLITS for row in rows[split] for m in row["messages"] if m["role"] == "user"]
    assert not [t for t in texts if re.search(r"(?<![-\w])(1|one) (hours|minutes)\b|\ba (a|an)\b", t)]
    capitals = {m.group(1) for t in texts for m in re.finditer(r"(?:\bAnd|Also,|Please,|Hey,) ([A-Z][\w']*)", t)}
    assert capitals <= {*CITIES, "I", "I'm", "I'd"}, capitals


def test_a_request_says_please_once():
    """27 of 3570 held-out requests read "Please, Tokyo weather now in celsius, please." """
    texts = [m["content"] for row in iter_conversations(3000, seed=0, split="heldout") for m in row["messages"]
             if m["role"] == "user"]
    assert any("please" in t.lower() for t in texts)
    assert not [t for t in texts if t.lower().count("please") > 1]


def test_train_and_heldout_pools_are_disjoint(rows):
    pools = [VERBS, *PARAM_NAMES.values(), *(i.nouns for i in INTENTS.values()), *(i.templates for i in INTENTS.values())]
    for train, heldout in pools:
        assert not set(train) & set(heldout)
    for intent in INTENTS.values():  # new words, not a train template's with a word changed ("a countdown of ...")
        train, heldout = ({run for t in templates for run in word_runs(t)} for templates in intent.templates)
        assert not train & heldout
    names = {s: {t["function"]["name"] for r in rows[s] for t in r["tools"]} for s in SPLITS}
    params = {s: {p for r in rows[s] for t in r["tools"] for p in t["function"]["parameters"]["properties"]}
              for s in SPLITS}
    assert not names["train"] & names["heldout"] and not params["train"] & params["heldout"]


def word_runs(template: str, n: int = 3) -> set[tuple[str, ...]]:
    """The runs of n words of a template that hold no {slot} (a slot's values are shared by the splits)."""
    words = re.findall(r"\{\w+\}|[\w']+", template.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1) if not any("{" in w for w in words[i:i + n])}


def test_cli_writes_the_file(tmp_path, capsys):
    out = tmp_path / "tools.jsonl"
    main(["data", "tools", "--out", str(out), "--n", "25", "--seed", "1", "--tools-per-conversation", "2"])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 25 and all(len(json.loads(line)["tools"]) == 2 for line in lines)
    assert lines == [json.dumps(r, ensure_ascii=False) for r in iter_conversations(25, 1, tools_per_conversation=2)]
    assert "wrote 25" in capsys.readouterr().out


def test_cli_writes_what_its_name_says_sft_reads(tmp_path):
    """A .parquet (or unsuffixed) --out got JSON Lines that sft then refused as no Parquet; .gz was not gzip."""
    for name in ("rows.parquet", "rows", "rows.arrow.gz"):
        with pytest.raises(SystemExit, match=f"--out {tmp_path / name}: the conversations are JSON Lines; name a "
                                             ".jsonl file"):
            main(["data", "tools", "--out", str(tmp_path / name), "--n", "2"])
        assert not (tmp_path / name).exists()
    for name in ("a.jsonl.gz", "b.JSONL.GZ"):
        main(["data", "tools", "--out", str(tmp_path / name), "--n", "4", "--seed", "3"])
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.JSONL.GZ").read_bytes()  # same seed, same bytes
    got = [c.messages for c in read_conversations(tmp_path / "a.jsonl.gz")]
    assert got == [parse_row(r, "x").messages for r in iter_conversations(4, 3)]


def test_cli_never_overwrites_a_file_unless_forced(tmp_path):
    out = tmp_path / "config.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as err:
        main(["data", "tools", "--out", str(out), "--n", "2"])
    assert "pass --force" in str(err.value) and out.read_text() == "{}"
    main(["data", "tools", "--out", str(out), "--n", "2", "--force"])
    assert len(out.read_text().splitlines()) == 2


def test_cli_writes_through_a_symlink_to_standard_output_and_never_over_a_fifo(tmp_path, capsys):
    """The rename that makes a write atomic replaced whatever --out named: a FIFO or a device (/dev/null, as root)
    became a plain file, and a symlink a file of its own beside its target."""
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in iter_conversations(3, 0))
    (tmp_path / "real.jsonl").write_text("{}")
    (tmp_path / "link.jsonl").symlink_to("real.jsonl")
    main(["data", "tools", "--out", str(tmp_path / "link.jsonl"), "--n", "3", "--force"])
    assert (tmp_path / "link.jsonl").is_symlink() and (tmp_path / "real.jsonl").read_text() == expected
    (tmp_path / "link.jsonl.gz").symlink_to("real.jsonl")  # gzip by one name, plain by the other: either misreads
    with pytest.raises(SystemExit, match="link.jsonl.gz links to .*real.jsonl: one name says gzip and the other not"):
        main(["data", "tools", "--out", str(tmp_path / "link.jsonl.gz"), "--n", "3", "--force"])
    assert (tmp_path / "real.jsonl").read_text() == expected
    capsys.readouterr()
    main(["data", "tools", "--out", "-", "--n", "3"])
    captured = capsys.readouterr()
    assert captured.out == expected and captured.err == "wrote 3 train conversations -> standard output\n"
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(SystemExit, match="fifo.jsonl is not a regular file"):
        main(["data", "tools", "--out", str(tmp_path / "fifo.jsonl"), "--n", "3", "--force"])
    assert stat.S_ISFIFO((tmp_path / "fifo.jsonl").lstat().st_mode)


def test_cli_killed_by_sigterm_leaves_no_temporary_file(tmp_path):
    """`timeout` or `kill` ended the command with a hidden .NAME.PID.tmp of everything written so far."""
    command = [sys.executable, "-m", "longcat_flash.cli", "data", "tools", "--out", str(tmp_path / "big.jsonl"),
               "--n", "100000000"]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 60
        while not any(tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # some rows written
        assert any(tmp_path.iterdir()), "the command wrote nothing within a minute"
        proc.terminate()
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM and proc.stderr.read() == b""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--n", "5", "--tools-per-conversation", "9"], "--tools-per-conversation must be in 1..5"),
    (["--n", "5", "--missing-dir"], "does not exist"),
])
def test_cli_refuses_bad_arguments_in_one_line(tmp_path, argv, message):
    out = tmp_path / ("nowhere/x.jsonl" if "--missing-dir" in argv else "x.jsonl")
    argv = [a for a in argv if a != "--missing-dir"]
    with pytest.raises(SystemExit) as err:
        main(["data", "tools", "--out", str(out), *argv])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()

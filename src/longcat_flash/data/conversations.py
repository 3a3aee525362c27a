"""Conversations for supervised fine-tuning: check the rows conversation_files.py reads (OpenAI `messages`, or TRL's
prompt-completion, ShareGPT and Alpaca rows read as the same); conversation_tokens.py renders them with the model's
chat template and marks the assistant tokens, conversation_packing.py packs them into fixed-length windows
(docs/sft.md).

    rows (.jsonl / .json / .parquet / .arrow)  ->  Conversation (checked, content parts joined)
                                               ->  (conversation_tokens.py) tokens + trained mask
                                               ->  (conversation_packing.py) windows of seq_len + 1 tokens

A bad row is an error naming the file, the line (the row of a .parquet or a JSON array, from 1) and the field.
Every field we read is honoured: one we would have to drop (an image part, a message `name`, a reasoning field, a
column not named in `ignore`) is an error.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from .conversation_files import ConversationError, decoded_json, row_files, rows
from .row_fields import (as_list, as_object, as_string, check_structure, decode_json_field, fail, known_fields,
                         parse_json_field, without_nulls)

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer name for the system role (read as the server reads it) and its legacy role for a function's result
ROLE_ALIASES = {"developer": "system", "function": "tool"}
# functions: OpenAI's legacy function calling (a list of functions); parallel_tool_calls: OpenAI's fine-tuning rows
ROW_FIELDS = ("messages", "tools", "functions", "parallel_tool_calls")
PROMPT_COMPLETION_FIELDS = ("prompt", "completion", "tools")  # TRL's conversational prompt-completion rows
SHAREGPT_FIELDS = ("conversations", "system", "tools")  # ShareGPT rows, as LLaMA-Factory and axolotl read them
BLANK_IS_ABSENT = ("tools", "functions", "system")  # row columns whose "" means none
ALPACA_FIELDS = ("instruction", "input", "output", "system", "history")  # Alpaca rows, as LLaMA-Factory reads them
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
MESSAGE_FIELDS = {"system": ("role", "content"), "user": ("role", "content"),
                  "assistant": ("role", "content", "tool_calls", "function_call", "weight"),
                  "tool": ("role", "content", "tool_call_id", "name")}
TOOL_CALL_FIELDS = ("id", "type", "function")
FUNCTION_CALL_FIELDS = ("name", "arguments")
TOOL_FIELDS = ("type", "function")
FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
TOOL_NAME = r"^[A-Za-z0-9_.-]{1,64}$"  # a function's name: OpenAI's rule, which the server applies to requests too


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, Any]]  # checked, content parts joined into strings, null fields removed
    tools: list[dict[str, Any]] | None
    where: str  # "file:line", for later errors
    untrained: frozenset[int] = frozenset()  # indices of assistant messages with weight 0 (rendered, not trained)
    names: tuple[str, ...] = ()  # each message's field in the row ("conversations[2]", "completion[0]"), for errors
    call_fields: tuple[tuple[str, ...], ...] = ()  # each message's calls' fields in the row, likewise

    def field(self, i: int) -> str:
        """Message i as the row names it (messages[i] where the row had no other name for it)."""
        return self.names[i] if i < len(self.names) else f"messages[{i}]"

    def call_field(self, i: int, j: int) -> str:
        """Call j of message i as the row names it."""
        return self.call_fields[i][j] if i < len(self.call_fields) else f"{self.field(i)}.tool_calls[{j}]"

    def in_row_terms(self, text: str) -> str:
        """An error about the normalised messages (`messages[3] is ...`) in the row's own field names."""
        return re.sub(r"messages\[(\d+)\]", lambda m: self.field(int(m.group(1))), text)


# ---- reading and checking ----

PANDAS_INDEX = re.compile(r"^__index_level_\d+__$")  # a DataFrame's index, kept as a column by pandas and datasets


def read_conversations(path: str | Path, ignore: Sequence[str] = ()) -> list[Conversation]:
    """Every row of a .jsonl, .json, .parquet or .arrow file, or of every such file in a directory (a data set's
    shards, `data/train-00000-of-00004.parquet` ..., or a `datasets` save_to_disk), as a checked Conversation (the
    first bad row is an error).
    `ignore`: columns that are not part of the conversation (an `id`, a `source`), skipped by name."""
    return list(iter_conversations(path, ignore))


def iter_conversations(path: str | Path, ignore: Sequence[str] = ()) -> Iterator[Conversation]:
    """read_conversations' rows one at a time, for a reader that keeps only what it makes of each."""
    return (parse_row(row, where, ignore) for file in row_files(path) for where, row in rows(file, ignore))


def parse_row(row: Any, where: str, ignore: Sequence[str] = ()) -> Conversation:
    """Check one row and normalise it; ConversationError names the field. A row is {"messages": [...], "tools":
    [...]}, TRL's conversational {"prompt": [...], "completion": [...], "tools": [...]} (only the completion's
    assistant turns trained), ShareGPT's {"conversations": [...], "system": ..., "tools": ...} or Alpaca's
    {"instruction", "input", "output", "system", "history"}; `ignore` names row fields that are not part of the
    conversation. A tool may be the function object alone.

    A null field counts as absent at every depth (`without_nulls`), and so does a blank `tools`, `functions` or
    `system` column (how converted data sets mark "none"); content parts of type text are joined into one string;
    `tools` and a tool's `parameters` may be JSON strings, as data sets store them."""
    row = {k: v for k, v in as_object(row, where, "row").items() if k not in ignore and not PANDAS_INDEX.match(k)}
    check_structure(row, where, "row")  # before anything walks it recursively
    row = {k: v for k, v in without_nulls(row).items()
           if not (k in BLANK_IS_ABSENT and isinstance(v, str) and not v.strip())}
    if "messages" not in row and ("prompt" in row or "completion" in row):
        named, untrained = _prompt_completion(row, where)
    elif "messages" not in row and "conversations" in row:
        named, untrained = _sharegpt(row, where), set()
    elif "messages" not in row and ("instruction" in row or "output" in row):
        named, untrained = _alpaca(row, where), set()
    else:
        _known_columns(row, ROW_FIELDS, where)
        if "messages" not in row:
            raise ConversationError(f"{where}: messages: missing (a row is {{\"messages\": [...], \"tools\": [...]}})")
        named = [(f"messages[{i}]", m) for i, m in enumerate(as_list(row["messages"], where, "messages"))]
        untrained = set()
    if "tools" in row and "functions" in row:
        raise ConversationError(f"{where}: functions: give tools or functions (OpenAI's legacy name), not both")
    field = "functions" if "functions" in row else "tools"
    tools = _tools(row[field], where, field) if field in row else None
    if not named:
        raise ConversationError(f"{where}: messages: empty")
    messages: list[dict[str, Any]] = []
    for i, (name, message) in enumerate(named):
        messages.append(_message(message, where, name, i, messages))
        if _weight(message, where, f"{name}.weight") == 0:
            untrained.add(i)
    _check_answered(messages, named, where)
    _check_parallel(row.get("parallel_tool_calls", True), messages, named, where)
    _check_declared(tools, messages, named, where, field)
    replies = named[-1][0].partition("[")[0]  # where the replies are: messages, a TRL row's completion, ...
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError(f"{where}: {replies}: no assistant message (nothing to train on)")
    if all(m["role"] != "assistant" or i in untrained for i, m in enumerate(messages)):
        raise ConversationError(f"{where}: {replies}: every assistant message has weight 0 (nothing to train on)")
    calls = tuple(tuple(_call_field(name, raw, message, j) for j in range(len(message.get("tool_calls") or [])))
                  for (name, raw), message in zip(named, messages))
    return Conversation(messages, tools, where, frozenset(untrained), tuple(name for name, _ in named), calls)


def _check_declared(tools: list[dict[str, Any]] | None, messages: list[dict[str, Any]],
                    named: list[tuple[str, Any]], where: str, field: str) -> None:
    """With `tools` given, every call names one of them: a call to an undeclared tool would teach the model to
    call tools its prompt does not offer."""
    if tools is None:
        return
    offered = {tool["function"]["name"] for tool in tools}
    for (name, raw), message in zip(named, messages):
        for j, call in enumerate(message.get("tool_calls") or []):
            if call["function"]["name"] not in offered:
                raise ConversationError(f"{where}: {_call_field(name, raw, message, j, of_name=True)}: "
                                        f"{call['function']['name']!r} is not among the row's {field} "
                                        f"({', '.join(sorted(offered)) or 'none'})")


def _call_field(name: str, raw: Any, message: dict[str, Any], j: int, of_name: bool = False) -> str:
    """The row's field holding call j of the message it names `name` (`raw` as the row has it, `message` checked),
    or (`of_name`) that call's function name: a ShareGPT turn's JSON `value` (value[j] of a list of calls), a
    legacy `function_call`, OpenAI's tool_calls[j]."""
    if name.startswith("conversations["):
        return f"{name}.value" if len(message["tool_calls"]) == 1 else f"{name}.value[{j}]"
    if isinstance(raw, dict) and "function_call" in raw:
        return f"{name}.function_call" + ".name" * of_name
    return f"{name}.tool_calls[{j}]" + ".function.name" * of_name


def _check_answered(messages: list[dict[str, Any]], named: list[tuple[str, Any]], where: str) -> None:
    """Each call is answered by a tool message before the conversation goes on: a model trained on a turn that
    follows an unanswered call learns to answer without the result (and the server refuses such a history). A last
    turn of calls may stand alone: it trains the calls themselves."""
    for i, message in enumerate(messages):
        calls = message.get("tool_calls") or []
        results = next((k for k, m in enumerate(messages[i + 1:]) if m["role"] != "tool"), len(messages) - i - 1)
        if calls and results < len(calls) and i + 1 < len(messages):
            until = f"before {named[i + 1 + results][0]}" if i + 1 + results < len(messages) else "at the end"
            raise fail(where, named[i][0], f"call {results + 1} of its {len(calls)} "
                                            f"({calls[results]['function']['name']}) has no tool result {until} (one "
                                            "tool message answers each call, in order)")


def _check_parallel(parallel: Any, messages: list[dict[str, Any]], named: list[tuple[str, Any]], where: str) -> None:
    """OpenAI's `parallel_tool_calls`: true changes nothing; false (the row was made with parallel calls off) holds
    only if no assistant turn makes more than one call, which is all it means for training."""
    if not isinstance(parallel, bool):
        raise ConversationError(f"{where}: parallel_tool_calls: must be true or false, got {parallel!r}")
    for (name, _), message in zip(named, messages):
        if not parallel and len(message.get("tool_calls") or []) > 1:
            raise ConversationError(f"{where}: {name}.tool_calls: {len(message['tool_calls'])} calls in one turn, "
                                    "but the row sets parallel_tool_calls: false")


def _prompt_completion(row: dict[str, Any], where: str) -> tuple[list[tuple[str, Any]], set[int]]:
    """TRL's conversational prompt-completion row as one list of (name, message), and the indices of the prompt's
    assistant turns: context, not trained (TRL trains on the completion only)."""
    _known_columns(row, PROMPT_COMPLETION_FIELDS, where)
    for name in ("prompt", "completion"):
        if name not in row:
            raise fail(where, name, "missing (a prompt-completion row has both)")
        if isinstance(row[name], str):
            raise fail(where, name, "a string (TRL's standard format); conversations need a list of messages")
    prompt, completion = as_list(row["prompt"], where, "prompt"), as_list(row["completion"], where, "completion")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
        raise fail(where, "completion", "no assistant message (nothing to train on)")
    context = {i for i, m in enumerate(prompt) if isinstance(m, dict) and m.get("role") == "assistant"}
    if any(prompt[i].get("weight") == 1 for i in context):
        raise fail(where, "prompt", "a weight of 1 on a prompt turn (the prompt is context, never trained)")
    named = [(f"prompt[{i}]", m) for i, m in enumerate(prompt)] + [(f"completion[{i}]", m)
                                                                  for i, m in enumerate(completion)]
    return named, context


def _sharegpt(row: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """A ShareGPT row ({"conversations": [{"from", "value"}], "system", "tools"}) as OpenAI messages: `human` is
    the user, `gpt` the assistant, a `function_call` (a JSON {"name", "arguments"}, or a list of them) an
    assistant turn of tool calls and an `observation` a tool result, as LLaMA-Factory writes them."""
    _known_columns(row, SHAREGPT_FIELDS, where)
    named = _system_column(row, where)
    unanswered = 0  # calls of the latest function_call turn that no observation has answered yet
    turns = as_list(row["conversations"], where, "conversations")
    for i, turn in enumerate(turns):
        name = f"conversations[{i}]"
        turn = as_object(turn, where, name)
        known_fields(turn, ("from", "value"), where, f"{name}.", "a ShareGPT turn has")
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        if role is None:
            raise fail(where, f"{name}.from", f"{turn.get('from')!r} is not one of {'/'.join(SHAREGPT_ROLES)}")
        if "value" not in turn:
            raise fail(where, f"{name}.value", "missing")
        if role == "tool" and not unanswered:  # named here, in ShareGPT's words: the messages' checks say role
            raise fail(where, f"{name}.from", f"{turn['from']!r} answers no call: it must follow a function_call "
                                               "turn, one per call")
        if role != "tool" and unanswered:
            raise fail(where, f"{name}.from", f"{unanswered} call(s) of the function_call turn before have no "
                                               "observation (one per call comes before the conversation goes on)")
        first = role == "tool" and "tool_calls" in named[-1][1]  # the observation right after the calls
        if first and unanswered > 1 and not _answers_next(turns, i + 1):  # one observation answers them all
            named += _observations(turn["value"], unanswered, where, f"{name}.value")
            unanswered = 0
            continue
        unanswered -= role == "tool"
        if role == "system" and named:
            raise fail(where, f"{name}.from", "a system turn must come first (and the row's system column is one)")
        if role == "assistant" and not named:
            raise fail(where, f"{name}.from", "a conversation starts with a system or user turn")
        if turn["from"] != "function_call":  # values checked here, so that errors name the row's own fields
            named.append((name, {"role": role, "content": _content(turn["value"], where, f"{name}.value")}))
            continue
        calls = decode_json_field(as_string(turn["value"], where, f"{name}.value"), where, f"{name}.value")
        many = not isinstance(calls, dict)
        calls = as_list(calls, where, f"{name}.value") if many else [calls]
        if not calls:
            raise fail(where, f"{name}.value", "an empty list of calls (a function_call turn makes at least one)")
        named.append((name, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": _function_call(c, where, f"{name}.value" + (f"[{k}]" if many else ""))}
            for k, c in enumerate(calls)]}))
        unanswered = len(calls)
    return named


def _answers_next(turns: list[Any], i: int) -> bool:
    """Whether turn `i` of a ShareGPT row is another observation (so each observation answers one call)."""
    return i < len(turns) and isinstance(turns[i], dict) and SHAREGPT_ROLES.get(turns[i].get("from")) == "tool"


def _observations(value: Any, calls: int, where: str, name: str) -> list[tuple[str, Any]]:
    """One observation answering the `calls` calls of the turn before it (LLaMA-Factory's turns alternate, so its
    rows give one): a JSON list with one result per call, as that many tool messages (a result that is not a
    string written as JSON)."""
    text = as_string(value, where, name)
    try:
        results = decoded_json(text, where, name, "")
    except ConversationError:  # plain text ("[ERROR] timed out"): the message below says what it needs to be
        results = None
    if isinstance(results, list):
        check_structure(results, where, name)  # a list nested too deep is named as such
    if not isinstance(results, list) or len(results) != calls:
        raise fail(where, name, f"one observation answers the {calls} calls of the function_call turn before it: "
                                 f"give a JSON list of {calls} results (one per call, in the calls' order), or one "
                                 "observation per call")
    return [(f"{name}[{k}]", {"role": "tool", "content": result if isinstance(result, str) else
                              json.dumps(result, ensure_ascii=False)}) for k, result in enumerate(results)]


def _system_column(row: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """The system message of a ShareGPT or Alpaca row's `system` column (a string), as (name, message) pairs (none
    or one); an error names the column, not the message made of it."""
    if "system" not in row:
        return []
    return [("system", {"role": "system", "content": _column_text(row["system"], where, "system")})]


def _column_text(value: Any, where: str, field: str) -> str:
    """A ShareGPT or Alpaca column's text, checked as a message's content is, but named as the row names it (the
    checks of the message made of it would name a `content` the row does not have)."""
    return _content(as_string(value, where, field), where, field)


def _alpaca(row: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """An Alpaca row ({"instruction", "input", "output", "system", "history"}) as OpenAI messages, as LLaMA-Factory
    reads it: the user gives the instruction, then the input on a new line when there is one, and the assistant
    answers the output; `history` holds the earlier turns as [user, assistant] pairs, trained like the last."""
    _known_columns(row, ALPACA_FIELDS, where)
    for key in ("instruction", "output"):
        if key not in row:
            raise fail(where, key, "missing (an Alpaca row has an instruction and an output)")
    named = _system_column(row, where)
    for i, pair in enumerate(as_list(row.get("history", []), where, "history")):
        pair = as_list(pair, where, f"history[{i}]")
        if len(pair) != 2:
            raise fail(where, f"history[{i}]", f"a [user, assistant] pair, got {len(pair)} items")
        named += [(f"history[{i}][{j}]", {"role": role, "content": _column_text(text, where, f"history[{i}][{j}]")})
                  for j, (role, text) in enumerate(zip(("user", "assistant"), pair))]
    asked = "\n".join(_column_text(row[k], where, k) for k in ("instruction", "input") if row.get(k, "") != "")
    return [*named, ("instruction", {"role": "user", "content": asked}),
            ("output", {"role": "assistant", "content": _column_text(row["output"], where, "output")})]


def _weight(message: dict[str, Any], where: str, name: str) -> int:
    """An assistant message's `weight` (OpenAI's fine-tuning format): 1 (the default) trains on it, 0 does not."""
    weight = message.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):  # 1.0 too: a column pandas made float
        raise fail(where, name, f"must be 0 or 1, got {weight!r:.60}")
    return int(weight)


def _known_columns(row: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in row:
        if key not in allowed and _holds_rows(row[key]):  # a .json file of one object, `{"data": [...]}`
            raise fail(where, key, "holds rows, not a conversation: write the rows as a JSON array (.json) or one "
                                    "per line (.jsonl)")
        if key not in allowed:
            raise fail(where, key, f"unsupported field (a row has: {', '.join(ROW_FIELDS)}; TRL's prompt-completion "
                                    f"rows: {', '.join(PROMPT_COMPLETION_FIELDS)}; ShareGPT rows: "
                                    f"{', '.join(SHAREGPT_FIELDS)}; Alpaca rows: {', '.join(ALPACA_FIELDS)}). Skip "
                                    "columns that are not part of the conversation with --set "
                                    "sft.ignore_columns=NAME,NAME")


def _holds_rows(value: Any) -> bool:
    """A list whose first item is a row of some format (it has a row field of one), not a part of one row."""
    row_fields = {*ROW_FIELDS, *PROMPT_COMPLETION_FIELDS, *SHAREGPT_FIELDS, *ALPACA_FIELDS}
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and bool(row_fields & value[0].keys())


def _message(raw: Any, where: str, name: str, index: int, before: list[dict[str, Any]]) -> dict[str, Any]:
    message = as_object(raw, where, name)
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise fail(where, f"{name}.role", f"{role!r} is not one of {'/'.join((*ROLES, *ROLE_ALIASES))}")
    # a field that carries nothing (an SDK reply's `model_dump()`: refusal None, annotations []) is not unknown
    empty = [key for key, value in message.items() if key not in MESSAGE_FIELDS[role] and value in (None, [], {})]
    known_fields({k: v for k, v in message.items() if k not in empty}, MESSAGE_FIELDS[role], where, f"{name}.",
           f"a {role} message has")
    if role == "system" and index != 0:
        raise fail(where, f"{name}.role", "a system message must come first")
    if role == "assistant" and index == 0:
        raise fail(where, f"{name}.role", "a conversation starts with a system or user message")
    out: dict[str, Any] = {"role": role}
    if role == "assistant" and "tool_calls" in message:
        if "function_call" in message:
            raise fail(where, f"{name}.function_call", "give tool_calls or function_call (OpenAI's legacy one "
                                                         "call), not both")
        calls = as_list(message["tool_calls"], where, f"{name}.tool_calls")
        if calls:
            out["tool_calls"] = [_tool_call(c, where, f"{name}.tool_calls[{j}]") for j, c in enumerate(calls)]
            _distinct_call_ids(out["tool_calls"], where, name)
    elif role == "assistant" and "function_call" in message:
        out["tool_calls"] = [{"type": "function",
                              "function": _function_call(message["function_call"], where, f"{name}.function_call")}]
    if "content" in message:
        out["content"] = _content(message["content"], where, f"{name}.content")
    elif role != "assistant" or "tool_calls" not in out:
        raise fail(where, f"{name}.content", "missing" + (" (an assistant message needs content or tool_calls)"
                                                            if role == "assistant" else ""))
    else:
        out["content"] = None
    if role == "tool":
        _check_tool_result(message, where, name, before)
        out.update({k: message[k] for k in ("tool_call_id", "name") if k in message})
    return out


def _content(value: Any, where: str, name: str) -> str:
    """A string, or a list of {"type": "text", "text": ...} parts joined into one; without the tool-call tags,
    which the tokenizer reads as the tag tokens in any text: a call spelt out in content would train a call that
    none of tool_calls' checks (a declared tool, a valid name, JSON arguments) has seen."""
    text = _text(value, where, name)
    _no_tags(text, where, name, "write a call as tool_calls, where it is checked")
    return text


def _no_tags(text: str, where: str, name: str, remedy: str) -> None:
    """Refuse text holding a tool-call tag, which the tokenizer reads as the tag token wherever it stands."""
    if tag := next((tag for tag in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE) if tag in text), None):
        raise fail(where, name, f"holds the tool-call tag {tag}: {remedy}")


def _text(value: Any, where: str, name: str) -> str:
    if isinstance(value, str):
        return as_string(value, where, name)
    if not isinstance(value, (list, tuple)):
        raise fail(where, name, f"must be a string or a list of text parts, got {type(value).__name__} "
                                 f"{value!r:.60}")
    parts = []
    for i, part in enumerate(value):
        part = as_object(part, where, f"{name}[{i}]")
        if part.get("type") != "text":
            raise fail(where, f"{name}[{i}].type", f"{part.get('type')!r} is not supported (only text parts)")
        known_fields(part, ("type", "text"), where, f"{name}[{i}].", "a text part has")
        parts.append(as_string(part.get("text"), where, f"{name}[{i}].text"))
    return "".join(parts)


def _tool_call(raw: Any, where: str, name: str) -> dict[str, Any]:
    call = as_object(raw, where, name)
    known_fields(call, TOOL_CALL_FIELDS, where, f"{name}.", "a tool call has")
    if call.get("type", "function") != "function":
        raise fail(where, f"{name}.type", f"{call['type']!r} is not supported (only 'function')")
    if "id" in call:
        as_string(call["id"], where, f"{name}.id")
    return {**call, "function": _function_call(call.get("function"), where, f"{name}.function")}


def _distinct_call_ids(calls: list[dict[str, Any]], where: str, name: str) -> None:
    """Two calls of one turn with the same id: their results could not be told apart (the server refuses such a
    conversation too)."""
    ids = [call.get("id") for call in calls]
    for j, call_id in enumerate(ids):
        if call_id is not None and call_id in ids[:j]:
            raise fail(where, f"{name}.tool_calls[{j}].id", f"{call_id!r} is also the id of call "
                                                              f"{ids.index(call_id) + 1}: each call needs its own")


def _function_call(raw: Any, where: str, name: str) -> dict[str, Any]:
    """{"name", "arguments"}: a call's function, or a legacy assistant message's whole `function_call`."""
    fn = as_object(raw, where, name)
    known_fields(fn, FUNCTION_CALL_FIELDS, where, f"{name}.", "a function call has")
    _function_name(fn.get("name"), where, f"{name}.name")
    arguments = fn.get("arguments", {})
    parsed = parse_json_field(arguments, where, f"{name}.arguments", "not valid JSON") if isinstance(arguments, str) \
        else arguments
    if not isinstance(parsed, dict):
        raise fail(where, f"{name}.arguments", f"must be a JSON object, got {arguments!r:.60}")
    _json_numbers(parsed, where, f"{name}.arguments", f"the server would return such a call as text): "
                                                      f"{arguments!r:.60}")
    _no_tags(arguments if isinstance(arguments, str) else json.dumps(parsed, ensure_ascii=False), where,
             f"{name}.arguments", "the tokenizer reads it as the tag token, so the model would learn a call that "
                                  "ends there (the server cuts it at the tag)")
    return {"name": fn["name"], "arguments": arguments}


def _json_numbers(value: Any, where: str, name: str, why: str) -> None:
    """No NaN or Infinity in `value`: Python's json reads and writes them, but they are not JSON (`why` says what
    that breaks; it closes the parenthesis it opens)."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise fail(where, name, f"holds NaN or Infinity, which JSON has no place for ({why}") from None


def _check_tool_result(message: dict[str, Any], where: str, name: str, before: list[dict[str, Any]]) -> None:
    """A tool message answers a call of the assistant turn just before the run of tool messages it is in."""
    at = next((i for i in range(len(before) - 1, -1, -1) if before[i]["role"] != "tool"), None)
    calls = [] if at is None or before[at]["role"] != "assistant" else before[at].get("tool_calls", [])
    if not calls:
        raise fail(where, f"{name}.role", "a tool message must follow an assistant message with tool_calls")
    results = len(before) - at - 1  # tool messages already answering this turn
    if results >= len(calls):
        raise fail(where, f"{name}.role", f"more tool results than the {len(calls)} call(s) before them")
    if "tool_call_id" in message:
        ids = [c.get("id") for c in calls]
        given = as_string(message["tool_call_id"], where, f"{name}.tool_call_id")
        if given not in ids:
            raise fail(where, f"{name}.tool_call_id", f"{given!r} answers none of the calls before it "
                                                        f"({', '.join(map(str, ids))})")
        if given != ids[results]:  # also where this slot's call has no id: `given` is another call's
            raise fail(where, f"{name}.tool_call_id", f"{given!r} is result {results + 1} but answers call "
                                                        f"{ids.index(given) + 1}: results follow the order of the "
                                                        "calls (the prompt pairs them by position)")
    if "name" in message:  # the call it answers: the one at its position (which its tool_call_id names too)
        names = [c["function"]["name"] for c in calls]
        if as_string(message["name"], where, f"{name}.name") != names[results]:
            answered = (f"the call {message['tool_call_id']!r} it answers" if "tool_call_id" in message else
                        f"call {results + 1}, which result {results + 1} answers (results follow the order of the "
                        f"calls: {', '.join(names)})")
            raise fail(where, f"{name}.name", f"{message['name']!r}, but {answered} is to {names[results]!r}")


def _function_name(value: Any, where: str, name: str) -> str:
    """A tool's or a call's function name, held to the rule the server applies to a request's tools."""
    if not re.fullmatch(TOOL_NAME, as_string(value, where, name)):
        raise fail(where, name, f"{value!r} is not a function name the server accepts (1 to 64 letters, digits, "
                                 "'_', '.', '-'), so the model could never be served it")
    return value


def _tools(raw: Any, where: str, field: str = "tools") -> list[dict[str, Any]] | None:
    """A row's `tools` (or legacy `functions`): a list, or a JSON string holding one, of tools with distinct names
    (as the server requires: a call could not say which of two it means); the string "null" (a missing column
    written as JSON) is none."""
    if (decoded := decode_json_field(raw, where, field)) is None:
        return None
    tools = [_tool(t, where, f"{field}[{i}]") for i, t in enumerate(as_list(decoded, where, field))]
    names = [tool["function"]["name"] for tool in tools]
    if dup := next((n for i, n in enumerate(names) if n in names[:i]), None):
        raise fail(where, field, f"two tools are named {dup!r}")
    return tools


def _tool(raw: Any, where: str, name: str) -> dict[str, Any]:
    """One tool; its own and its function's null fields count as absent, as the server reads a request's tools
    (a `tools` JSON string keeps its nulls below that: a schema's `"default": null` is the writer's)."""
    tool = {k: v for k, v in as_object(raw, where, name).items() if v is not None}
    if "function" not in tool and "name" in tool:  # the function alone, as LLaMA-Factory and others store tools,
        if tool.get("type", "function") != "function":  # or with its type, as OpenAI's Responses API does
            raise fail(where, f"{name}.type", f"{tool['type']!r} is not supported (only 'function')")
        fn, at = {k: v for k, v in tool.items() if k != "type"}, name
    else:
        known_fields(tool, TOOL_FIELDS, where, f"{name}.", "a tool has")
        if tool.get("type") != "function":
            raise fail(where, f"{name}.type", f"{tool.get('type')!r} is not supported (only 'function')")
        fn, at = as_object(tool.get("function"), where, f"{name}.function"), f"{name}.function"
        fn = {k: v for k, v in fn.items() if v is not None}
    known_fields(fn, FUNCTION_FIELDS, where, f"{at}.", "a function has")
    _function_name(fn.get("name"), where, f"{at}.name")
    if "description" in fn:
        as_string(fn["description"], where, f"{at}.description")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):  # the server refuses 1, "yes", ...
        raise fail(where, f"{at}.strict", f"must be true or false, got {fn['strict']!r:.60}")
    if "parameters" in fn:
        parameters = as_object(decode_json_field(fn["parameters"], where, f"{at}.parameters"), where,
                               f"{at}.parameters")
        if parameters.get("type", "object") != "object":
            raise fail(where, f"{at}.parameters", 'must be a JSON Schema with "type": "object" (arguments are a '
                                                   "JSON object, as the server requires)")
        _json_numbers(parameters, where, f"{at}.parameters", "the prompt would show the model a schema that is not "
                                                             "JSON, and the server refuses it)")
        fn = {**fn, "parameters": parameters}
    return {"type": "function", "function": fn}

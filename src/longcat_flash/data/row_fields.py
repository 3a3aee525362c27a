"""The checks every field of a conversation row passes, whatever its format (data/conversations.py): the type it
must have, text that is text (no lone surrogates), nesting within MAX_DEPTH, JSON held in strings decoded, nulls
dropped. Each failure is a ConversationError naming the file, the line and the field.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .conversation_files import ConversationError, decoded_json

LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # in a decoded str, only a half pair can be one
MAX_DEPTH = 100  # objects and lists in a row: a conversation nests ~6 deep, a tool schema a dozen more


def without_nulls(value: Any) -> Any:
    """value with every null field of every object removed, at any depth. A .parquet (and a .jsonl written from
    Arrow, as `datasets` writes one) stores a list of objects as one struct with every key any of them has, the
    absent ones null: without this, one row's tool schemas and arguments would carry every other row's parameter
    names as nulls into the rendered prompt. Nulls inside lists stay."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [without_nulls(v) for v in value]
    return value


def decode_json_field(value: Any, where: str, name: str) -> Any:
    """A JSON string decoded (data sets often store tools and schemas so; its nulls are the writer's own and stay),
    anything else as it is."""
    if not isinstance(value, str):
        return value
    return parse_json_field(value, where, name, "a string here must hold JSON")


def parse_json_field(text: str, where: str, name: str, what: str) -> Any:
    """JSON text held in a string field, decoded and checked as a row is."""
    value = decoded_json(text, where, name, what)
    check_structure(value, where, name)
    return value


def check_structure(value: Any, where: str, name: str) -> None:
    """Every string in `value` (keys too) is text, and nothing nests deeper than MAX_DEPTH: checked without
    recursion, so that a pathological row is an error naming its field rather than a RecursionError."""
    stack = [(value, name, 0)]
    while stack:
        item, at, depth = stack.pop()
        if isinstance(item, str):
            as_string(item, where, at)
            continue
        if isinstance(item, (dict, list, tuple)) and depth == MAX_DEPTH:
            raise fail(where, at, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, dict):
            for key, child in item.items():
                path = key if at == "row" else f"{at}.{key}"
                if isinstance(key, str):
                    as_string(key, where, f"{path} (the key)")
                stack.append((child, path, depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{at}[{i}]", depth + 1) for i, child in enumerate(item))


def fail(where: str, name: str, problem: str) -> ConversationError:
    return ConversationError(f"{where}: {name}: {problem}")


def as_object(value: Any, where: str, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(where, name, f"expected an object, got {type(value).__name__} {value!r:.60}")
    return value


def as_list(value: Any, where: str, name: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise fail(where, name, f"expected a list, got {type(value).__name__} {value!r:.60}")
    return list(value)


def as_string(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise fail(where, name, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if half := LONE_SURROGATE.search(value):  # JSON's "\ud83d" escape alone: valid JSON, not text
        raise fail(where, name, f"holds a lone surrogate {half.group()!r} at character {half.start()} (half of a "
                                 "UTF-16 pair, as an emoji cut in two leaves), which is not text")
    return value


def known_fields(obj: dict[str, Any], allowed: Sequence[str], where: str, prefix: str, what: str) -> None:
    for key in obj:
        if key not in allowed:
            raise fail(where, f"{prefix}{key}", f"unsupported field ({what}: {', '.join(allowed)})")

"""`--set section.field=value` on a TrainConfig (nanoGPT's configurator, typed): values are parsed with
ast.literal_eval (a dict also as JSON) and checked against the field's annotation; an unknown key is an error
that lists the valid ones. `coerce` and `build` also rebuild a saved train_config.json (train/config.py)."""
from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from ..config import ModelConfig, RopeScaling

if TYPE_CHECKING:
    from .config import TrainConfig


def build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Rebuild a (nested) config dataclass from a plain dict; unknown keys are an error."""
    hints, names = typing.get_type_hints(cls), {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(prefix + k for k in unknown)}; "
                         f"valid: {sorted(prefix + n for n in names)}")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = build(hint, value, f"{prefix}{key}.")
        else:
            values[key] = coerce(value, hint, prefix + key)
    return cls(**values)


def apply_overrides(cfg: TrainConfig, assignments: Sequence[str], model: ModelConfig | None = None) -> TrainConfig:
    """Apply `section.field=value` strings, e.g. ["budget.rate=0.01", "model.num_layers=2"]; a later one wins.

    Each config object is rebuilt once with all of its assignments, so fields that are checked against each
    other (data.batch_size and data.grad_accum, model.num_nextn_predict_layers and loss.mtp_weight) can be set
    in any order. `model` (a checkpoint's, for init_from) replaces cfg's before the assignments, in the same
    rebuild: a recipe's loss.balance_groups or budget.target that does not fit it is checked only once an
    assignment had the chance to change it."""
    items = _parsed_assignments(assignments, "apply_overrides", "budget.rate=0.01")
    return _assign(cfg, ([] if model is None else [(["model"], _Parsed(model))]) + items)


def apply_model_overrides(cfg: ModelConfig, assignments: Sequence[str]) -> ModelConfig:
    """`model.field=value` strings on a model config alone: `longcat init` writes a model that no run trains, so
    no other section exists to set (nor to check the model against, as a run checks loss.mtp_weight)."""
    items = _parsed_assignments(assignments, "apply_model_overrides", "model.num_layers=2")
    for path, _ in items:
        if path[0] != "model" or len(path) < 2:
            raise ValueError(f"--set {'.'.join(path)}: only the model's fields (model.FIELD=VALUE) make a model")
    return _assign(cfg, [(path[1:], raw) for path, raw in items], "model.")


def _parsed_assignments(assignments: Sequence[str], caller: str, example: str) -> list[tuple[list[str], str]]:
    """("a.b", "value") pairs as ([a, b], value) from "a.b=value" strings; a string alone is refused (its
    characters would be read as assignments)."""
    if isinstance(assignments, str):
        raise ValueError(f"{caller} takes a list of 'key=value' strings, got the string {assignments!r}: pass [it]")
    items = []
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. {example}")
        items.append((key.strip().split("."), raw.strip()))
    return items


def _assign(obj: Any, items: list[tuple[list[str], str | _Parsed]], prefix: str = "") -> Any:
    """`obj` with each (path, raw) item set, paths relative to `obj` (which sits at `prefix`), raw parsed for the
    field's type; nested config objects are rebuilt once each, and `obj` too."""
    try:
        return _assign_fields(obj, items, prefix)
    except ValueError as err:  # a config class's own check names it (ModelConfig.moe_topk); --set names the section
        named = f"{type(obj).__name__}."
        if prefix and named in str(err):
            raise ValueError(str(err).replace(named, prefix)) from None
        raise


def _assign_fields(obj: Any, items: list[tuple[list[str], str | _Parsed]], prefix: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    by_field: dict[str, list[tuple[list[str], str]]] = {}
    for path, raw in items:
        if path[0] not in names:
            raise ValueError(f"unknown config field {prefix + '.'.join(path)!r}; valid fields here: "
                             f"{', '.join(prefix + n for n in names)}")
        by_field.setdefault(path[0], []).append((path, raw))
    values = {}
    for name, entries in by_field.items():
        current, inner = getattr(obj, name), []
        for path, raw in entries:
            key = prefix + ".".join(path)
            if dataclasses.is_dataclass(current) and len(path) > 1:
                inner.append((path[1:], raw))
            elif isinstance(raw, _Parsed) and isinstance(raw.value, type(current)):  # a section given whole
                current, inner = raw.value, []  # (apply_overrides' model): the entries after it apply on it
            elif dataclasses.is_dataclass(current):
                whole = _parsed(raw)  # a dict sets several fields of a section at once, e.g. model.rope_scaling=
                if not isinstance(whole, dict):  # {'rope_type': 'yarn', ...}, whose fields depend on each other
                    if isinstance(whole, str) and whole.lstrip().startswith("{"):
                        raise ValueError(f"{key}={whole}: not a dict this can read (a Python or JSON one, every "
                                         "name and text in quotes)")
                    sub = ", ".join(f"{key}.{f.name}" for f in dataclasses.fields(current))
                    raise ValueError(f"{key!r} is a section; set one of its fields ({sub}) or several as a dict")
                if isinstance(current, RopeScaling):  # one value, as config.json's rope_parameters: replaced whole
                    try:
                        current, inner = build(RopeScaling, whole, f"{key}."), []
                    except ValueError as err:  # {'factor': 6} on a YaRN model read as plain RoPE with a factor
                        raise ValueError(f"{err} ({key} as a dict replaces the whole section, rope_type included: "
                                         f"give every field, or one at a time as {key}.factor=...)") from None
                else:  # over the section's current values, as if set one by one: a field left out keeps its value
                    inner += [([field], _Parsed(value)) for field, value in whole.items()]
            elif len(path) > 1:
                raise ValueError(f"{prefix + name!r} is a field, not a section (in {key!r})")
            else:
                hint = typing.get_type_hints(type(obj))[name]
                current = coerce(_leaf(raw, hint), hint, key)
        values[name] = _assign(current, inner, f"{prefix}{name}.") if inner else current
        if isinstance(values[name], RopeScaling):
            _check_yarn_factor(getattr(obj, name), values[name], entries, prefix + name)
    return dataclasses.replace(obj, **values) if values else obj


def _check_yarn_factor(before: RopeScaling, after: RopeScaling, entries: list[tuple[list[str], Any]],
                       key: str) -> None:
    """A switch to YaRN names its factor, as config.json must (transformers requires it): left out, it was the
    field's default 1, an extension that extends nothing."""
    named = {path[1] for path, _ in entries if len(path) > 1}
    named |= {field for path, raw in entries if len(path) == 1 and isinstance(whole := _parsed(raw), dict)
              for field in whole}
    if after.rope_type == "yarn" and "factor" not in named and (before.rope_type != "yarn" or
                                                                 any(len(path) == 1 for path, _ in entries)):
        raise ValueError(f"{key}.factor is required for rope_type='yarn' (new context / original context), as in "
                         "config.json")


@dataclass(frozen=True)
class _Parsed:
    """A value a --set dict held: already parsed, not --set text (a string in it stays a string)."""

    value: Any


def _parsed(raw: str | _Parsed) -> Any:
    return raw.value if isinstance(raw, _Parsed) else parse_value(raw)


def _leaf(raw: str | _Parsed, hint: Any) -> Any:
    """The value --set text gives a field of type `hint`, text (`parse_text`) for a text field."""
    texts = {str, tuple[str, ...]}
    takes_text = hint in texts or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                                   and any(arg in texts for arg in typing.get_args(hint)))
    return parse_text(raw) if takes_text and not isinstance(raw, _Parsed) else _parsed(raw)


def parse_text(raw: str) -> Any:
    """--set text for a text field: as typed (`2024_01` is a folder's name, not the number 202401; `1e3` a column's,
    not 1000.0), unless it is null or quoted (a string, or a list of them for a list of names)."""
    value = parse_value(raw)
    names = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return value if value is None or isinstance(value, str) or names else raw


def override_keys(assignment: str) -> set[str]:
    """The dotted fields a --set KEY=VALUE assignment sets: KEY, and KEY.FIELD for each field of a dict value
    (at any depth); the CLI's check of a flag and a --set of the same field reads them."""
    key, _, raw = assignment.partition("=")
    keys, stack = {key.strip()}, [(key.strip(), parse_value(raw.strip()))]
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, dict):
            keys |= {f"{prefix}.{field}" for field in value}
            stack += [(f"{prefix}.{field}", inner) for field, inner in value.items()]
    return keys


def parse_value(raw: str) -> Any:
    """A Python literal or JSON (a dict copied from a config.json, with its true / false / null) if `raw` is one,
    else the raw string (so paths need no quotes); true/false work too."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        pass
    try:
        return json.loads(raw, parse_constant=_not_json) if raw.lstrip().startswith("{") else raw
    except ValueError:
        return raw


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")  # json.loads takes NaN and Infinity unless told otherwise


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint`, or a ValueError naming `key` and the allowed type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ValueError:
                continue
    elif origin is Literal:
        if value in args:
            return value
    elif origin is tuple and args[-1:] == (Ellipsis,):  # any length; from the CLI also "a,b,c" and "[a,b,c]"
        text = value.strip() if isinstance(value, str) else ""
        text = text[1:-1] if text[:1] + text[-1:] in ("[]", "()") else text  # brackets around unquoted names
        items = [_unquoted(v.strip()) for v in text.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            return tuple(coerce(v, args[0], key) for v in items)
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    allowed = " or ".join(repr(a) for a in args) if origin is Literal else type_name(hint)
    if hint is float and isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        allowed = "a finite number"
    raise ValueError(f"{key} must be {allowed}, got {value!r}")


def _unquoted(name: str) -> str:
    """A name of a list given as text, without the quotes around it (`['id', 1]`: a list of strings and numbers)."""
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"" else name


def type_name(hint: Any) -> str:
    if typing.get_args(hint):  # tuple[str, ...] rather than tuple
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")

"""Build typed dataclasses from parsed YAML, reporting every problem by its path.

The same machinery validates the core config and each plugin's ``Options``, and
generates the JSON Schema editors use to complete ``gateway.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


class ValidationError(Exception):
    """One or more problems, each a line ``path: what is wrong (hint)``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Return ``cls`` built from ``data``; raise ValidationError listing every problem."""
    problems: list[str] = []
    result = _convert(cls, data, path, problems)
    if problems:
        raise ValidationError(problems)
    return typing.cast(T, result)


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}"


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    where = path or "(top level)"
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, path, problems)
        for candidate in inner:
            trial: list[str] = []
            converted = _convert(candidate, value, path, trial)
            if not trial:
                return converted
        problems.append(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")
        return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            options = ", ".join(repr(a) for a in allowed)
            hint = did_you_mean(str(value), [str(a) for a in allowed])
            problems.append(f"{where}: must be one of {options}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(typing.cast(type, tp), value, path, problems)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {_describe(value)}")
            return []
        return [_convert(item, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {_describe(value)}")
            return {}
        return {str(k): _convert(item, v, _join(path, str(k)), problems) for k, v in value.items()}
    if tp in _SCALARS:
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        problems.append(f"{where}: expected {_SCALARS[tp]}, got {_describe(value)}")
        return None
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _convert_dataclass(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    where = path or "(top level)"
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping, got {_describe(value)}")
        return None
    start = len(problems)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, raw in value.items():
        field = fields.get(str(key))
        if field is None:
            hint = did_you_mean(str(key), fields) or "; known keys: " + ", ".join(fields)
            problems.append(f"{_join(path, str(key))}: unknown key{hint}")
            continue
        before = len(problems)
        converted = _convert(hints[field.name], raw, _join(path, field.name), problems)
        check = field.metadata.get("check")
        if len(problems) == before and check and (message := check(converted)):
            problems.append(f"{_join(path, field.name)}: {message}")
        kwargs[field.name] = converted
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            problems.append(f"{_join(path, name)}: required ({field.metadata.get('doc', 'no default')})")
    if len(problems) > start:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{where}: {exc}")
        return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return "list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    return _SCALARS.get(tp, getattr(tp, "__name__", str(tp)))


def json_schema(tp: Any) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) for a config type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return {}
    if origin in (Union, types.UnionType):
        return {"anyOf": [json_schema(a) for a in typing.get_args(tp)]}
    if tp is type(None):
        return {"type": "null"}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list:
        return {"type": "array", "items": json_schema(typing.get_args(tp)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": json_schema(typing.get_args(tp)[1])}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props: dict[str, Any] = {}
        required: list[str] = []
        for field in dataclasses.fields(tp):
            if not field.init:
                continue
            schema = json_schema(hints[field.name])
            if doc := field.metadata.get("doc"):
                schema["description"] = doc
            if field.default is not dataclasses.MISSING and field.default is not None:
                schema["default"] = field.default
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                required.append(field.name)
            props[field.name] = schema
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            out["required"] = required
        name = getattr(tp, "__name__", "")
        if tp.__doc__ and not tp.__doc__.startswith(name + "("):
            out["description"] = tp.__doc__.strip().splitlines()[0]
        return out
    raise TypeError(f"unsupported config type {tp!r}")


# Checks for ``field(metadata={"check": ...})``: each returns an error message, or None.


def positive(value: float | None) -> str | None:
    """A number above zero (None passes: the field is optional)."""
    if value is None or 0 < value < math.inf:
        return None
    return f"must be greater than 0, got {value}" if value <= 0 else f"must be a finite number, got {value}"


def share(value: float) -> str | None:
    """A fraction from 0 to 1."""
    return None if 0 <= value <= 1 else f"must be between 0 and 1, got {value}"

"""JSON from clients: every way it can be wrong is a 400 in the OpenAI envelope, never a 500.

Python's parser raises RecursionError on deep nesting (``[`` * 100000) and reads
``1e999`` as infinity and ``NaN`` as a float; neither may reach a handler, where
they would crash it or be echoed back as invalid JSON (``Infinity``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.errors import GatewayError


def parse_object(raw: bytes | str, what: str = "the request body") -> dict[str, Any]:
    """``raw`` as a JSON object; GatewayError(400) naming the problem and the fix otherwise."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise GatewayError(400, f"{what} nests JSON too deeply to be read; flatten it") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise GatewayError(400, f"{what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GatewayError(400, f"{what} must be a JSON object")
    path = lone_surrogate_path(data)
    if path is not None:
        shown = path.encode("utf-8", "backslashreplace").decode()
        raise GatewayError(
            400,
            f"{shown}: holds an unpaired \\u escape (a lone surrogate), which is not text; send valid Unicode",
            param=shown,
        )
    path = non_finite_path(data)
    if path is not None:
        raise GatewayError(
            400,
            f"{path}: must be a finite number; JSON has no NaN or Infinity, and a number as large as 1e999 "
            "overflows to infinity",
            param=path,
        )
    return data


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object (see ``parse_object``)."""
    return parse_object(await request.read())


def non_finite_path(data: Any) -> str | None:
    """Where in ``data`` the first NaN or infinite number is (``profile.tier_cost``, ``models[2]``), or None."""
    return _first(data, lambda value: isinstance(value, float) and not math.isfinite(value))


def lone_surrogate_path(data: Any) -> str | None:
    """Where in ``data`` the first text with a lone surrogate is (JSON's ``"\\ud800"``: no UTF-8 form, so no
    database or log can hold it), a key's or a value's; or None."""
    return _first(data, lambda value: isinstance(value, str) and not _encodable(value), keys=True)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first(data: Any, bad: Callable[[Any], bool], keys: bool = False) -> str | None:
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:  # a loop, not recursion: the parser accepts nesting deeper than a recursive walk can go
        path, value = pending.pop()
        if bad(value):
            return path or "(top level)"
        if isinstance(value, dict):
            for key in value:
                if keys and bad(key):
                    return f"{path}.{key!a}" if path else ascii(key)
            pending.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            pending.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None

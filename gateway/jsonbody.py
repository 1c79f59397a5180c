"""JSON from clients: every way it can be wrong is a 400 in the OpenAI envelope, never a 500.

Python's parser raises RecursionError on deep nesting (``[`` * 100000) and reads
``1e999`` as infinity and ``NaN`` as a float; neither may reach a handler, where
they would crash it or be echoed back as invalid JSON (``Infinity``).
"""

from __future__ import annotations

import json
import math
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
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:  # a loop, not recursion: the parser accepts nesting deeper than a recursive walk can go
        path, value = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path or "(top level)"
        if isinstance(value, dict):
            pending.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            pending.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None

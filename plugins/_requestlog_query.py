"""The request log's table, and how ``GET /admin/requests`` turns filters into SQL and rows into JSON."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.upstream import MAX_RETRY_AFTER
from plugins._usage_report import parse_since

# No index on ``at``: one costs a third more per row written; ids follow time, newest first is by id.
SCHEMA = [
    """
    CREATE TABLE requestlog (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        request_id TEXT NOT NULL,
        key_name TEXT,
        client TEXT,
        endpoint TEXT NOT NULL,
        stream INTEGER NOT NULL,
        model TEXT NOT NULL,
        served_model TEXT,
        backend TEXT,
        strategy TEXT,
        attempts TEXT NOT NULL,
        status INTEGER NOT NULL,
        latency_ms REAL NOT NULL,
        ttft_ms REAL,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        cache TEXT,
        error TEXT,
        prompt TEXT,
        completion TEXT
    );
    CREATE INDEX requestlog_request_id ON requestlog (request_id)
    """,
    # 2: the columns no filter reads go into one JSON array, ``detail`` (see DETAIL): a row binds 9 values
    # instead of 18, and binding (with the GIL held, on aiosqlite's thread) was half a row's cost. The old
    # attempts text is appended as it is, never parsed: Python wrote a Retry-After of inf as ``Infinity``,
    # which SQLite's JSON functions refuse (json() would stop the migration, and the gateway's start).
    # ``cache`` (text or NULL) ends json_array, so rtrim takes only its closing bracket.
    """
    CREATE TABLE requestlog_packed (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        request_id TEXT NOT NULL,
        key_name TEXT,
        model TEXT NOT NULL,
        served_model TEXT,
        backend TEXT,
        status INTEGER NOT NULL,
        error TEXT,
        detail TEXT NOT NULL,
        prompt TEXT,
        completion TEXT
    );
    INSERT INTO requestlog_packed
        SELECT id, at, request_id, key_name, model, served_model, backend, status, error,
               rtrim(json_array(client, endpoint, stream, strategy, latency_ms, ttft_ms, prompt_tokens,
                                completion_tokens, cache), ']') || ',' || attempts || ']',
               prompt, completion
        FROM requestlog;
    DROP TABLE requestlog;
    ALTER TABLE requestlog_packed RENAME TO requestlog;
    CREATE INDEX requestlog_request_id ON requestlog (request_id)
    """,
]
FILTERED = ("at", "request_id", "key_name", "model", "served_model", "backend", "status", "error")
"""The columns filters read, each bound on its own."""
DETAIL = (
    "client", "endpoint", "stream", "strategy", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens",
    "cache", "attempts",
)  # fmt: skip
"""What the ``detail`` column's JSON array holds, in order. ``latency_ms`` and ``ttft_ms`` are kept as whole
microseconds (ints; rows from before the array hold milliseconds, as floats) and always shown in ms.
``attempts`` is a list of attempts (``ATTEMPT``), or, for a call its one attempt answered with nothing more
to tell (the row's backend, model and status, outcome ok), only that attempt's three times."""
COLUMN_NAMES = (*FILTERED, "detail", "prompt", "completion")
COLUMNS = ", ".join(COLUMN_NAMES)
SELECT = f"SELECT id, {COLUMNS} FROM requestlog"
PRUNE_OLD = "DELETE FROM requestlog WHERE at < ?"
PRUNE_ROWS = "DELETE FROM requestlog WHERE id <= (SELECT id FROM requestlog ORDER BY id DESC LIMIT 1 OFFSET ?)"

ATTEMPT = ("backend", "model", "status", "outcome", "reason", "start_ms", "ttfb_ms", "ms", "mid_stream", "retry_after")
"""The fields of one attempt, kept as a JSON array (a third of the cost of an object) and shown as an object.
Its three times are kept as whole microseconds (older rows hold milliseconds, as floats) and always shown in
milliseconds."""
TIMES = slice(5, 8)
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
_CLASS = re.compile(r"([1-5])xx")
STATUS_HELP = "a class (2xx, 4xx, 5xx), a code (503), 'error' (any failure, also a stream that broke) or 'ok'"


def _status(value: str) -> tuple[str, list[Any]]:
    value = value.strip().lower()
    match = _CLASS.fullmatch(value)
    if match:
        low = int(match.group(1)) * 100
        return "status >= ? AND status < ?", [low, low + 100]
    if value.isdigit() and len(value) == 3:
        return "status = ?", [int(value)]
    if value in ("error", "failed"):
        return "(status >= 400 OR error IS NOT NULL)", []
    if value == "ok":
        return "(status < 400 AND error IS NULL)", []
    raise ValueError(f"'status' must be {STATUS_HELP}; got {value!r}")


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise ValueError(f"'limit' must be a whole number from 1 to {MAX_LIMIT}; got {value!r}")
    return int(value)


def _cursor(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise ValueError(f"'cursor' must be the next_cursor of a previous page; got {value!r}")
    return int(value)


FILTERS = ("status", "model", "backend", "key", "since", "request_id", "limit", "cursor")


def query(params: Mapping[str, str]) -> tuple[str, list[Any], int]:
    """SQL, its parameters and the page size for the filters of ``GET /admin/requests``; newest first.

    Paging: each page ends with ``next_cursor``; pass it as ``cursor`` for the rows before it.
    """
    unknown = sorted(set(params) - set(FILTERS))
    if unknown:
        raise ValueError(f"unknown filter {unknown[0]!r}; use any of: {', '.join(FILTERS)}")
    where: list[str] = []
    args: list[Any] = []
    if params.get("status"):
        clause, values = _status(params["status"])
        where.append(clause)
        args += values
    if params.get("model"):
        where.append("(model = ? OR served_model = ?)")
        args += [params["model"], params["model"]]
    for name, column in (("backend", "backend"), ("key", "key_name"), ("request_id", "request_id")):
        if params.get(name):
            where.append(f"{column} = ?")
            args.append(params[name])
    since = parse_since(params.get("since"))
    if since is not None:
        where.append("at >= ?")
        args.append(since)
    cursor = _cursor(params.get("cursor"))
    if cursor is not None:
        where.append("id < ?")
        args.append(cursor)
    limit = _limit(params.get("limit"))
    sql = f"{SELECT}{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY id DESC LIMIT ?"
    return sql, [*args, limit + 1], limit  # one more than asked: is there a next page?


def to_dict(row: Sequence[Any]) -> dict[str, Any]:
    """One row as the API shows it; ``prompt`` and ``completion`` only when they were stored."""
    id_, at, request_id, key, model, served, backend, status, error, detail, prompt, completion = row
    client, endpoint, stream, strategy, latency, ttft, prompt_tokens, completion_tokens, cache, attempts = json.loads(
        detail
    )
    entry: dict[str, Any] = {
        "id": id_,
        "at": at,
        "request_id": request_id,
        "key": key,
        "client": client,
        "endpoint": endpoint,
        "stream": bool(stream),
        "model": model,
        "served_model": served,
        "backend": backend,
        "strategy": strategy,
        "attempts": _attempts(attempts, backend, served, status),
        "status": status,
        "ok": status < 400 and error is None,
        "latency_ms": _ms(latency),
        "ttft_ms": _ms(ttft),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cache": cache,
        "error": error,
    }
    if prompt is not None:
        entry["prompt"] = json.loads(prompt)
    if completion is not None:
        entry["completion"] = completion
    return entry


def _ms(stored: Any) -> Any:
    """Milliseconds from a stored time: whole microseconds (an int), or an older row's milliseconds (a float)."""
    return stored / 1000 if isinstance(stored, int) and not isinstance(stored, bool) else stored


def _attempts(stored: list[Any], backend: str | None, served: str | None, status: int) -> list[dict[str, Any]]:
    """The attempts as the API shows them. A call answered by its one attempt, as most are, keeps only that
    attempt's three times (start, first byte, end): its backend, model and status are the row's, its outcome ok."""
    if stored and not isinstance(stored[0], list):
        stored = [[backend, served, status, "ok", None, *stored, False, None]]
    return [_attempt(attempt) for attempt in stored]


def _attempt(stored: list[Any]) -> dict[str, Any]:
    """One attempt as the API shows it: times in milliseconds (stored as whole microseconds, an int; a float
    is an older row's milliseconds). A Retry-After an older gateway kept as infinite (``Infinity``, which no
    strict JSON parser reads: a browser's ``JSON.parse`` refuses the whole page) is shown as the longest one
    read today."""
    stored[TIMES] = [_ms(value) for value in stored[TIMES]]
    shown = dict(zip(ATTEMPT, stored, strict=True))
    retry_after = shown["retry_after"]
    if isinstance(retry_after, float) and not math.isfinite(retry_after):
        shown["retry_after"] = MAX_RETRY_AFTER if retry_after > 0 else None
    return shown

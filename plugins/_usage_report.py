"""Reading the usage table: the query behind ``GET /admin/usage`` and ``multiverse usage``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

SCHEMA = [
    """
    CREATE TABLE usage_requests (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        request_id TEXT NOT NULL,
        key_id TEXT,
        key_name TEXT,
        model TEXT NOT NULL,
        backend TEXT,
        endpoint TEXT NOT NULL,
        stream INTEGER NOT NULL,
        status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        estimated INTEGER NOT NULL,
        latency_ms REAL NOT NULL,
        backend_seconds REAL NOT NULL,
        cache_hit INTEGER NOT NULL,
        cost REAL NOT NULL
    );
    CREATE INDEX usage_requests_at ON usage_requests (at);
    CREATE INDEX usage_requests_key ON usage_requests (key_id)
    """,
    # No report uses usage_requests_key: a key's report matches key_id OR key_name (a scan, or the `at` index with
    # `since`); SPENT, at start-up only, reads every keyed row either way (faster without it: 88 against 124 ms
    # for 200,000 rows). Every request paid for an entry in it.
    "DROP INDEX IF EXISTS usage_requests_key",
]
COLUMNS = (
    "at", "request_id", "key_id", "key_name", "model", "backend", "endpoint", "stream", "status",
    "prompt_tokens", "completion_tokens", "estimated", "latency_ms", "backend_seconds", "cache_hit", "cost",
)  # fmt: skip
SPENT = "SELECT key_id, SUM(cost) FROM usage_requests WHERE key_id IS NOT NULL GROUP BY key_id"
GROUPS = {
    "key": "COALESCE(key_id, '')",
    "model": "model",
    "backend": "COALESCE(backend, '')",
    "day": "date(at, 'unixepoch')",
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str | None) -> float | None:
    """A start time: a duration back from now (``90s``, ``30m``, ``1h``, ``7d``), an ISO date or a Unix time."""
    if not text:
        return None
    match = _DURATION.fullmatch(text.strip())
    if match:
        return time.time() - float(match.group(1)) * _SECONDS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"'since' must be a duration like 30m, 1h or 7d, an ISO date like 2025-09-01, or a Unix time; got {text!r}"
        ) from None


def query(key: str | None, model: str | None, since: float | None, group_by: str) -> tuple[str, list[Any]]:
    """SQL and parameters for totals grouped by ``group_by`` (key, model, backend or day)."""
    if group_by not in GROUPS:
        raise ValueError(f"'group_by' must be one of {', '.join(GROUPS)}; got {group_by!r}")
    where, params = ["1 = 1"], []
    if since is not None:
        where.append("at >= ?")
        params.append(since)
    if key:
        where.append("(key_id = ? OR key_name = ?)")
        params += [key, key]
    if model:
        where.append("model = ?")
        params.append(model)
    sql = (
        f"SELECT {GROUPS[group_by]} AS grp, MAX(key_name), COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
        "SUM(estimated), SUM(cache_hit), SUM(status >= 400), SUM(cost), SUM(backend_seconds), AVG(latency_ms) "
        f"FROM usage_requests WHERE {' AND '.join(where)} GROUP BY grp ORDER BY SUM(cost) DESC, COUNT(*) DESC"
    )
    return sql, params


def to_dicts(group_by: str, rows: list[Any]) -> list[dict[str, Any]]:
    out = []
    for grp, name, n, prompt, completion, estimated, hits, errors, cost, seconds, latency in rows:
        head = {"key_id": grp or None, "key": name or "anonymous"} if group_by == "key" else {group_by: grp}
        out.append(
            {
                **head,
                "requests": n,
                "prompt_tokens": prompt or 0,
                "completion_tokens": completion or 0,
                "estimated_requests": estimated or 0,
                "cache_hits": hits or 0,
                "errors": errors or 0,
                "cost": round(cost or 0.0, 6),
                "backend_seconds": round(seconds or 0.0, 3),
                "avg_latency_ms": round(latency or 0.0, 2),
            }
        )
    return out


def table(group_by: str, data: list[dict[str, Any]]) -> str:
    columns = [group_by, "requests", "prompt_tokens", "completion_tokens", "cache_hits", "errors", "cost"]
    lines = [[str(d.get(c, "")) for c in columns] for d in data]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    rows = [columns, *lines] if lines else [columns]
    text = "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    estimated = sum(d["estimated_requests"] for d in data)
    return text + (f"\n({estimated} request(s) counted with a tokenizer estimate)" if estimated else "")


def add_command(subparsers: Any) -> None:
    usage = subparsers.add_parser(
        "usage",
        help="requests, tokens and spend, from the gateway's database",
        epilog="example:\n  multiverse usage --since 7d --group-by model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    usage.add_argument("--since", help="a duration back from now (30m, 1h, 7d), an ISO date or a Unix time")
    usage.add_argument("--group-by", choices=list(GROUPS), default="key")
    usage.add_argument("--key", help="only this key (its id or name)")
    usage.add_argument("--model", help="only this model")
    usage.add_argument("--json", action="store_true", help="print JSON")
    usage.add_argument("--config", default=os.environ.get("MULTIVERSE_CONFIG"), help="gateway.yaml to read")
    usage.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load, parse

    try:
        path = args.config or ("gateway.yaml" if Path("gateway.yaml").exists() else None)
        config = load(path) if path else parse({})
        sql, params = query(args.key, args.model, parse_since(args.since), args.group_by)
    except (ConfigError, ValueError) as exc:
        print(f"multiverse usage: {exc}", file=sys.stderr)
        return 2
    database = config.database_path
    if not database.exists():
        print(f"multiverse usage: no database at {database}; has the gateway run yet?", file=sys.stderr)
        return 1
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        rows = db.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        print(f"multiverse usage: {database} has no usage table; enable the usage plugin", file=sys.stderr)
        return 1
    finally:
        db.close()
    data = to_dicts(args.group_by, rows)
    print(json.dumps({"group_by": args.group_by, "data": data}, indent=2) if args.json else table(args.group_by, data))
    return 0

"""The audit trail: who registered, changed, approved or removed what, and when; who issued or revoked keys.

Kept in the registry's database (table ``audit``), shown by ``GET /admin/audit``. An entry names
fields, never their secret values: a backend's ``api_key`` or a key's secret is never recorded.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiosqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL NOT NULL,
    actor      TEXT NOT NULL,
    actor_name TEXT,
    action     TEXT NOT NULL,
    target     TEXT,
    detail     TEXT
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
"""

SECRET_FIELDS = frozenset({"api_key", "key", "secret", "key_hash"})
INSERT = "INSERT INTO audit (at, actor, actor_name, action, target, detail) VALUES (?, ?, ?, ?, ?, ?)"


def row(actor: str, actor_name: str | None, action: str, target: str | None, detail: dict[str, Any]) -> tuple[Any, ...]:
    """The values of one entry; secret fields are named (``"api_key": "set"``), never their values."""
    shown = {k: ("set" if v is not None else None) if k in SECRET_FIELDS else v for k, v in detail.items()}
    return (time.time(), actor, actor_name, action, target, json.dumps(shown, default=str, sort_keys=True))


async def record(
    db: aiosqlite.Connection,
    actor: str,
    actor_name: str | None,
    action: str,
    target: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append an entry (``actor``: the key id, ``"admin"`` for the config's admin key)."""
    await db.execute(INSERT, row(actor, actor_name, action, target, detail or {}))
    await db.commit()


async def entries(db: aiosqlite.Connection, since: float = 0.0, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` entries at or after ``since`` (Unix seconds), oldest first."""
    query = "SELECT * FROM audit WHERE at >= ? ORDER BY id DESC LIMIT ?"
    async with db.execute(query, (since, limit)) as cursor:
        rows = await cursor.fetchall()
    return [
        {
            "id": r["id"],
            "at": r["at"],
            "actor": r["actor"],
            "actor_name": r["actor_name"],
            "action": r["action"],
            "target": r["target"],
            "detail": json.loads(r["detail"]) if r["detail"] else {},
        }
        for r in reversed(list(rows))
    ]

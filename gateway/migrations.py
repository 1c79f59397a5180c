"""Changing the database's schema safely when several gateway processes open it at once.

Workers (``server.workers``) and gateways sharing one database start together: each would
read the schema, see a column or a plugin's table missing, and add it, and all but one
would fail. ``schema_lock`` lets one process at a time do that (a lock file beside the
database), and ``migrate`` applies a plugin's steps under it, re-reading its version first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiosqlite

_IN_PROCESS: dict[Path, asyncio.Lock] = {}


@contextlib.asynccontextmanager
async def schema_lock(db_path: Path) -> AsyncIterator[None]:
    """One process (and one task) at a time changes the schema of the database at ``db_path``."""
    lock = _IN_PROCESS.setdefault(db_path, asyncio.Lock())
    async with lock:
        fd = os.open(f"{db_path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


async def migrate(db: aiosqlite.Connection, db_path: Path, owner: str, steps: Sequence[str]) -> int:
    """Apply, once each and in order, the steps of ``owner``'s schema not yet applied; return its version."""
    async with schema_lock(db_path):
        await db.execute(
            "CREATE TABLE IF NOT EXISTS plugin_schemas (plugin TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        await db.commit()
        async with db.execute("SELECT version FROM plugin_schemas WHERE plugin = ?", (owner,)) as cursor:
            row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        quoted = owner.replace("'", "''")
        for version, script in enumerate(steps[current:], current + 1):
            await db.executescript(
                f"BEGIN;\n{script.rstrip().rstrip(';')};\n"
                f"INSERT OR REPLACE INTO plugin_schemas (plugin, version) VALUES ('{quoted}', {version});\nCOMMIT;"
            )
        return max(current, len(steps))

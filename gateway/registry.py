"""Backends: static ones from the config and registered ones kept in SQLite.

Reads on the request path come from memory (``for_model``); every write goes to
SQLite first (WAL mode) and to memory once committed, so an acknowledged
registration survives a crash of the process.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from gateway import audit, migrations
from gateway.backend import (
    HEALTHY,
    MISMATCHED,
    PENDING,
    ROUTABLE,
    STATUSES,
    TIMEOUTS,
    UNHEALTHY,
    UNKNOWN,
    Backend,
)
from gateway.config import BackendConfig
from gateway.logs import get_logger
from gateway.netguard import normalise_url
from gateway.private_files import create_private, sqlite_files, tighten

__all__ = [
    "HEALTHY", "MISMATCHED", "PENDING", "ROUTABLE", "STATUSES", "TIMEOUTS", "UNHEALTHY", "UNKNOWN",
    "Backend", "Registry",
]  # fmt: skip

RELOAD_INTERVAL = 0.5
"""Seconds between checks whether another process (a second gateway, an import) changed the database."""

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS backends (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    url          TEXT NOT NULL UNIQUE,
    models       TEXT NOT NULL,
    owner_name   TEXT,
    owner_email  TEXT,
    description  TEXT,
    status       TEXT NOT NULL DEFAULT 'unknown',
    last_error   TEXT,
    status_since REAL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
"""
# Columns added after version 1, created on open where missing.
_ADDED_COLUMNS = {
    "api_key": "TEXT",
    "connect_timeout": "REAL",
    "ttft_timeout": "REAL",
    "stall_timeout": "REAL",
    "weight": "REAL NOT NULL DEFAULT 1.0",
    "profile": "TEXT",
    "max_concurrency": "INTEGER",
    "owner_key": "TEXT",  # who registered it: not editable through the API
    "endpoints": "TEXT",
    "aliases": "TEXT",
}
EDITABLE = (
    "name",
    "url",
    "models",
    "owner_name",
    "owner_email",
    "description",
    "api_key",
    *TIMEOUTS,
    "weight",
    "profile",
    "max_concurrency",
    "endpoints",
    "aliases",
)
_JSON_COLUMNS = frozenset({"models", "profile", "endpoints", "aliases"})


class Registry:
    """All backends, indexed by model for the request path."""

    def __init__(self, db_path: Path, static: Iterable[BackendConfig] = (), log: Any = None) -> None:
        self.db_path = db_path
        self.log = log if log is not None else get_logger("gateway.registry")
        self.lock = asyncio.Lock()
        """Held by a writer from its checks (URL taken? room left?) to its write, across awaits."""
        self._db: aiosqlite.Connection | None = None
        self.backends: dict[str, Backend] = {}
        for conf in static:
            url = normalise_url(conf.url)
            if url.note:
                self.log.info("backend_url_normalised", backend=conf.name, note=url.note)
            backend = Backend(f"config:{conf.name}", conf.name, url.url, tuple(conf.models), "config")
            backend.api_key, backend.weight, backend.max_concurrency = conf.api_key, conf.weight, conf.max_concurrency
            backend.endpoints, backend.aliases, backend.api_path = conf.endpoints, conf.aliases or None, conf.api_path
            for name in TIMEOUTS:
                setattr(backend, name, getattr(conf, name))
            self.backends[backend.id] = backend
        self._by_model: dict[str, tuple[Backend, ...]] = {}
        self.any_limited = False
        """Whether any backend declares a ``max_concurrency`` (kept with the index): with none, slot-keeping
        plugins (ratelimit's fair queue) have nothing to do for a request."""
        self.on_change: Callable[[Backend, str, str | None], None] | None = None
        """Told of every registration, update, removal and status change (the gateway's event hook)."""
        self._watcher: asyncio.Task[None] | None = None
        self._data_version = 0

    def _changed(self, backend: Backend, event: str, reason: str | None = None) -> None:
        if self.on_change is not None:
            self.on_change(backend, event, reason)

    async def migrate(self, owner: str, steps: Sequence[str]) -> int:
        """Bring a plugin's own tables up to date: apply, once each and in order, the SQL scripts not yet applied.

        ``owner`` is the plugin's name; its schema version (how many steps were applied) is kept in the
        ``plugin_schemas`` table. Each step and its version are committed together. Returns the version.
        """
        return await migrations.migrate(self.db, self.db_path, owner, steps)

    async def open(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_files_private()
        self._db = await aiosqlite.connect(self.db_path)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA busy_timeout=5000")
        async with migrations.schema_lock(self.db_path):  # workers starting together: one creates, the rest see
            await self._db.execute("PRAGMA journal_mode=WAL")
            self._keep_files_private()  # the -wal and -shm files exist from here on
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._db.executescript(_SCHEMA + audit.SCHEMA)
            async with self._db.execute("PRAGMA table_info(backends)") as cursor:
                present = {row["name"] async for row in cursor}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in present:
                    await self._db.execute(f"ALTER TABLE backends ADD COLUMN {column} {kind}")
            await self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            await self._db.commit()
        async with self._db.execute("SELECT * FROM backends ORDER BY created_at") as cursor:
            async for row in cursor:
                backend = Backend(
                    row["id"], row["name"], _canonical(row["url"]), tuple(json.loads(row["models"])), "api",
                    last_error=row["last_error"], created_at=row["created_at"], owner_key=row["owner_key"],
                    status=PENDING if row["status"] == PENDING else UNKNOWN,
                    **{name: _column(name, row[name]) for name in EDITABLE[3:]},
                )  # fmt: skip
                self.backends[backend.id] = backend
        self._reindex()
        self._data_version = await self._read_data_version()
        self._watcher = asyncio.create_task(self._watch(), name="registry_watch")

    def _keep_files_private(self) -> None:
        """The database holds backends' keys: create it 0600, and tighten it and its companions if wider."""
        create_private(self.db_path)
        tighten(sqlite_files(self.db_path), self.log)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("registry is not open")
        return self._db

    async def ping(self) -> bool:
        """Whether the database answers."""
        try:
            async with self.db.execute("SELECT 1") as cursor:
                return (await cursor.fetchone()) is not None
        except Exception:
            return False

    # -- the request path: memory only ---------------------------------------

    def for_model(self, model: str) -> tuple[Backend, ...]:
        """Routable backends serving ``model``, in registration order."""
        return self._by_model.get(model, ())

    def models(self) -> list[str]:
        """Models served by at least one routable backend."""
        return sorted(self._by_model)

    def all_models(self) -> list[str]:
        """Models of every backend, routable or not."""
        return sorted({m for b in self.backends.values() for m in b.models})

    def by_url(self, url: str) -> Backend | None:
        """The backend at ``url``, however it is spelt (``HTTP://Host:80/`` finds ``http://host``)."""
        url = _canonical(url)
        return next((b for b in self.backends.values() if b.url == url), None)

    def _reindex(self) -> None:
        index: dict[str, list[Backend]] = {}
        for backend in self.backends.values():
            if backend.routable:
                for model in backend.models:
                    index.setdefault(model, []).append(backend)
        self._by_model = {model: tuple(backends) for model, backends in index.items()}
        self.any_limited = any(b.max_concurrency is not None for b in self.backends.values())

    # -- other processes' writes ------------------------------------------------

    async def _read_data_version(self) -> int:
        found = list(await self.db.execute_fetchall("PRAGMA data_version"))  # one call into aiosqlite's thread
        return int(found[0][0]) if found else 0

    async def _watch(self) -> None:
        """Reload the registrations whenever another connection committed a change (SQLite's data_version)."""
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            try:
                version = await self._read_data_version()
                if version != self._data_version:
                    self._data_version = version
                    await self.reload()
            except Exception:
                get_logger("gateway").exception("registry_reload_failed", database=str(self.db_path))

    async def reload(self) -> None:
        """Take the registrations from the database, keeping the runtime state of backends that are unchanged.

        A backend whose URL is the same keeps its counters, notes and health; one that is new or
        moved takes the status last written to the database; one that is gone is dropped.
        """
        async with self.db.execute("SELECT * FROM backends ORDER BY created_at") as cursor:
            rows = await cursor.fetchall()
        # From here to the end nothing awaits, so no write of ours can interleave.
        fresh: dict[str, Backend] = {k: b for k, b in self.backends.items() if b.source == "config"}
        for row in rows:
            known = self.backends.get(row["id"])
            fields = {name: _column(name, row[name]) for name in EDITABLE[3:]}
            url = _canonical(row["url"])
            if known is not None and known.url == url:
                known.name, known.models = row["name"], tuple(json.loads(row["models"]))
                for name, value in fields.items():
                    setattr(known, name, value)
                if PENDING in (known.status, row["status"]):  # approved (or sent back) by another process
                    known.status = row["status"]
                fresh[known.id] = known
                continue
            fresh[row["id"]] = Backend(
                row["id"], row["name"], url, tuple(json.loads(row["models"])), "api",
                status=row["status"] if known is None or row["status"] == PENDING else UNKNOWN,
                last_error=row["last_error"],
                status_since=row["status_since"] or time.time(), created_at=row["created_at"],
                owner_key=row["owner_key"], **fields,
            )  # fmt: skip
        self.backends.clear()
        self.backends.update(fresh)
        self._reindex()

    # -- writes: SQLite first, then memory -------------------------------------

    async def add(
        self, url: str, models: Iterable[str], name: str | None = None, *, owner_key: str | None = None,
        status: str = UNKNOWN, **fields: Any,
    ) -> Backend:  # fmt: skip
        """Register a backend for ``owner_key``; ``fields`` are other EDITABLE ones (owner, api_key, timeouts).

        ``status`` is UNKNOWN (routable until probed) or PENDING (waits for ``approve``).

        ValueError if ``url`` cannot be a backend's URL (netguard.normalise_url says why).
        """
        now = time.time()
        url = normalise_url(url).url
        backend_id = uuid.uuid4().hex
        backend = Backend(backend_id, name or _default_name(backend_id), url, tuple(models), "api", created_at=now)
        backend.owner_key, backend.status = owner_key, status
        for key, value in fields.items():
            if key not in EDITABLE:
                raise ValueError(f"not a backend field: {key}")
            setattr(backend, key, value)
        columns = (
            "id",
            "name",
            "url",
            "models",
            *EDITABLE[3:],
            "owner_key",
            "status",
            "status_since",
            "created_at",
            "updated_at",
        )
        values = (backend.id, backend.name, backend.url, json.dumps(backend.models),
                  *(_value(c, getattr(backend, c)) for c in EDITABLE[3:]),
                  owner_key, status, now, now, now)  # fmt: skip
        await self.db.execute(
            f"INSERT INTO backends ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values
        )
        await self.db.commit()
        self.backends[backend.id] = backend
        self._reindex()
        self._changed(backend, "registered")
        return backend

    async def update(self, backend: Backend, changes: dict[str, Any], pending: bool = False) -> Backend:
        """Apply ``changes`` (keys from EDITABLE) to a registered backend.

        ``pending``: it goes back to wait for approval, in the same write (no request reaches its new
        address or models in between).
        """
        if "url" in changes:
            changes["url"] = normalise_url(changes["url"]).url
        if "models" in changes:
            changes["models"] = tuple(changes["models"])
        columns = {k: _value(k, v) for k, v in changes.items() if k in EDITABLE}
        stored = {**columns, "status": PENDING, "status_since": time.time()} if pending else columns
        if stored:
            assignments = ", ".join(f"{k} = ?" for k in stored)
            await self.db.execute(
                f"UPDATE backends SET {assignments}, updated_at = ? WHERE id = ?",
                (*stored.values(), time.time(), backend.id),
            )
            await self.db.commit()
        for key in columns:
            setattr(backend, key, changes[key])
        if pending:
            backend.status, backend.status_since = PENDING, time.time()
        elif ("url" in columns or "api_key" in columns) and backend.status != PENDING:  # a new chance
            backend.status, backend.last_error, backend.status_since = UNKNOWN, None, time.time()
        self._reindex()
        self._changed(backend, "updated", ", ".join(sorted(columns)))
        if pending:
            self._changed(backend, "pending")
        return backend

    async def remove(self, backend: Backend) -> None:
        await self.db.execute("DELETE FROM backends WHERE id = ?", (backend.id,))
        await self.db.commit()
        self.backends.pop(backend.id, None)
        self._reindex()
        self._changed(backend, "removed")

    async def approve(self, backend: Backend, pending: bool = False) -> None:
        """Let a pending backend take traffic (``pending=True``: send it back to wait for approval)."""
        await self.set_status(backend, PENDING if pending else UNKNOWN, event="pending" if pending else "approved")

    async def set_status(self, backend: Backend, status: str, error: str | None = None, event: str = "") -> None:
        """Record a health transition (for a config backend, in memory only); a pending backend stays pending."""
        if backend.status == PENDING and not event:
            return  # a probe that was under way when it was registered
        now = time.time()
        if backend.source == "api" and backend.id in self.backends:
            await self.db.execute(
                "UPDATE backends SET status = ?, last_error = ?, status_since = ? WHERE id = ?",
                (status, error, now, backend.id),
            )
            await self.db.commit()
        backend.status, backend.last_error, backend.status_since = status, error, now
        self._reindex()
        self._changed(backend, event or status, error)


def _default_name(backend_id: str) -> str:
    """A short stable name that does not reveal the backend's address (clients see names)."""
    return f"backend-{backend_id[:8]}"


def _canonical(url: str) -> str:
    """``url`` in canonical form; one that cannot be normalised (stored by an older version) as it is."""
    try:
        return normalise_url(url).url
    except ValueError:
        return url.rstrip("/")


def _value(column: str, value: Any) -> Any:
    """A field as stored: lists and mappings as JSON text."""
    return json.dumps(value) if column in _JSON_COLUMNS and value is not None else value


def _column(column: str, stored: Any) -> Any:
    return json.loads(stored) if column in _JSON_COLUMNS and stored is not None else stored

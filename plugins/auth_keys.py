"""The auth plugin's keys: their table, secrets and hashes, and the writes the CLI and the admin API share.

A secret is ``mvk-`` and 32 random bytes (URL-safe base64); only its SHA-256 is stored. Writes
open their own ``sqlite3`` connection (the API runs them in a thread), so the CLI works on the
database whether or not a gateway is running, and a running gateway sees them through
SQLite's ``data_version`` within its poll interval.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway import audit
from gateway.identity import Identity
from gateway.private_files import create_private, sqlite_files, tighten
from gateway.validate import build, positive

PREFIX = "mvk-"
PLUGIN = "auth"
MIGRATIONS = [
    """CREATE TABLE auth_keys (
        id              TEXT PRIMARY KEY,
        key_hash        TEXT NOT NULL UNIQUE,
        name            TEXT NOT NULL,
        role            TEXT NOT NULL,
        models          TEXT,
        rpm             INTEGER,
        tpm             INTEGER,
        max_concurrency INTEGER,
        budget          REAL,
        priority        TEXT NOT NULL DEFAULT 'normal',
        expires_at      REAL,
        created_at      REAL NOT NULL,
        revoked_at      REAL,
        updated_at      REAL NOT NULL
    )""",
]
PUBLIC = ("id", "name", "role", "models", "rpm", "tpm", "max_concurrency", "budget", "priority")
PUBLIC_TIMES = ("expires_at", "created_at", "revoked_at")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([mhdw])")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(value: str | None) -> str | None:
    return None if value is None or _DURATION.fullmatch(value.strip()) else "must look like 45m, 12h, 30d or 2w"


def _models(value: list[str] | None) -> str | None:
    return None if value is None or (value and all(value)) else "must list at least one model name (or be left out)"


def _name(value: str) -> str | None:
    if value.strip() and value.isprintable() and len(value) <= 200:
        return None
    return "must be printable text of 1 to 200 characters (a student's name, a team), without control characters"


@dataclass(frozen=True)
class KeySpec:
    """What a new key may do: the body of ``POST /admin/keys`` and the options of ``multiverse keys create``."""

    name: str = field(metadata={"doc": "who holds it: a student's name, a team, a demo", "check": _name})
    role: Literal["admin", "host", "user", "readonly"] = "user"
    models: list[str] | None = field(default=None, metadata={"check": _models})
    rpm: int | None = field(default=None, metadata={"check": positive})
    tpm: int | None = field(default=None, metadata={"check": positive})
    max_concurrency: int | None = field(default=None, metadata={"check": positive})
    budget: float | None = field(default=None, metadata={"check": positive})
    priority: Literal["low", "normal", "high"] = "normal"
    expires: str | None = field(default=None, metadata={"doc": "lifetime, e.g. 30d, 12h, 2w", "check": _duration})


def spec(data: Any) -> KeySpec:
    """A KeySpec from JSON or CLI options; ValidationError names each bad field."""
    return build(KeySpec, data)


def digest(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def expires_at(expires: str | None, now: float) -> float | None:
    match = _DURATION.fullmatch(expires.strip()) if expires else None
    return now + float(match.group(1)) * _UNITS[match.group(2)] if match else None


def identity(row: Any) -> Identity:
    """What the gateway's other plugins read as ``call.identity``."""
    models = json.loads(row["models"]) if row["models"] else None
    return Identity(
        row["id"], row["name"], row["role"], tuple(models) if models is not None else None,
        row["rpm"], row["tpm"], row["max_concurrency"], row["budget"], row["priority"],
    )  # fmt: skip


def public(row: Any) -> dict[str, Any]:
    """A key as listed: its settings and times, never its secret or hash."""
    shown = {name: row[name] for name in (*PUBLIC, *PUBLIC_TIMES)}
    shown["models"] = json.loads(row["models"]) if row["models"] else None
    now = time.time()
    expired = row["expires_at"] is not None and row["expires_at"] <= now
    shown["status"] = "revoked" if row["revoked_at"] else "expired" if expired else "active"
    return shown


# -- writes, on their own connection -------------------------------------------------


def connect(path: Path) -> sqlite3.Connection:
    """The gateway's database (created 0600 if new), with the audit table and this plugin's table in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    create_private(path)
    db = sqlite3.connect(path, timeout=5, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA busy_timeout=5000")
    tighten(sqlite_files(path), _Quiet())
    db.executescript(audit.SCHEMA)
    db.execute("CREATE TABLE IF NOT EXISTS plugin_schemas (plugin TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    found = db.execute("SELECT version FROM plugin_schemas WHERE plugin = ?", (PLUGIN,)).fetchone()
    for version, script in enumerate(MIGRATIONS[found[0] if found else 0 :], (found[0] if found else 0) + 1):
        db.executescript(
            f"BEGIN; {script}; INSERT OR REPLACE INTO plugin_schemas VALUES ('{PLUGIN}', {version}); COMMIT;"
        )
    return db


class _Quiet:
    def warning(self, *_: Any, **__: Any) -> None:
        """The CLI has no structured log: a tightened file needs no message there."""


def create(path: Path, specs: list[KeySpec], actor: tuple[str, str | None]) -> list[tuple[str, dict[str, Any]]]:
    """Issue one key per spec, all or none; returns (secret, listing) pairs. The secrets are not kept."""
    issued = []
    with _transaction(path) as db:
        for one in specs:
            now, secret, key_id = time.time(), new_secret(), "k-" + secrets.token_hex(6)
            models = json.dumps(one.models) if one.models is not None else None
            db.execute(
                "INSERT INTO auth_keys (id, key_hash, name, role, models, rpm, tpm, max_concurrency, budget, "
                "priority, expires_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, digest(secret.encode()), one.name, one.role, models, one.rpm, one.tpm,
                 one.max_concurrency, one.budget, one.priority, expires_at(one.expires, now), now, now),
            )  # fmt: skip
            db.execute(audit.INSERT, audit.row(*actor, "key_created", key_id, asdict(one)))
            issued.append((secret, _listed(db, key_id)))
    return issued


def revoke(path: Path, key_id: str, actor: tuple[str, str | None]) -> dict[str, Any] | None:
    """Revoke a key (at once for this process; within a second for a running gateway). None if unknown."""
    with _transaction(path) as db:
        now = time.time()
        changed = db.execute(
            "UPDATE auth_keys SET revoked_at = coalesce(revoked_at, ?), updated_at = ? WHERE id = ?", (now, now, key_id)
        ).rowcount
        if changed:
            db.execute(audit.INSERT, audit.row(*actor, "key_revoked", key_id, {}))
        return _listed(db, key_id) if changed else None


def rotate(path: Path, key_id: str, actor: tuple[str, str | None]) -> tuple[str, dict[str, Any]] | None:
    """A new secret for the same key id and settings; the old one stops working. None if unknown or revoked."""
    with _transaction(path) as db:
        secret, now = new_secret(), time.time()
        changed = db.execute(
            "UPDATE auth_keys SET key_hash = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL",
            (digest(secret.encode()), now, key_id),
        ).rowcount
        if not changed:
            return None
        db.execute(audit.INSERT, audit.row(*actor, "key_rotated", key_id, {}))
        return secret, _listed(db, key_id)


def listing(path: Path) -> list[dict[str, Any]]:
    with _transaction(path) as db:
        return [public(row) for row in db.execute("SELECT * FROM auth_keys ORDER BY created_at")]


def cli_actor() -> tuple[str, str | None]:
    """Who works through ``multiverse keys``: the operating-system user, for the audit trail."""
    try:
        return "cli", getpass.getuser()
    except (KeyError, OSError):
        return "cli", None


def _listed(db: sqlite3.Connection, key_id: str) -> dict[str, Any]:
    return public(db.execute("SELECT * FROM auth_keys WHERE id = ?", (key_id,)).fetchone())


class _transaction:
    """A connection in one write transaction, committed on success, rolled back on error, then closed."""

    def __init__(self, path: Path) -> None:
        self.db = connect(path)

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: object, *_: object) -> None:
        try:
            self.db.execute("ROLLBACK" if kind else "COMMIT")
        finally:
            self.db.close()

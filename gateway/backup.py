"""``multiverse backup``, ``export`` and ``import``: the registry outside the gateway."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any

import structlog

from gateway.config import GatewayConfig
from gateway.private_files import create_private, sqlite_files, tighten
from gateway.registry import EDITABLE, Registry

EXPORT_VERSION = 1


def _cli_log() -> Any:
    """Log lines of a command go to standard error: standard output may be the export itself."""
    return structlog.wrap_logger(structlog.PrintLogger(sys.stderr))


def backup(config: GatewayConfig, target: Path) -> int:
    """Copy the registry database with SQLite's online backup API (safe while the gateway runs)."""
    source_path = config.database_path
    if not source_path.exists():
        raise FileNotFoundError(f"no registry database at {source_path}")
    target.parent.mkdir(parents=True, exist_ok=True)
    create_private(target)  # it holds backends' keys, as the database does
    tighten([target], _cli_log())
    with sqlite3.connect(source_path) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
        (count,) = copy.execute("SELECT count(*) FROM backends").fetchone()
    tighten(sqlite_files(target), _cli_log())
    return int(count)


async def export_registrations(config: GatewayConfig, include_secrets: bool) -> dict[str, Any]:
    """Registered backends (not those from the config file) as JSON-ready data."""
    registry = Registry(config.database_path, log=_cli_log())
    await registry.open()
    try:
        rows = []
        for backend in registry.backends.values():
            row = {"endpoint_url": backend.url, "models": list(backend.models)}
            row.update({k: getattr(backend, k) for k in EDITABLE if k not in ("url", "models")})
            if not include_secrets:
                row.pop("api_key")
            rows.append({k: v for k, v in row.items() if v is not None})
    finally:
        await registry.close()
    return {"multiverse_export": EXPORT_VERSION, "registrations": rows}


async def import_registrations(config: GatewayConfig, data: Any) -> tuple[int, int]:
    """Add the exported registrations; a URL already registered is updated. Returns (added, updated)."""
    if not isinstance(data, dict) or data.get("multiverse_export") != EXPORT_VERSION:
        raise ValueError("not a file written by `multiverse export` (no 'multiverse_export': 1)")
    registry = Registry(config.database_path, log=_cli_log())
    await registry.open()
    added = updated = 0
    try:
        for index, row in enumerate(data.get("registrations") or []):
            if not isinstance(row, dict) or not isinstance(row.get("endpoint_url"), str) or not row.get("models"):
                raise ValueError(f"registrations[{index}]: needs 'endpoint_url' and 'models'")
            fields = {k: v for k, v in row.items() if k in EDITABLE and k not in ("url", "models")}
            existing = registry.by_url(row["endpoint_url"])
            if existing is not None:
                await registry.update(existing, {"models": row["models"], **fields})
                updated += 1
            else:
                name = fields.pop("name", None)
                await registry.add(row["endpoint_url"], row["models"], name, **fields)
                added += 1
    finally:
        await registry.close()
    return added, updated

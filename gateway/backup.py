"""``multiverse backup``, ``export`` and ``import``: the registry outside the gateway."""

from __future__ import annotations

import ipaddress
import sqlite3
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from gateway.admin import Registration, given_fields
from gateway.backend import PENDING, UNKNOWN
from gateway.config import GatewayConfig
from gateway.jsonbody import lone_surrogate_path, non_finite_path
from gateway.netguard import PUBLIC_ONLY, address_problem, normalise_url
from gateway.private_files import create_private, sqlite_files, tighten
from gateway.registry import EDITABLE, Registry
from gateway.validate import ValidationError, build

EXPORT_VERSION = 1
MAX_KEY_ID = 128


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
            row: dict[str, Any] = {"endpoint_url": backend.url, "models": list(backend.models)}
            row.update({k: getattr(backend, k) for k in EDITABLE if k not in ("url", "models")})
            if not include_secrets:
                row.pop("api_key")
            row["owner_key"] = backend.owner_key  # the key that registered it: its owner can still manage it
            if backend.status == PENDING:  # waiting for an admin's approval: an import must not approve it
                row["status"] = PENDING
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
        rows = data.get("registrations") or []
        if not isinstance(rows, list):
            raise ValueError("'registrations' must be a list, as `multiverse export` writes it")
        path = lone_surrogate_path(data)  # paths as registrations[1].name: the whole file, walked once
        if path is not None:
            shown = path.encode("utf-8", "backslashreplace").decode()
            raise ValueError(f"{shown}: holds an unpaired \\u escape (a lone surrogate), which is not text")
        path = non_finite_path(data)
        if path is not None:
            raise ValueError(f"{path}: must be a finite number; JSON has no NaN or Infinity")
        allow_private = config.admin.allow_private_backends
        checked = [_checked(row, index, allow_private) for index, row in enumerate(rows)]  # all, before any write
        for url, models, fields, owner_key, pending in checked:
            existing = registry.by_url(url)
            if existing is not None:  # its owner stays; it may go back to pending, never out of it
                await registry.update(
                    existing, {"models": models, **fields}, pending=pending and existing.status != PENDING
                )
                updated += 1
            else:
                name, status = fields.pop("name", None), PENDING if pending else UNKNOWN
                await registry.add(url, models, name, owner_key=owner_key, status=status, **fields)
                added += 1
    finally:
        await registry.close()
    return added, updated


def _checked(row: Any, index: int, allow_private: bool) -> tuple[str, list[str], dict[str, Any], str | None, bool]:
    """An exported registration checked as ``POST /admin/register`` checks one: (URL, models, the other fields,
    owner_key, pending). A hand-edited file must not store what the API would refuse (models "abc" as three
    models, a weight of "heavy", a negative timeout, a private address; NaN and lone surrogates are refused
    for the whole file before)."""
    where = f"registrations[{index}]"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: must be an object with 'endpoint_url' and 'models'")
    given = {k: v for k, v in row.items() if k not in ("owner_key", "status")}
    try:
        body = build(Registration, given)
    except ValidationError as exc:
        raise ValueError(f"{where}: {'; '.join(exc.problems)}") from None
    if body.model_name and body.models:
        raise ValueError(f"{where}: give either 'model_name' or 'models', not both")
    models = [body.model_name] if body.model_name else body.models
    if body.endpoint_url is None or not models:
        raise ValueError(f"{where}: needs 'endpoint_url' and 'models'")
    if not allow_private:
        _public(body.endpoint_url, where)
    return (body.endpoint_url, models, given_fields(body), *_ownership(row, index))


def _public(url: str, where: str) -> None:
    """Refuse an address the API refuses. Only an address written out is checked: this command may run where
    names do not resolve, and a name that resolves to a private address is refused when the gateway connects."""
    host = urlsplit(normalise_url(url).url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    problem = address_problem(address)
    if problem:
        raise ValueError(f"{where}.endpoint_url: {host} is {problem}; {PUBLIC_ONLY}")


def _ownership(row: dict[str, Any], index: int) -> tuple[str | None, bool]:
    """An exported registration's ``owner_key`` (the id of the key that made it) and whether it waits for approval."""
    owner_key, status = row.get("owner_key"), row.get("status")
    if owner_key is not None and (not isinstance(owner_key, str) or not 0 < len(owner_key) <= MAX_KEY_ID):
        raise ValueError(
            f"registrations[{index}].owner_key: must be the id of the key that registered it, as text of at most "
            f"{MAX_KEY_ID} characters (as `multiverse export` writes it), or absent"
        )
    if status is not None and status != PENDING:
        raise ValueError(
            f"registrations[{index}].status: an export keeps only '{PENDING}' (waiting for approval); "
            f"got {str(status)[:40]!r}: remove it, or set it to '{PENDING}'"
        )
    return owner_key, status == PENDING

"""The database, its WAL, backups and exports hold backends' keys: owner-only files (0600)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import structlog

from gateway import logs
from tests.conftest import ADMIN, StartGateway


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask most machines have (0022): without care, new files are readable by everyone."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


async def _register_with_a_key(gateway_url: str) -> None:
    body = {"endpoint_url": "http://h.example", "models": ["m"], "api_key": "sk-backend-secret"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway_url + "/admin/register", json=body, headers=ADMIN) as response,
    ):
        assert response.status == 201


async def test_the_database_and_its_wal_are_created_owner_only(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = await start_gateway(backends=[])
    await _register_with_a_key(gateway.url)
    files = [tmp_path / name for name in ("gateway.db", "gateway.db-wal", "gateway.db-shm")]
    assert all(path.exists() for path in files)
    assert {path.name: _mode(path) for path in files} == {path.name: 0o600 for path in files}


async def test_wider_modes_are_tightened_on_open_and_logged(
    start_gateway: StartGateway, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    for name in ("gateway.db", "gateway.db-wal"):  # as an older version left them
        os.close(os.open(tmp_path / name, os.O_CREAT | os.O_WRONLY, 0o644))
        os.chmod(tmp_path / name, 0o644)
    saved = logging.getLogger().handlers[:]
    logs.configure("info", "json")
    try:
        gateway = await start_gateway(backends=[])
        await _register_with_a_key(gateway.url)
        out = capfd.readouterr().out
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers = saved
    assert _mode(tmp_path / "gateway.db") == _mode(tmp_path / "gateway.db-wal") == 0o600
    lines = [json.loads(line) for line in out.splitlines() if "file_mode_tightened" in line]
    assert sorted((Path(line["path"]).name, line["was"], line["now"]) for line in lines) == [
        ("gateway.db", "0644", "0600"), ("gateway.db-wal", "0644", "0600"),
    ]  # fmt: skip


async def test_backups_and_exports_are_owner_only(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = await start_gateway(backends=[])
    await _register_with_a_key(gateway.url)
    config = tmp_path / "gateway.yaml"
    config.write_text(f"storage: {{sqlite: {tmp_path / 'gateway.db'}}}\n")
    stale = tmp_path / "old-export.json"
    stale.write_text("{}")
    stale.chmod(0o644)

    assert _cli("backup", "copy.db", "--config", str(config), cwd=tmp_path).returncode == 0
    exported = _cli("export", "--config", str(config), "--include-secrets", "-o", "export.json", cwd=tmp_path)
    overwritten = _cli("export", "--config", str(config), "--include-secrets", "-o", stale.name, cwd=tmp_path)
    assert exported.returncode == overwritten.returncode == 0, exported.stderr + overwritten.stderr

    assert "sk-backend-secret" in (tmp_path / "export.json").read_text()
    copies = [p for p in tmp_path.iterdir() if p.name.startswith("copy.db")]
    assert {p.name: _mode(p) for p in [*copies, tmp_path / "export.json", stale]} == {
        p.name: 0o600 for p in [*copies, tmp_path / "export.json", stale]
    }
    with sqlite3.connect(tmp_path / "copy.db") as copy:
        assert copy.execute("SELECT api_key FROM backends").fetchone() == ("sk-backend-secret",)

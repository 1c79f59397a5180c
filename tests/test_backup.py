"""backup, export and import of registrations through the real command line."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.conftest import ADMIN, StartGateway


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


async def test_backup_export_import_round_trip(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = await start_gateway(backends=[])
    async with aiohttp.ClientSession() as session:
        for i, extra in enumerate([{"owner_name": "Ada", "api_key": "sk-secret-1"}, {"stall_timeout": 9.0}]):
            body = {"endpoint_url": f"http://127.0.0.1:{41000 + i}", "models": [f"m{i}"], **extra}
            async with session.post(gateway.url + "/admin/register", json=body, headers=ADMIN) as response:
                assert response.status == 201
    config = tmp_path / "gateway.yaml"
    config.write_text(f"storage: {{sqlite: {tmp_path / 'gateway.db'}}}\n")

    # an online backup while the gateway is running
    result = _cli("backup", str(tmp_path / "copy.db"), "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "backed up 2 registration(s)" in result.stdout
    with sqlite3.connect(tmp_path / "copy.db") as copy:
        assert sorted(r[0] for r in copy.execute("SELECT url FROM backends")) == [
            "http://127.0.0.1:41000", "http://127.0.0.1:41001",
        ]  # fmt: skip

    plain = json.loads(_cli("export", "--config", str(config), cwd=tmp_path).stdout)
    assert "sk-secret-1" not in json.dumps(plain)
    assert plain["registrations"][0]["owner_name"] == "Ada" and plain["registrations"][1]["stall_timeout"] == 9.0
    secret = tmp_path / "export.json"
    assert _cli("export", "--config", str(config), "--include-secrets", "-o", str(secret), cwd=tmp_path).returncode == 0

    other = tmp_path / "other.yaml"
    other.write_text(f"storage: {{sqlite: {tmp_path / 'other.db'}}}\n")
    result = _cli("import", str(secret), "--config", str(other), cwd=tmp_path)
    assert result.returncode == 0 and "2 added, 0 updated" in result.stdout
    again = _cli("import", str(secret), "--config", str(other), cwd=tmp_path)
    assert "0 added, 2 updated" in again.stdout
    imported = json.loads(_cli("export", "--config", str(other), "--include-secrets", cwd=tmp_path).stdout)
    assert imported["registrations"] == json.loads(secret.read_text())["registrations"]


def test_import_refuses_a_foreign_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"servers": []}')
    (tmp_path / "gateway.yaml").write_text("storage: {sqlite: ./gw.db}\n")
    result = _cli("import", "x.json", cwd=tmp_path)
    assert result.returncode == 1
    assert "not a file written by `multiverse export`" in result.stderr

"""backup, export and import of registrations through the real command line."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.admin import Registration
from gateway.registry import EDITABLE
from tests.conftest import ADMIN, StartGateway

LAB = "admin: {allow_private_backends: true}\n"
"""These tests' backends are on 127.0.0.1: a lab's setting (import refuses private addresses as the API does)."""


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
    other.write_text(f"storage: {{sqlite: {tmp_path / 'other.db'}}}\n{LAB}")
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


async def test_export_and_import_keep_who_registered_and_what_waits_for_approval(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A registration waiting for an admin's approval is imported still waiting (an import that made it routable
    would let a student's server take a protected model's prompts), and each keeps the key that registered it;
    an import never approves one already there."""
    gateway = await start_gateway(backends=[])
    async with aiohttp.ClientSession() as session:
        for port in (41010, 41011):
            body = {"endpoint_url": f"http://127.0.0.1:{port}", "models": ["m"]}
            async with session.post(gateway.url + "/admin/register", json=body, headers=ADMIN) as response:
                assert response.status == 201
    with sqlite3.connect(tmp_path / "gateway.db") as db:  # as a host key's registration under approve_registrations
        db.execute("UPDATE backends SET status = 'pending', owner_key = 'k-host-1' WHERE url LIKE '%:41010'")
    config = tmp_path / "gateway.yaml"
    config.write_text(f"storage: {{sqlite: {tmp_path / 'gateway.db'}}}\n")
    exported = tmp_path / "export.json"
    assert _cli("export", "--config", str(config), "-o", str(exported), cwd=tmp_path).returncode == 0
    rows = {r["endpoint_url"]: r for r in json.loads(exported.read_text())["registrations"]}
    assert (rows["http://127.0.0.1:41010"]["owner_key"], rows["http://127.0.0.1:41010"]["status"]) == (
        "k-host-1", "pending",
    )  # fmt: skip
    assert rows["http://127.0.0.1:41011"]["owner_key"] == "admin" and "status" not in rows["http://127.0.0.1:41011"]

    other = tmp_path / "other.yaml"
    other.write_text(f"storage: {{sqlite: {tmp_path / 'other.db'}}}\n{LAB}")
    assert _cli("import", str(exported), "--config", str(other), cwd=tmp_path).returncode == 0
    with sqlite3.connect(tmp_path / "other.db") as db:
        kept = {
            url: (owner, status) for url, owner, status in db.execute("SELECT url, owner_key, status FROM backends")
        }
    assert kept == {
        "http://127.0.0.1:41010": ("k-host-1", "pending"), "http://127.0.0.1:41011": ("admin", "unknown"),
    }  # fmt: skip

    # already there and approved meanwhile: an import of the pending export puts it back to wait, never the reverse
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("UPDATE backends SET status = 'healthy' WHERE url LIKE '%:41010'")
    data = json.loads(exported.read_text())
    assert _cli("import", str(exported), "--config", str(other), cwd=tmp_path).returncode == 0
    with sqlite3.connect(tmp_path / "other.db") as db:
        assert db.execute("SELECT status FROM backends WHERE url LIKE '%:41010'").fetchone() == ("pending",)

    for bad, message in (({"status": "healthy"}, "status: an export keeps only 'pending'"),
                         ({"owner_key": 7}, "owner_key: must be the id of the key")):  # fmt: skip
        broken = tmp_path / "broken.json"
        broken.write_text(json.dumps({**data, "registrations": [{**data["registrations"][0], **bad}]}))
        result = _cli("import", str(broken), "--config", str(other), cwd=tmp_path)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_import_checks_every_registration_as_the_api_does_and_writes_none_of_a_bad_file(tmp_path: Path) -> None:
    """A hand-edited export must not store what ``POST /admin/register`` refuses (a string of models taken as a
    list of letters, a weight that is no number, a negative timeout); one bad row and nothing is written."""
    (tmp_path / "gateway.yaml").write_text(f"storage: {{sqlite: ./gw.db}}\n{LAB}")
    good = {"endpoint_url": "http://127.0.0.1:41020", "models": ["m"]}
    bad = {"endpoint_url": "http://127.0.0.1:41021", "models": "abc", "weight": "heavy", "connect_timeout": -1}
    (tmp_path / "bad.json").write_text(json.dumps({"multiverse_export": 1, "registrations": [good, bad]}))
    result = _cli("import", "bad.json", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for problem in ("registrations[1]: models: expected a list", "weight: expected number", "connect_timeout: must be"):
        assert problem in result.stderr
    exported = json.loads(_cli("export", cwd=tmp_path).stdout)
    assert exported["registrations"] == []  # not even the good row before it
    (tmp_path / "list.json").write_text(json.dumps({"multiverse_export": 1, "registrations": {"a": good}}))
    result = _cli("import", "list.json", cwd=tmp_path)
    assert result.returncode == 1 and "'registrations' must be a list" in result.stderr


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"profile": {"cost_per_1k_prompt_tokens": float("nan")}},
            "registrations[1].profile.cost_per_1k_prompt_tokens: must be a finite",
        ),
        ({"name": "x\ud800"}, "registrations[1].name: holds an unpaired"),
        ({"endpoint_url": "http://169.254.169.254"}, "169.254.169.254 is a link-local address"),
        ({"model_name": "m2"}, "give either 'model_name' or 'models', not both"),
    ],
)
def test_import_refuses_what_the_api_refuses_before_writing_anything(
    tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    """NaN (which an export would write back as no JSON), a lone surrogate (which SQLite cannot store: it
    failed halfway, after earlier rows were written) and, without allow_private_backends, a private address
    written out (cloud metadata) are refused by name; the good row before the bad one is not written."""
    (tmp_path / "gateway.yaml").write_text("storage: {sqlite: ./gw.db}\n")
    good = {"endpoint_url": "http://93.184.215.14:8080", "models": ["m"]}
    bad = {"endpoint_url": "http://93.184.215.15:8080", "models": ["m"], **change}
    (tmp_path / "bad.json").write_text(json.dumps({"multiverse_export": 1, "registrations": [good, bad]}))
    result = _cli("import", "bad.json", cwd=tmp_path)
    assert result.returncode == 1 and problem in result.stderr and "Traceback" not in result.stderr
    assert json.loads(_cli("export", cwd=tmp_path).stdout)["registrations"] == []


async def test_an_import_keeps_an_existing_registrations_owner_and_its_wait(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A URL already registered keeps the key that registered it whatever the file says, and one waiting for
    approval keeps waiting when the file has it approved; a registration round-trips every field export writes."""
    assert {f.name for f in dataclasses.fields(Registration)} >= set(EDITABLE) - {"url"}  # export's fields import
    gateway = await start_gateway(backends=[])
    full = {
        "endpoint_url": "http://127.0.0.1:41030", "models": ["m"], "name": "full", "owner_name": "Ada",
        "owner_email": "ada@example.org", "description": "a lab GPU", "api_key": "sk-full", "connect_timeout": 2.0,
        "ttft_timeout": 30.0, "stall_timeout": 9.0, "weight": 2.0, "max_concurrency": 1,
        "profile": {"tier": "small", "cost_per_1k_prompt_tokens": 0.5}, "endpoints": ["chat/completions"],
        "aliases": {"m": "m-local"},
    }  # fmt: skip
    register = gateway.url + "/admin/register"
    async with aiohttp.ClientSession() as session, session.post(register, json=full, headers=ADMIN) as response:
        assert response.status == 201, await response.text()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"storage: {{sqlite: {tmp_path / 'gateway.db'}}}\n{LAB}")
    first = _cli("export", "--config", str(config), "--include-secrets", cwd=tmp_path).stdout
    other = tmp_path / "other.yaml"
    other.write_text(f"storage: {{sqlite: {tmp_path / 'other.db'}}}\n{LAB}")
    (tmp_path / "first.json").write_text(first)
    assert _cli("import", "first.json", "--config", str(other), cwd=tmp_path).returncode == 0
    again = _cli("export", "--config", str(other), "--include-secrets", cwd=tmp_path).stdout
    assert json.loads(again) == json.loads(first)  # every field, the owner included

    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("UPDATE backends SET status = 'pending', owner_key = 'k-host-2'")
    data = json.loads(first)
    data["registrations"][0]["owner_key"] = "k-intruder"  # and no status: as if approved
    (tmp_path / "claim.json").write_text(json.dumps(data))
    result = _cli("import", "claim.json", "--config", str(other), cwd=tmp_path)
    assert result.returncode == 0 and "0 added, 1 updated" in result.stdout
    with sqlite3.connect(tmp_path / "other.db") as db:
        assert db.execute("SELECT owner_key, status FROM backends").fetchall() == [("k-host-2", "pending")]

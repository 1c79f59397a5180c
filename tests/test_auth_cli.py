"""``multiverse keys`` in a subprocess, on the database a running gateway uses: create, roster, list, revoke."""

from __future__ import annotations

import asyncio
import csv
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import ADMIN_KEY, RunningGateway, StartBackend, StartGateway

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "hi"}]


def keys(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m gateway keys ...`` with the test's gateway.yaml (the auth plugin enabled, the test database)."""
    config = tmp_path / "gateway.yaml"
    if not config.exists():
        config.write_text(
            f"storage: {{sqlite: gateway.db}}\nadmin: {{api_key: {ADMIN_KEY}}}\nplugins: {{auth: {{}}}}\n"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIVERSE_")} | {"MULTIVERSE_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "keys", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
async def gateway(start_backend: StartBackend, start_gateway: StartGateway) -> RunningGateway:
    return await start_gateway(await start_backend(models=["echo", "other"]), plugins={"auth": {}})


def sdk(gateway: RunningGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


async def test_cli_keys_work_without_a_gateway_and_a_running_one_sees_them(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    made = keys(tmp_path, "create", "--name", "alice", "--models", "echo", "--rpm", "60", "--expires", "30d")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("mvk-") and "created key k-" in made.stderr and secret not in made.stderr
    listed = keys(tmp_path, "list")
    assert "active" in listed.stdout and "alice" in listed.stdout and secret not in listed.stdout

    gateway = await start_gateway(await start_backend(models=["echo", "other"]), plugins={"auth": {}})
    assert [m.id async for m in sdk(gateway, secret).models.list()] == ["echo"]
    later = await asyncio.to_thread(keys, tmp_path, "create", "--name", "bob", "--role", "user")
    await _until(lambda: _accepted(gateway, later.stdout.strip()), 1.5)


async def test_a_cli_revoke_reaches_a_running_gateway_within_a_second(gateway: RunningGateway, tmp_path: Path) -> None:
    secret = keys(tmp_path, "create", "--name", "carol").stdout.strip()
    await _until(lambda: _accepted(gateway, secret), 1.5)
    key_id = keys(tmp_path, "list").stdout.split()[0]
    revoked = await asyncio.to_thread(keys, tmp_path, "revoke", key_id)
    assert revoked.returncode == 0 and f"revoked {key_id} (carol)" in revoked.stdout
    started = time.monotonic()
    await _until(lambda: _refused(gateway, secret), 1.5)
    assert time.monotonic() - started < 1.5
    assert keys(tmp_path, "revoke", "k-missing").returncode == 2


async def test_a_roster_gives_one_key_per_student_in_a_private_file(gateway: RunningGateway, tmp_path: Path) -> None:
    roster = tmp_path / "roster.csv"
    roster.write_text("name,email,models\nana,ana@uni.edu,echo\nbeto,beto@uni.edu,\ncai,cai@uni.edu,echo;other\n")
    out = tmp_path / "keys.csv"
    made = keys(tmp_path, "create", "--from", str(roster), "--out", str(out), "--tpm", "20000", "--budget", "5")
    assert made.returncode == 0, made.stderr
    assert "created 3 key(s)" in made.stdout and "mvk-" not in made.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    rows = list(csv.DictReader(out.open()))
    assert [(r["name"], r["email"], r["models"]) for r in rows] == [
        ("ana", "ana@uni.edu", "echo"), ("beto", "beto@uni.edu", ""), ("cai", "cai@uni.edu", "echo,other"),
    ]  # fmt: skip
    assert len({r["key"] for r in rows}) == 3
    await _until(lambda: _accepted(gateway, rows[0]["key"]), 1.5)
    assert [m.id async for m in sdk(gateway, rows[0]["key"]).models.list()] == ["echo"]
    again = keys(tmp_path, "create", "--from", str(roster), "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("name,rpm\ndan,-3\n")
    refused = keys(tmp_path, "create", "--from", str(bad), "--out", str(tmp_path / "x.csv"))
    assert refused.returncode == 2 and "line 2" in refused.stderr and "rpm" in refused.stderr
    assert not (tmp_path / "x.csv").exists() and "dan" not in keys(tmp_path, "list").stdout


async def _accepted(gateway: RunningGateway, key: str) -> bool:
    try:
        await sdk(gateway, key).models.list()
    except openai.AuthenticationError:
        return False
    return True


async def _refused(gateway: RunningGateway, key: str) -> bool:
    return not await _accepted(gateway, key)


async def _until(check, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.05)

"""Backends belong to someone: host keys, protected models, approval of registrations, and the audit trail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ADMIN, ADMIN_KEY, RunningGateway, StartBackend, StartGateway
from tests.test_auth import call, issue

ROOT = Path(__file__).resolve().parent.parent


async def host(gateway: RunningGateway, name: str, **fields: Any) -> tuple[dict[str, str], str]:
    issued = await issue(gateway, name=name, role="host", **fields)
    return {"Authorization": f"Bearer {issued['key']}"}, issued["id"]


async def chat(gateway: RunningGateway, model: str) -> tuple[int, str | None]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    url = gateway.base_url + "/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=ADMIN) as answer:
        return answer.status, answer.headers.get("X-Multiverse-Backend")


async def test_a_host_key_sees_and_changes_only_its_own_registrations(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(plugins={"auth": {}})
    ana, ana_id = await host(gateway, "ana", models=["ana-model"])
    beto, _ = await host(gateway, "beto")
    served = await start_backend(models=["ana-model"])
    status, mine = await call("POST", gateway.url + "/admin/register", {"endpoint_url": served.url}, ana)
    assert status == 201 and mine["owner_key"] == ana_id and mine["status"] == "unknown"
    target = f"{gateway.url}/admin/register/{mine['registration_id']}"
    for method, body in [("PUT", {"weight": 2}), ("DELETE", None)]:
        status, refused = await call(method, target, body, beto)
        assert status == 403 and refused["error"]["code"] == "not_owner", method
        assert "a host key sees and changes only the registrations it made" in refused["error"]["message"]
    status, taken = await call("POST", gateway.url + "/admin/register", {"endpoint_url": served.url}, beto)
    assert status == 403 and taken["error"]["code"] == "not_owner"  # not even by registering the same URL
    assert (await call("GET", gateway.url + "/admin/servers", headers=beto))[1]["count"] == 0
    assert [s["name"] for s in (await call("GET", gateway.url + "/admin/servers", headers=ana))[1]["servers"]] == [
        mine["name"]
    ]
    other = await start_backend(models=["not-hers"])
    status, refused = await call("POST", gateway.url + "/admin/register", {"endpoint_url": other.url}, ana)
    assert status == 403 and "may register backends only for ana-model, not not-hers" in refused["error"]["message"]
    assert (await call("GET", gateway.url + "/admin/stats", headers=ana))[0] == 403
    assert (await call("PUT", target, {"weight": 2}, ana))[0] == 200
    assert (await call("DELETE", target, None, ana))[0] == 200
    assert (await call("GET", gateway.url + "/admin/servers"))[1]["count"] == 0


async def test_protected_models_cannot_be_claimed_by_a_host(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    official = await start_backend(models=["llama"])
    gateway = await start_gateway(official, plugins={"auth": {}}, admin={
        "api_key": ADMIN_KEY, "allow_private_backends": True, "protected_models": ["exam-model"],
    })  # fmt: skip
    student, _ = await host(gateway, "mallory")
    for model in ("llama", "exam-model"):  # from a gateway.yaml backend, and from admin.protected_models
        rogue = await start_backend(models=[model])
        status, refused = await call("POST", gateway.url + "/admin/register", {"endpoint_url": rogue.url}, student)
        assert status == 403 and refused["error"]["code"] == "protected_model", model
        assert f"{model} is protected" in refused["error"]["message"]
        assert "admin.approve_registrations" in refused["error"]["message"]
    fine = await start_backend(models=["mine"])
    status, mine = await call("POST", gateway.url + "/admin/register", {"endpoint_url": fine.url}, student)
    assert status == 201
    status, refused = await call("PUT", f"{gateway.url}/admin/register/{mine['registration_id']}", {
        "models": ["mine", "llama"]}, student)  # fmt: skip
    assert status == 403 and refused["error"]["code"] == "protected_model"
    assert {await chat(gateway, "llama") for _ in range(4)} == {(200, "b0")}
    rogue = await start_backend(models=["exam-model"])
    assert (await call("POST", gateway.url + "/admin/register", {"endpoint_url": rogue.url}))[0] == 201  # the admin may


async def test_with_approval_a_hosts_backend_waits_as_pending_until_an_admin_approves(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    official = await start_backend(models=["llama"])
    gateway = await start_gateway(official, plugins={"auth": {}}, admin={
        "api_key": ADMIN_KEY, "allow_private_backends": True, "approve_registrations": True,
    })  # fmt: skip
    student, student_id = await host(gateway, "ana")
    hosted = await start_backend(models=["llama", "ana-7b"])
    status, pending = await call("POST", gateway.url + "/admin/register", {
        "endpoint_url": hosted.url, "name": "ana-gpu", "api_key": "backend-secret-xyz"}, student)  # fmt: skip
    assert status == 201 and pending["status"] == "pending"
    assert any("takes no traffic until an admin approves it" in w for w in pending["warnings"])
    assert {await chat(gateway, "llama") for _ in range(4)} == {(200, "b0")}
    assert (await chat(gateway, "ana-7b"))[0] in (404, 503)
    assert hosted.seen == []  # no prompt reached the pending backend
    approve = f"{gateway.url}/admin/register/{pending['registration_id']}/approve"
    status, refused = await call("POST", approve, None, student)
    assert status == 403 and "it needs role admin" in refused["error"]["message"]
    listed = (await call("GET", gateway.url + "/admin/servers?status=pending"))[1]
    assert [s["name"] for s in listed["servers"]] == ["ana-gpu"]

    approved = await _cli_approve(gateway, pending["registration_id"], tmp_path)
    assert approved.returncode == 0 and "approved" in approved.stdout, approved.stderr
    assert gateway.state.registry.backends[pending["registration_id"]].status == "unknown"
    assert await chat(gateway, "ana-7b") == (200, "ana-gpu")
    assert (await call("POST", approve))[0] == 409  # approved already
    status, moved = await call("PUT", approve.removesuffix("/approve"), {"models": ["ana-7b"]}, student)
    assert status == 200 and moved["status"] == "pending"  # a host's new models wait for approval again

    status, audit = await call("GET", gateway.url + "/admin/audit?limit=50")
    entries = [
        (e["actor"], e["action"], e["target"]) for e in audit["entries"] if e["target"] == pending["registration_id"]
    ]
    assert entries == [
        (student_id, "registered", pending["registration_id"]),
        ("admin", "approved", pending["registration_id"]),
        (student_id, "updated", pending["registration_id"]),
    ]
    registered = next(e for e in audit["entries"] if e["action"] == "registered")
    assert registered["actor_name"] == "ana" and registered["detail"]["models"] == ["llama", "ana-7b"]
    assert registered["detail"]["fields"] == ["api_key", "name"]
    assert "backend-secret-xyz" not in json.dumps(audit)
    since = (await call("GET", f"{gateway.url}/admin/audit?since={time.time() + 60}"))[1]
    assert since["count"] == 0
    assert (await call("GET", gateway.url + "/admin/audit?limit=1"))[1]["count"] == 1
    assert (await call("GET", gateway.url + "/admin/audit", headers=student))[0] == 403
    assert (await call("GET", gateway.url + "/admin/audit?limit=x"))[0] == 400


async def _cli_approve(
    gateway: RunningGateway, registration_id: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """``multiverse servers approve ID`` against the running gateway, with MULTIVERSE_URL and MULTIVERSE_KEY."""
    import asyncio

    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIVERSE_")}
    env |= {"MULTIVERSE_URL": gateway.url, "MULTIVERSE_KEY": ADMIN_KEY}
    command = [sys.executable, "-m", "gateway", "servers", "approve", registration_id]
    return await asyncio.to_thread(subprocess.run, command, cwd=tmp_path, env=env, capture_output=True, text=True)

"""The auth plugin: keys issued by the gateway, checked as the OpenAI SDK sends them, roles and allowed models."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import ADMIN, ADMIN_KEY, RunningGateway, StartBackend, StartGateway

MESSAGES = [{"role": "user", "content": "hello there"}]


async def call(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = ADMIN
) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body, headers=headers) as answer:
        return answer.status, await answer.json()


async def issue(gateway: RunningGateway, **fields: Any) -> dict[str, Any]:
    """A new key through POST /admin/keys; the reply holds its secret in ``key``."""
    status, answer = await call("POST", gateway.url + "/admin/keys", {"name": "alice", **fields})
    assert status == 201, answer
    return answer


def client(gateway: RunningGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


@pytest.fixture
async def gateway(start_backend: StartBackend, start_gateway: StartGateway) -> RunningGateway:
    return await start_gateway(await start_backend(models=["echo", "other"]), plugins={"auth": {}})


async def test_an_issued_key_works_with_the_sdk_and_sees_only_its_models(gateway: RunningGateway) -> None:
    issued = await issue(gateway, models=["echo"], rpm=60, tpm=20000, budget=5.0, priority="high", expires="30d")
    assert issued["key"].startswith("mvk-") and issued["id"].startswith("k-")
    assert issued["expires_at"] == pytest.approx(time.time() + 30 * 86400, abs=60)
    sdk = client(gateway, issued["key"])
    assert [m.id async for m in sdk.models.list()] == ["echo"]
    chat = await sdk.chat.completions.create(model="echo", messages=MESSAGES)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == "hello there"
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await sdk.chat.completions.create(model="other", messages=MESSAGES)  # type: ignore[arg-type]
    assert "this key may not use model 'other'; it may use: echo" in refused.value.message
    assert refused.value.code == "model_not_allowed"
    async with aiohttp.ClientSession() as session:  # explain refuses the same way, as a dry run
        explain = gateway.url + "/v1/route/explain"
        headers = {"Authorization": f"Bearer {issued['key']}"}
        async with session.post(explain, json={"model": "other", "messages": MESSAGES}, headers=headers) as answer:
            assert answer.status == 403
    identity = gateway.state.plugins.pm.get_plugin("auth").keys[hashlib.sha256(issued["key"].encode()).hexdigest()]
    assert identity.identity.rpm == 60 and identity.identity.priority == "high" and identity.identity.budget == 5.0


async def test_missing_unknown_revoked_and_expired_keys_get_401_naming_the_problem(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    status, missing = await call("GET", gateway.base_url + "/models", headers=None)  # the SDK always sends one
    assert status == 401 and missing["error"]["type"] == "authentication_error"
    assert "no API key: send it as 'Authorization: Bearer <key>'" in missing["error"]["message"]
    with pytest.raises(openai.AuthenticationError) as unknown:
        await client(gateway, "mvk-not-a-real-key").chat.completions.create(model="echo", messages=MESSAGES)  # type: ignore[arg-type]
    assert (
        "this API key is not known here" in unknown.value.message and "mvk-not-a-real-key" not in unknown.value.message
    )

    revoked = await issue(gateway, name="bob")
    status, listed = await call("DELETE", f"{gateway.url}/admin/keys/{revoked['id']}")
    assert status == 200 and listed["status"] == "revoked"
    with pytest.raises(openai.AuthenticationError) as refused:
        await client(gateway, revoked["key"]).models.list()
    assert f"the API key 'bob' ({revoked['id']}) was revoked on" in refused.value.message

    expiring = await issue(gateway, name="carol", expires="1d")
    with sqlite3.connect(tmp_path / "gateway.db") as db:  # another process moves its expiry to the past
        db.execute("UPDATE auth_keys SET expires_at = ? WHERE id = ?", (time.time() - 60, expiring["id"]))
    sdk = client(gateway, expiring["key"])
    await _until_refused(sdk)
    with pytest.raises(openai.AuthenticationError) as expired:
        await sdk.models.list()
    assert f"the API key 'carol' ({expiring['id']}) expired on" in expired.value.message


async def _until_refused(sdk: openai.AsyncOpenAI, timeout: float = 2.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            await sdk.models.list()
        except openai.AuthenticationError:
            return time.monotonic() - start
    raise AssertionError("the key was still accepted")


async def test_the_admin_key_is_a_superuser_and_rotation_keeps_the_id(gateway: RunningGateway) -> None:
    assert [m.id async for m in client(gateway, ADMIN_KEY).models.list()] == ["echo", "other"]
    issued = await issue(gateway, role="user", models=["echo", "other"])
    status, rotated = await call("POST", f"{gateway.url}/admin/keys/{issued['id']}/rotate")
    assert status == 200 and rotated["id"] == issued["id"] and rotated["key"] != issued["key"]
    assert rotated["models"] == ["echo", "other"]
    with pytest.raises(openai.AuthenticationError):
        await client(gateway, issued["key"]).models.list()
    assert len([m async for m in client(gateway, rotated["key"]).models.list()]) == 2
    status, answer = await call("POST", f"{gateway.url}/admin/keys/k-nope/rotate")
    assert status == 404 and "no key with id 'k-nope'" in answer["error"]["message"]


async def test_roles_decide_what_the_admin_api_allows(gateway: RunningGateway) -> None:
    readonly = {"Authorization": f"Bearer {(await issue(gateway, name='ta', role='readonly'))['key']}"}
    user = {"Authorization": f"Bearer {(await issue(gateway, name='u', role='user'))['key']}"}
    status, listed = await call("GET", gateway.url + "/admin/servers", headers=readonly)
    assert status == 200 and listed["servers"], "a readonly key sees the backends..."
    for shown in listed["servers"]:  # ...but never their addresses or their owners' contacts
        assert {"endpoint_url", "owner_email", "owner_key"}.isdisjoint(shown) and shown["name"]
    assert "endpoint_url" in (await call("GET", gateway.url + "/admin/servers"))[1]["servers"][0]  # the admin does
    assert (await call("GET", gateway.url + "/admin/stats", headers=readonly))[0] == 200
    status, refused = await call("POST", gateway.url + "/admin/register", {"endpoint_url": "http://x"}, readonly)
    assert status == 403 and refused["error"]["code"] == "insufficient_role"
    assert (
        "a key with role 'readonly' may not use POST /admin/register; it needs role admin or host"
        in (refused["error"]["message"])
    )
    for method, path in [("GET", "/admin/servers"), ("GET", "/admin/keys"), ("POST", "/admin/keys")]:
        status, refused = await call(method, gateway.url + path, {"name": "x"}, user)
        assert status == 403 and "role 'user'" in refused["error"]["message"], path
    with pytest.raises(openai.PermissionDeniedError) as no_inference:
        await client(gateway, readonly["Authorization"][7:]).chat.completions.create(model="echo", messages=MESSAGES)  # type: ignore[arg-type]
    assert "a readonly key may list models" in no_inference.value.message
    status, bad = await call("POST", gateway.url + "/admin/keys", {"name": "x", "role": "king", "expires": "soon"})
    assert status == 400 and "role" in bad["error"]["message"] and "expires: must look like" in bad["error"]["message"]
    for name, rule in [
        ("a\ud800", "name: holds an unpaired \\u escape"),  # a lone surrogate: no database can store it
        ("two\nlines", "name: must be printable text"),
        (" ", "name: must be printable text"),
        ("x" * 201, "name: must be printable text"),
    ]:
        status, bad = await call("POST", gateway.url + "/admin/keys", {"name": name})
        assert status == 400 and rule in bad["error"]["message"], repr(name)


async def test_the_stored_table_never_holds_a_secret(gateway: RunningGateway, tmp_path: Path) -> None:
    issued = await issue(gateway, name="dora")
    rotated = (await call("POST", f"{gateway.url}/admin/keys/{issued['id']}/rotate"))[1]
    secrets = [issued["key"], rotated["key"]]
    with sqlite3.connect(tmp_path / "gateway.db") as db:
        dump = "\n".join(db.iterdump())
        (stored,) = db.execute("SELECT key_hash FROM auth_keys WHERE id = ?", (issued["id"],)).fetchone()
    assert stored == hashlib.sha256(rotated["key"].encode()).hexdigest()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("gateway.db*"))
    listed = json.dumps(await call("GET", gateway.url + "/admin/keys"))
    audit = json.dumps(await call("GET", gateway.url + "/admin/audit"))
    for secret in secrets:
        assert secret not in dump and secret.encode() not in raw and secret not in listed and secret not in audit
        assert secret[4:] not in dump  # not even without its prefix
    assert '"key_created"' in audit and '"key_rotated"' in audit


async def test_without_the_plugin_the_gateway_stays_open(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(models=["echo"]))
    chat = await client(gateway, "anything").chat.completions.create(model="echo", messages=MESSAGES)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == "hello there"
    status, answer = await call("GET", gateway.url + "/admin/servers", headers={"X-API-Key": "mvk-whatever-key-123"})
    assert status == 401 and answer["error"]["code"] == "invalid_admin_key"

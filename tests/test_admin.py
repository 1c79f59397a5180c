"""The admin API: key checks, registration life cycle, listing, stats, persistence."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from gateway import logs
from tests.conftest import ADMIN, ADMIN_KEY, StartBackend, StartGateway, closed_port_url


async def _call(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = ADMIN, data: bytes | None = None
) -> tuple[int, Any]:
    sent: dict[str, Any] = {"data": data} if data is not None else {"json": body}
    async with aiohttp.ClientSession() as session, session.request(method, url, headers=headers, **sent) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        (None, "the admin key is missing"),
        ({"X-API-Key": "wrong-key-wrong-key"}, "the admin key is not valid"),
        ({"Authorization": "Bearer nope-nope-nope-nope"}, "the admin key is not valid"),
    ],
)
async def test_admin_endpoints_need_the_key(
    start_gateway: StartGateway, headers: dict[str, str] | None, fragment: str
) -> None:
    gateway = await start_gateway()
    for method, path in [("GET", "/admin/servers"), ("GET", "/admin/stats"), ("POST", "/admin/register"),
                         ("PUT", "/admin/register/x"), ("DELETE", "/admin/register/x")]:  # fmt: skip
        status, body = await _call(method, gateway.url + path, {}, headers)
        assert status == 401, path
        assert fragment in body["error"]["message"]
        assert "X-API-Key" in body["error"]["message"]
        assert ADMIN_KEY not in str(body)


async def test_bearer_header_is_accepted(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    status, body = await _call("GET", gateway.url + "/admin/servers", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert (status, body) == (200, {"servers": [], "count": 0})


async def test_register_route_update_and_remove(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend(models=["gemma-3-270m"])
    moved = await start_backend(models=["gemma-3-270m", "qwen"])
    gateway = await start_gateway(backends=[])
    registration = {
        "endpoint_url": backend.url,
        "model_name": "gemma-3-270m",
        "owner_name": "Ada",
        "owner_email": "ada@example.edu",
        "description": "RTX 3060 in room 4",
    }
    status, created = await _call("POST", gateway.url + "/admin/register", registration)
    assert status == 201
    rid = created["registration_id"]
    assert created["models"] == ["gemma-3-270m"] and created["owner_name"] == "Ada"

    chat = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]}
    assert (await _call("POST", gateway.base_url + "/chat/completions", chat, None))[0] == 200
    assert len(backend.seen) == 1

    # the tunnel URL changed: PUT moves the registration, traffic follows
    status, updated = await _call(
        "PUT", f"{gateway.url}/admin/register/{rid}", {"endpoint_url": moved.url, "models": ["gemma-3-270m", "qwen"]}
    )
    assert status == 200 and updated["endpoint_url"] == moved.url and updated["models"] == ["gemma-3-270m", "qwen"]
    assert (await _call("POST", gateway.base_url + "/chat/completions", {**chat, "model": "qwen"}, None))[0] == 200
    assert len(moved.seen) == 1 and len(backend.seen) == 1

    status, deleted = await _call("DELETE", f"{gateway.url}/admin/register/{rid}")
    assert (status, deleted) == (200, {"registration_id": rid, "deleted": True})
    status, body = await _call("POST", gateway.base_url + "/chat/completions", chat, None)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert (await _call("DELETE", f"{gateway.url}/admin/register/{rid}"))[0] == 404


async def test_models_are_discovered_when_not_given(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend(models=["a", "b"])
    gateway = await start_gateway(backends=[])
    status, created = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": backend.url})
    assert status == 201 and created["models"] == ["a", "b"]
    status, body = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": closed_port_url()})
    assert status == 400
    assert "could not reach" in body["error"]["message"] and "pass 'model_name' or 'models'" in body["error"]["message"]


async def test_registering_the_same_url_again_refreshes_it(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(models=["a"])
    gateway = await start_gateway(backends=[])
    first = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": backend.url, "model_name": "a"})
    again = await _call(
        "POST", gateway.url + "/admin/register", {"endpoint_url": backend.url + "/", "models": ["a", "b"]}
    )
    assert first[0] == 201 and again[0] == 200
    assert first[1]["registration_id"] == again[1]["registration_id"]
    assert again[1]["models"] == ["a", "b"]
    assert (await _call("GET", gateway.url + "/admin/servers"))[1]["count"] == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model_name": "x"}, "endpoint_url: required"),
        ({"endpoint_url": "ftp://host", "model_name": "x"}, "endpoint_url: must be an http:// or https:// URL"),
        ({"endpoint_url": "http://h:1", "model": "x"}, "model: unknown key; did you mean 'models'?"),
        ({"endpoint_url": "http://h:1", "models": "x"}, "models: expected a list"),
        ({"endpoint_url": "http://h:1", "models": []}, "models: must be a non-empty list"),
        ({"endpoint_url": "http://h:1", "model_name": "x", "models": ["y"]}, "either 'model_name' or 'models'"),
        ([1], "must be a JSON object"),
    ],
)
async def test_bad_registrations_are_refused_with_the_reason(
    start_gateway: StartGateway, body: Any, fragment: str
) -> None:
    gateway = await start_gateway()
    status, answer = await _call("POST", gateway.url + "/admin/register", body)
    assert status == 400
    assert fragment in answer["error"]["message"]


async def test_config_backends_are_listed_but_read_only(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    gateway = await start_gateway(backend)
    _, listed = await _call("GET", gateway.url + "/admin/servers")
    (server,) = listed["servers"]
    assert server["registration_id"] == "config:b0" and server["read_only"] is True
    status, body = await _call("PUT", gateway.url + "/admin/register/config:b0", {"description": "x"})
    assert status == 403 and "edit gateway.yaml" in body["error"]["message"]
    assert (await _call("DELETE", gateway.url + "/admin/register/config:b0"))[0] == 403
    status, body = await _call(
        "POST", gateway.url + "/admin/register", {"endpoint_url": backend.url, "model_name": "x"}
    )
    assert status == 409


async def test_servers_filters_and_stats(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    one = await start_backend(models=["a"])
    two = await start_backend(models=["a", "b"])
    gateway = await start_gateway(one, two)
    await gateway.state.registry.set_status(gateway.state.registry.backends["config:b1"], "unhealthy", "down")
    _, only_b = await _call("GET", gateway.url + "/admin/servers?model=b")
    assert [s["name"] for s in only_b["servers"]] == ["b1"]
    _, unhealthy = await _call("GET", gateway.url + "/admin/servers?status=unhealthy")
    assert [(s["name"], s["last_error"]) for s in unhealthy["servers"]] == [("b1", "down")]
    status, body = await _call("GET", gateway.url + "/admin/servers?status=sick")
    assert status == 400 and "status must be one of" in body["error"]["message"]

    await _call("POST", gateway.base_url + "/completions", {"model": "a", "prompt": "x"}, None)
    await _call("POST", gateway.base_url + "/completions", {"model": "b", "prompt": "x"}, None)  # only b1 serves b: 503
    _, stats = await _call("GET", gateway.url + "/admin/stats")
    assert stats["servers"] == {"total": 2, "healthy": 0, "unhealthy": 1, "unknown": 1, "mismatched": 0, "pending": 0}
    assert stats["models"] == {
        "a": {"healthy": 0, "unhealthy": 1, "unknown": 1, "mismatched": 0, "pending": 0},
        "b": {"healthy": 0, "unhealthy": 1, "unknown": 0, "mismatched": 0, "pending": 0},
    }
    assert stats["requests"] == {"total": 2, "failed": 1}


async def test_registrations_survive_a_restart(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend(models=["m"])
    first = await start_gateway(backends=[])
    _, created = await _call(
        "POST", first.url + "/admin/register", {"endpoint_url": backend.url, "model_name": "m", "owner_name": "Lin"}
    )
    await first.server.close()

    second = await start_gateway(backends=[])
    _, listed = await _call("GET", second.url + "/admin/servers")
    (server,) = listed["servers"]
    assert server["registration_id"] == created["registration_id"] and server["owner_name"] == "Lin"
    status, _ = await _call("POST", second.base_url + "/completions", {"model": "m", "prompt": "x"}, None)
    assert status == 200


async def _raw_request(gateway_url: str, head: bytes, body: bytes = b"") -> tuple[int, dict[str, Any], bytes]:
    """An HTTP/1.1 request written byte for byte, so header values can be bytes no client library would send."""
    host, port = gateway_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    headers_blob, _, payload = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode().split(": ", 1) for line in headers_blob.split(b"\r\n"))
    return int(status_line.split()[1]), headers, payload


@pytest.mark.parametrize(
    "header", [b"X-API-Key: presented-\xff-KEYMARK", b"Authorization: Bearer presented-\xfe\xff-KEYMARK"]
)
async def test_a_key_that_is_not_utf8_gets_401_and_is_never_logged(
    start_gateway: StartGateway, capfd: pytest.CaptureFixture[str], header: bytes
) -> None:
    gateway = await start_gateway()
    saved = logging.getLogger().handlers[:]
    logs.configure("info", "json")
    try:
        status, headers, payload = await _raw_request(
            gateway.url, b"GET /admin/servers HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
        )
        out, err = capfd.readouterr()
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers = saved
    assert status == 401 and headers["Content-Type"].startswith("application/json")
    error = json.loads(payload)["error"]
    assert error["code"] == "invalid_admin_key" and "the admin key is not valid" in error["message"]
    assert "KEYMARK" not in out + err and "presented" not in out + err


async def test_json_nested_too_deeply_gets_400_in_the_envelope(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    _, created = await _call(
        "POST", gateway.url + "/admin/register", {"endpoint_url": "http://h.example", "models": ["m"]}
    )
    for method, path in [("POST", "/admin/register"), ("PUT", f"/admin/register/{created['registration_id']}")]:
        status, body = await _call(method, gateway.url + path, headers=ADMIN, data=b"[" * 100_000)
        assert status == 400, (path, body)
        assert body["error"]["message"] == "the request body nests JSON too deeply to be read; flatten it"


async def test_default_names_do_not_reveal_the_address(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(models=["echo"])
    gateway = await start_gateway(backends=[])
    _, created = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": backend.url})
    assert created["name"] == f"backend-{created['registration_id'][:8]}"
    port = backend.url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as session:
        chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(gateway.base_url + "/chat/completions", json=chat) as response:
            assert response.status == 200
            assert response.headers["X-Multiverse-Backend"] == created["name"]
            assert "127.0.0.1" not in response.headers["X-Multiverse-Backend"] and port not in created["name"]
    named = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": "http://h.example", "models": ["m"],
                                                                   "name": "ada-laptop"})  # fmt: skip
    assert named[1]["name"] == "ada-laptop"


async def test_existing_registrations_keep_their_names(start_gateway: StartGateway, tmp_path: Path) -> None:
    first = await start_gateway(backends=[])
    _, created = await _call(
        "POST", first.url + "/admin/register", {"endpoint_url": "http://h.example", "models": ["m"]}
    )
    await first.server.close()
    with sqlite3.connect(tmp_path / "gateway.db") as db:  # as an older version named it
        db.execute("UPDATE backends SET name = 'h.example:8000' WHERE id = ?", (created["registration_id"],))
    second = await start_gateway(backends=[])
    _, listed = await _call("GET", second.url + "/admin/servers")
    assert [s["name"] for s in listed["servers"]] == ["h.example:8000"]
    again = await _call("POST", second.url + "/admin/register", {"endpoint_url": "http://h.example", "models": ["m"]})
    assert again[0] == 200 and again[1]["name"] == "h.example:8000"


async def test_max_concurrency_is_registered_kept_and_shown(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    gateway = await start_gateway(
        backends=[{"name": "cfg", "url": backend.url, "models": ["echo"], "max_concurrency": 2}]
    )
    other = await start_backend()
    async with aiohttp.ClientSession(headers=ADMIN) as session:
        body = {"endpoint_url": other.url, "models": ["echo"], "max_concurrency": 1}
        async with session.post(gateway.url + "/admin/register", json=body) as response:
            assert response.status == 201 and (await response.json())["max_concurrency"] == 1
        async with session.post(gateway.url + "/admin/register", json={**body, "max_concurrency": 0}) as response:
            assert response.status == 400 and "max_concurrency" in (await response.json())["error"]["message"]
        async with session.get(gateway.url + "/admin/servers") as response:
            shown = {s["name"]: s["max_concurrency"] for s in (await response.json())["servers"]}
    assert shown["cfg"] == 2 and sorted(shown.values()) == [1, 2]

"""Registrations cannot aim the gateway at its own machine, the LAN or metadata services; limits hold."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from gateway import logs
from gateway.config import ConfigError, load
from gateway.netguard import PublicOnlyResolver
from tests.conftest import ADMIN, ADMIN_KEY, StartBackend, StartGateway

STRICT = {"api_key": ADMIN_KEY, "allow_private_backends": False}


async def _register(url: str, body: dict[str, Any], headers: dict[str, str] = ADMIN) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/admin/register", json=body, headers=headers) as response,
    ):
        return response.status, await response.json(), response.headers


@pytest.mark.parametrize(
    ("endpoint", "rule"),
    [
        ("http://127.0.0.1:9000", "127.0.0.1 a loopback address"),
        ("http://[::1]:9000", "::1 a loopback address"),
        ("http://[::ffff:127.0.0.1]:9000", "a loopback address"),
        ("http://localhost:9000", "localhost resolves to"),
        ("http://10.1.2.3", "10.1.2.3 a private-network address"),
        ("http://192.168.0.7:8000", "a private-network address"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 a link-local address (cloud metadata"),
        ("http://0.0.0.0:80", "an unspecified address"),
        ("http://224.0.0.1", "a multicast address"),
        ("https://user:pw@example.org", "must not carry a user name or password"),
        ("http://example.org:99999", "invalid port"),
        ("file:///etc/passwd", "must be an http:// or https:// URL"),
    ],
)
async def test_private_and_special_addresses_are_refused(start_gateway: StartGateway, endpoint: str, rule: str) -> None:
    gateway = await start_gateway(admin=STRICT)
    status, body, _ = await _register(gateway.url, {"endpoint_url": endpoint, "model_name": "m"})
    assert status == 400, body
    assert rule in body["error"]["message"]
    if "address" in rule:
        assert "admin.allow_private_backends: true" in body["error"]["message"]
    assert gateway.state.registry.backends == {}


async def test_a_public_address_is_accepted_and_never_contacted_at_registration(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(admin=STRICT)
    status, body, _ = await _register(gateway.url, {"endpoint_url": "https://1.1.1.1", "model_name": "m"})
    assert status == 201, body


async def test_an_update_to_a_private_address_is_refused(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(admin=STRICT)
    _, created, _ = await _register(gateway.url, {"endpoint_url": "https://1.1.1.1", "model_name": "m"})
    async with aiohttp.ClientSession() as session:
        url = f"{gateway.url}/admin/register/{created['registration_id']}"
        async with session.put(url, json={"endpoint_url": "http://127.0.0.1:8000"}, headers=ADMIN) as response:
            assert response.status == 400
            assert "loopback" in (await response.json())["error"]["message"]
    assert gateway.state.registry.backends[created["registration_id"]].url == "https://1.1.1.1"


async def test_the_resolver_refuses_hosts_that_turn_private_later() -> None:
    resolver = PublicOnlyResolver(trusted_hosts={"trusted.local"})
    with pytest.raises(OSError, match="resolves only to non-public addresses"):
        await resolver.resolve("localhost", 80, socket.AF_INET)
    trusted = PublicOnlyResolver(trusted_hosts={"localhost"})
    assert (await trusted.resolve("localhost", 80, socket.AF_INET))[0]["host"] == "127.0.0.1"
    await resolver.close()
    await trusted.close()


async def test_registrations_are_rate_limited_per_key(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(
        admin={"api_key": ADMIN_KEY, "allow_private_backends": True, "registrations_per_minute": 2}
    )
    statuses = []
    for port in range(3):
        status, body, headers = await _register(
            gateway.url, {"endpoint_url": f"http://127.0.0.1:{40000 + port}", "model_name": "m"}
        )
        statuses.append(status)
    assert statuses == [201, 201, 429]
    assert "at most 2 a minute per key" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1


async def test_the_number_of_backends_is_capped(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(admin={"api_key": ADMIN_KEY, "allow_private_backends": True, "max_backends": 1})
    first = await _register(gateway.url, {"endpoint_url": "http://127.0.0.1:40001", "model_name": "m"})
    second = await _register(gateway.url, {"endpoint_url": "http://127.0.0.1:40002", "model_name": "m"})
    again = await _register(gateway.url, {"endpoint_url": "http://127.0.0.1:40001", "model_name": "m"})
    assert (first[0], second[0], again[0]) == (201, 409, 200)
    assert "already holds 1 registered backends (admin.max_backends)" in second[1]["error"]["message"]


async def test_redirects_from_a_backend_are_not_followed(aiohttp_server: Any, start_gateway: StartGateway) -> None:
    followed = []

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(_: web.Request) -> web.Response:
        followed.append(1)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", redirect)
    app.router.add_route("*", "/elsewhere", elsewhere)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    gateway = await start_gateway(backends=[{"name": "r", "url": url, "models": ["m"]}])
    async with aiohttp.ClientSession() as session:
        chat = gateway.base_url + "/chat/completions"
        async with session.post(chat, json={"model": "m"}, allow_redirects=False) as response:
            # a redirect is a failed attempt: never passed on, so no SDK re-sends the prompt elsewhere
            assert response.status == 502 and "Location" not in response.headers
            message = (await response.json())["error"]["message"]
            assert "redirect (HTTP 302)" in message and url not in message
    assert followed == []


async def test_oversized_headers_get_400_and_one_log_line(
    start_gateway: StartGateway, capfd: pytest.CaptureFixture[str]
) -> None:
    gateway = await start_gateway()
    saved = logging.getLogger().handlers[:]
    logs.configure("info", "json")
    try:
        async with aiohttp.ClientSession() as session:
            big = {"X-Big": "a" * 10_000}
            async with session.post(gateway.base_url + "/chat/completions", headers=big, data=b"{}") as response:
                assert response.status == 400
        out = capfd.readouterr().out
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers = saved
    (line,) = [json.loads(x) for x in out.splitlines() if "Error handling request" in x]
    assert "Got more than 8190 bytes" in line["event"] and line["level"] == "error"
    assert "Traceback" not in out and "exception" not in line


def test_a_key_given_twice_in_the_yaml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "admin: {api_key: aaaaaaaaaaaaaaaaaaaa}\nserver: {port: 1}\nadmin: {allow_private_backends: true}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert "the key 'admin' is given twice in one mapping; keep one" in caught.value.problems[0]
    assert "line 3" in caught.value.problems[0]


async def _slow_model_lists(aiohttp_server: Any) -> str:
    """A server that answers GET <any base path>/v1/models after a pause, as a busy backend does."""

    async def models(_: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/{base:.*}/v1/models", models)
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")


async def test_the_backend_cap_holds_under_concurrent_registrations(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    server = await _slow_model_lists(aiohttp_server)
    admin = {"api_key": ADMIN_KEY, "allow_private_backends": True, "max_backends": 5, "registrations_per_minute": 1000}
    gateway = await start_gateway(admin=admin)
    results = await asyncio.gather(*(_register(gateway.url, {"endpoint_url": f"{server}/b{i}"}) for i in range(40)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [201] * 5 + [409] * 35
    assert len(gateway.state.registry.backends) == 5


async def test_concurrent_registrations_of_one_url_make_one_registration(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    server = await _slow_model_lists(aiohttp_server)
    gateway = await start_gateway(admin={"api_key": ADMIN_KEY, "allow_private_backends": True})
    spellings = [f"{server}/same", f"{server}/same/", f"{server}/same/v1"]
    results = await asyncio.gather(*(_register(gateway.url, {"endpoint_url": spellings[i % 3]}) for i in range(9)))
    assert sorted(status for status, _, _ in results) == [200] * 8 + [201]
    assert len({body["registration_id"] for _, body, _ in results}) == 1
    assert len(gateway.state.registry.backends) == 1


async def test_a_private_address_registered_while_allowed_is_not_called_once_disallowed(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    """A registration by IP address made while ``allow_private_backends`` was on (or imported) stays in the
    registry when the setting is turned off; the relay then refuses to connect to it, as it refuses a host name
    that turned private: the pool passes IP literals through the checking resolver too."""
    backend = await start_backend(models=["echo"])  # on 127.0.0.1
    gateway = await start_gateway(backends=[], admin=STRICT)
    await gateway.state.registry.add(backend.url, ["echo"], "was-allowed")  # as the registry kept it
    reply = await gateway.chat("hello")
    assert reply.status == 503 and backend.seen == []
    message = reply.json()["error"]["message"]
    assert "was-allowed: could not connect (its address is not public" in message and "127.0.0.1" not in message

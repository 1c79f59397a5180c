"""Backend URLs: refused when they cannot work, one spelling when they are equivalent, /v1 dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config import ConfigError, parse
from tests.conftest import ADMIN, StartBackend, StartGateway
from tests.fake_backend import FakeBackend

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


async def _call(method: str, url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    headers = {**ADMIN, "Content-Type": "application/json"}
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.request(method, url, data=data, headers=headers) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("endpoint", "fragment"),
    [
        ("http://my-laptop..example.org", "host name that cannot be looked up: 'my-laptop..example.org'"),
        (f"http://{'a' * 64}.example.org", "each dot-separated part must be 1 to 63"),
        ("http://" + ".".join(["a" * 60] * 5), "253 characters in all"),
        ("http://bad host.example.org", "must not contain spaces"),
        ("http://example.org/base?key=value", "without a query (?...) or fragment (#...)"),
        ("http://example.org/#section", "without a query (?...) or fragment (#...)"),
        ("http://ada:secret@example.org", "must not carry a user name or password"),
        ("http://example.org:0", "invalid port (give 1-65535"),
    ],
)
async def test_urls_that_cannot_work_are_refused(start_gateway: StartGateway, endpoint: str, fragment: str) -> None:
    gateway = await start_gateway(backends=[])
    status, body = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": endpoint, "model_name": "m"})
    assert status == 400, body
    assert fragment in body["error"]["message"] and body["error"]["param"] == "endpoint_url"
    assert "secret" not in body["error"]["message"]
    assert gateway.state.registry.backends == {}


async def test_an_update_to_a_url_that_cannot_work_is_refused(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(backends=[])
    _, created = await _call(
        "POST", gateway.url + "/admin/register", {"endpoint_url": "http://example.org", "model_name": "m"}
    )
    url = f"{gateway.url}/admin/register/{created['registration_id']}"
    status, body = await _call("PUT", url, {"endpoint_url": "http://my-laptop..example.org"})
    assert status == 400 and "cannot be looked up" in body["error"]["message"]
    status, body = await _call("PUT", url, {"endpoint_url": "HTTPS://Example.ORG:443/tunnel/v1/"})
    assert status == 200 and body["endpoint_url"] == "https://example.org/tunnel"
    assert "the trailing /v1 was dropped" in body["warnings"][0]


@pytest.mark.parametrize(
    ("first", "second", "stored"),
    [
        ("HTTP://Example.ORG:80/", "http://example.org", "http://example.org"),
        ("https://example.org:443//", "https://EXAMPLE.org", "https://example.org"),
        ("http://example.org:8080/base/", "http://Example.org:8080/base", "http://example.org:8080/base"),
        ("http://example.org./", "http://example.org", "http://example.org"),
        ("http://[::FFFF:10.0.0.1]:8000", "http://[::ffff:a00:1]:8000/", "http://[::ffff:a00:1]:8000"),
        ("http://bücher.example/", "http://xn--bcher-kva.example", "http://xn--bcher-kva.example"),
    ],
)
async def test_equivalent_spellings_are_one_registration(
    start_gateway: StartGateway, first: str, second: str, stored: str
) -> None:
    gateway = await start_gateway(backends=[])
    one = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": first, "model_name": "m"})
    two = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": second, "models": ["m", "n"]})
    assert (one[0], two[0]) == (201, 200), (one, two)
    assert one[1]["registration_id"] == two[1]["registration_id"]
    assert two[1]["endpoint_url"] == stored and two[1]["models"] == ["m", "n"]
    assert len(gateway.state.registry.backends) == 1


async def test_a_pasted_v1_is_dropped_and_models_are_discovered(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(models=["echo"])
    gateway = await start_gateway(backends=[])
    status, created = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": backend.url + "/v1/"})
    assert status == 201, created
    assert created["endpoint_url"] == backend.url and created["models"] == ["echo"]
    assert created["warnings"] == [
        f"the trailing /v1 was dropped: the gateway adds /v1/... itself, so the base URL is {backend.url}"
    ]
    assert (await _call("POST", gateway.base_url + "/chat/completions", CHAT))[0] == 200
    assert [seen.path for seen in backend.seen] == ["/v1/chat/completions"]


async def test_a_server_under_a_base_path_still_works(aiohttp_server: Any, start_gateway: StartGateway) -> None:
    backend = FakeBackend(models=["echo"])
    proxy = web.Application()
    proxy.add_subapp("/proxy/abc", backend.app())
    server = await aiohttp_server(proxy)
    base = str(server.make_url("/proxy/abc/"))
    gateway = await start_gateway(backends=[])
    status, created = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": base})
    assert status == 201, created
    assert created["endpoint_url"] == base.rstrip("/") and "warnings" not in created
    assert (await _call("POST", gateway.base_url + "/chat/completions", CHAT))[0] == 200
    assert [seen.path for seen in backend.seen] == ["/proxy/abc/v1/chat/completions"]


async def test_a_configured_backend_url_is_normalised_too(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(models=["echo"])
    gateway = await start_gateway(backends=[{"name": "lab", "url": backend.url.upper() + "/v1", "models": ["echo"]}])
    assert gateway.state.registry.backends["config:lab"].url == backend.url
    assert (await _call("POST", gateway.base_url + "/chat/completions", CHAT))[0] == 200
    status, body = await _call("POST", gateway.url + "/admin/register", {"endpoint_url": backend.url + "/"})
    assert status == 409 and "configured in gateway.yaml as 'lab'" in body["error"]["message"]


def test_a_configured_backend_url_that_cannot_work_is_a_config_error(tmp_path: Path) -> None:
    backends = [
        {"name": "a", "url": "http://my-laptop..example.org", "models": ["m"]},
        {"name": "b", "url": "http://example.org:8000/?x=1", "models": ["m"]},
    ]
    with pytest.raises(ConfigError) as caught:
        parse({"backends": backends}, base_dir=tmp_path)
    problems = caught.value.problems
    assert problems[0].startswith("backends[0].url: has a host name that cannot be looked up")
    assert problems[1].startswith("backends[1].url: must be a base URL without a query")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"endpoint_url": "http://example.org", "models": ["m"], "name": "b\\ud800"}', "name"),
        (b'{"endpoint_url": "http://example.org/\\udfff", "models": ["m"]}', "endpoint_url"),
        (b'{"endpoint_url": "http://example.org", "models": ["m\\ud800"]}', "models[0]"),
        (b'{"endpoint_url": "http://example.org", "models": ["m"], "description": "\\ud800"}', "description"),
        (b'{"endpoint_url": "http://example.org", "models": ["m"], "profile": {"\\ud800": 1}}', "profile.'\\ud800'"),
    ],
)
async def test_text_with_a_lone_surrogate_is_refused_naming_the_field(
    start_gateway: StartGateway, raw: bytes, param: str
) -> None:
    gateway = await start_gateway(backends=[])
    status, body = await _call("POST", gateway.url + "/admin/register", raw=raw)
    assert status == 400, body  # was a plain-text 500 (the database cannot store such text)
    assert body["error"]["param"] == param and "unpaired \\u escape (a lone surrogate)" in body["error"]["message"]
    assert gateway.state.registry.backends == {}


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"endpoint_url": "http://example.org", "model_name": "m", "weight": 1e999}', "weight"),
        (b'{"endpoint_url": "http://example.org", "model_name": "m", "stall_timeout": Infinity}', "stall_timeout"),
        (b'{"endpoint_url": "http://example.org", "model_name": "m", "connect_timeout": NaN}', "connect_timeout"),
        (
            b'{"endpoint_url": "http://example.org", "model_name": "m",'
            b' "profile": {"cost_per_1k_prompt_tokens": 1e999}}',
            "profile.cost_per_1k_prompt_tokens",
        ),
        (b'{"endpoint_url": "http://example.org", "model_name": "m", "profile": {"capabilities": {"code": NaN}}}',
         "profile.capabilities.code"),
    ],
)  # fmt: skip
async def test_non_finite_numbers_are_refused_naming_the_field(
    start_gateway: StartGateway, raw: bytes, param: str
) -> None:
    gateway = await start_gateway(backends=[])
    status, body = await _call("POST", gateway.url + "/admin/register", raw=raw)
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["message"].startswith(f"{param}: must be a finite number")
    assert gateway.state.registry.backends == {}
    _, created = await _call(
        "POST", gateway.url + "/admin/register", {"endpoint_url": "http://example.org", "model_name": "m"}
    )
    status, body = await _call("PUT", f"{gateway.url}/admin/register/{created['registration_id']}", raw=raw)
    assert status == 400 and body["error"]["param"] == param
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/admin/servers", headers=ADMIN) as got:
        text = await got.text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"/admin/servers emitted {name}"))

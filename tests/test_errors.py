"""Bad input gets a clear error in OpenAI's envelope; headers are handled as a proxy should."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import StartBackend, StartGateway


@pytest.fixture
async def gateway(start_backend: StartBackend, start_gateway: StartGateway):  # type: ignore[no-untyped-def]
    backend = await start_backend()
    running = await start_gateway(backend, server={"max_body_bytes": 2048})
    running.backend = backend
    return running


async def _raw(url: str, data: bytes, headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, dict]:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as session, session.request(method, url, data=data, headers=headers) as response:
        return response.status, await response.json()


def _assert_envelope(body: dict, fragment: str) -> None:  # type: ignore[type-arg]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert fragment in body["error"]["message"], body


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "request body is empty"),
        (b"[1, 2]", "must be a JSON object, not list"),
        (b'{"messages": []}', "'model' is required; GET /v1/models lists the models"),
        (b'{"model": 7}', "'model' must be a non-empty string"),
        (b'{"model": "echo\\ud800"}', "'model' must be printable text"),  # a lone surrogate: no UTF-8 for it
        (b'{"model": "echo\\n"}', "'model' must be printable text"),
        (b'{"model": "echo", "stream": "yes"}', "'stream' must be true or false"),
        (b'{"model": "echo", "messages": "hi"}', "'messages' must be a list of message objects"),
        (b'{"model": "echo", "messages": ["hi"]}', "'messages' must be a list of message objects"),
        (b'{"model": "echo", "prompt": 5}', "'prompt' must be a string or a list"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
async def test_malformed_requests_get_400(gateway, data: bytes, fragment: str) -> None:  # type: ignore[no-untyped-def]
    status, body = await _raw(gateway.base_url + "/chat/completions", data)
    assert status == 400
    _assert_envelope(body, fragment)
    assert gateway.backend.seen == []


async def test_unknown_model_lists_available_ones(gateway) -> None:  # type: ignore[no-untyped-def]
    status, body = await _raw(gateway.base_url + "/completions", b'{"model": "llama-3"}')
    assert status == 404
    _assert_envelope(body, "model 'llama-3' is not served here; available: echo")
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


async def test_body_over_the_limit_gets_413(gateway) -> None:  # type: ignore[no-untyped-def]
    big = b'{"model": "echo", "prompt": "' + b"x" * 4096 + b'"}'
    status, body = await _raw(gateway.base_url + "/completions", big)
    assert status == 413
    _assert_envelope(body, "larger than 2048 bytes")


async def test_unknown_path_and_wrong_method_use_the_envelope(gateway) -> None:  # type: ignore[no-untyped-def]
    status, body = await _raw(gateway.url + "/v2/chat", b"", method="GET")
    assert status == 404
    _assert_envelope(body, "no such endpoint: GET /v2/chat")
    status, body = await _raw(gateway.base_url + "/chat/completions", b"", method="GET")
    assert status == 405
    _assert_envelope(body, "GET is not allowed")


async def test_body_is_forwarded_byte_for_byte(gateway) -> None:  # type: ignore[no-untyped-def]
    body = b'{ "model" : "echo",\n  "prompt": "a  b", "x_custom": [1, 2.50, {"k": null}] }'
    status, _ = await _raw(gateway.base_url + "/completions", body, {"Content-Type": "application/json"})
    assert status == 200
    assert gateway.backend.seen[-1].body == body


async def test_credentials_and_hop_by_hop_headers_stay_at_the_gateway(gateway) -> None:  # type: ignore[no-untyped-def]
    headers = {
        "Authorization": "Bearer sk-student-secret",
        "X-API-Key": "another-secret",
        "Cookie": "session=1",
        "Connection": "keep-alive, X-Private",
        "X-Private": "dropped because Connection names it",
        "Proxy-Authorization": "Basic abc",
        "X-Custom": "kept",
    }
    status, _ = await _raw(gateway.base_url + "/completions", b'{"model": "echo", "prompt": "a"}', headers)
    assert status == 200
    seen = {k.lower(): v for k, v in gateway.backend.seen[-1].headers.items()}
    for name in ("authorization", "x-api-key", "cookie", "x-private", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-custom"] == "kept"
    assert "secret" not in str(seen)


async def test_request_id_is_created_when_missing(gateway) -> None:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/completions", json={"model": "echo", "prompt": "a"}) as response:
            request_id = response.headers["X-Request-ID"]
        async with session.post(gateway.base_url + "/completions", data=b"{") as response:
            assert response.headers["X-Request-ID"]
    assert len(request_id) >= 16
    assert gateway.backend.seen[-1].headers["X-Request-ID"] == request_id


async def test_health_reports_the_database(gateway) -> None:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/health") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok", "database": "ok", "models": 1}
    await gateway.state.registry.close()
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/health") as response:
        assert response.status == 503
        assert (await response.json())["database"] == "unavailable"

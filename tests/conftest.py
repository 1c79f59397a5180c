"""Fixtures: fake backends and gateways on real sockets, each test with its own database."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import config as config_mod
from gateway.app import create_app
from gateway.state import GATEWAY, Gateway
from tests.fake_backend import FakeBackend

ADMIN_KEY = "test-admin-key-0123456789"
ADMIN = {"X-API-Key": ADMIN_KEY}


class RunningGateway:
    """A gateway on a real port, with helpers for the tests."""

    def __init__(self, server: TestServer) -> None:
        self.server = server

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def state(self) -> Gateway:
        return self.server.app[GATEWAY]


StartBackend = Callable[..., Awaitable[FakeBackend]]
StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_backend(aiohttp_server: Any) -> StartBackend:
    async def start(**kwargs: Any) -> FakeBackend:
        backend = FakeBackend(**kwargs)
        server = await aiohttp_server(backend.app())
        backend.url = str(server.make_url("")).rstrip("/")
        return backend

    return start


@pytest.fixture
def gateway_config(tmp_path: Path) -> Callable[..., config_mod.GatewayConfig]:
    def make(**sections: Any) -> config_mod.GatewayConfig:
        data: dict[str, Any] = {
            "storage": {"sqlite": str(tmp_path / "gateway.db")},
            "admin": {"api_key": ADMIN_KEY, "allow_private_backends": True},
        }
        data.update(sections)
        return config_mod.parse(data, base_dir=tmp_path)

    return make


@pytest.fixture
async def start_gateway(aiohttp_server: Any, gateway_config: Callable[..., config_mod.GatewayConfig]) -> StartGateway:
    async def start(*backends: FakeBackend, **sections: Any) -> RunningGateway:
        static = [{"name": f"b{i}", "url": b.url, "models": b.models} for i, b in enumerate(backends)]
        sections.setdefault("backends", static)
        app: web.Application = create_app(gateway_config(**sections))
        return RunningGateway(await aiohttp_server(app))

    return start


def closed_port_url() -> str:
    """A URL on which nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, failing after ``timeout`` seconds."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)

"""Test helpers for plugins: a real gateway on a real port, fake OpenAI backends, as pytest fixtures.

Enable them with one line in your ``conftest.py`` or test file::

    pytest_plugins = ["gateway.testing"]

Fixtures (each test gets its own, with its own database in ``tmp_path``):

``start_backend(**fields)``
    starts a :class:`FakeBackend` (``mode="hang"``, ``first_delay=2``, ...) on a free port.
``start_gateway(*backends, config_file=None, base_dir=None, **sections)``
    starts a gateway serving those backends and returns a :class:`RunningGateway`. Keyword
    arguments are ``gateway.yaml`` sections (``plugins={"./my_strategy.py": {}}``,
    ``routing={"strategy": "mine"}``). Relative paths resolve against ``base_dir``, which is
    the folder of the test file unless given.
``gateway_config(**sections)``
    the validated ``GatewayConfig`` that ``start_gateway`` would use, for tests that build
    the app themselves.

Helpers: :func:`eventually` (wait for a condition), :func:`closed_port_url` (a URL where
nothing listens), ``ADMIN_KEY`` / ``ADMIN`` (the test gateway's admin key, and headers carrying it).

The tests are asynchronous: with pytest-asyncio's default (strict) mode, mark them with
``pytestmark = pytest.mark.asyncio``, or set ``asyncio_mode = auto`` in your pytest
configuration. Needs ``pytest`` and ``pytest-aiohttp`` (``pip install 'multiverse-gateway[testing]'``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

try:
    import pytest
    import pytest_asyncio
except ImportError as exc:  # pragma: no cover - only without the test dependencies
    raise ImportError(
        "gateway.testing needs pytest and pytest-aiohttp: pip install 'multiverse-gateway[testing]'"
    ) from exc

from gateway import config as config_mod
from gateway.app import create_app
from gateway.state import GATEWAY, Gateway
from gateway.testing.fake_backend import MODES, FakeBackend, Mode, Seen

if TYPE_CHECKING:
    from pytest_aiohttp import AiohttpServer

__all__ = [
    "ADMIN",
    "ADMIN_KEY",
    "MODES",
    "FakeBackend",
    "Mode",
    "Reply",
    "RunningGateway",
    "Seen",
    "StartBackend",
    "StartGateway",
    "closed_port_url",
    "eventually",
    "make_config",
]

ADMIN_KEY = "test-admin-key-0123456789"
"""The admin key of every gateway these fixtures start."""
ADMIN = {"X-API-Key": ADMIN_KEY}
"""Headers that authenticate as the admin: ``session.get(gateway.url + "/admin/servers", headers=ADMIN)``."""


@dataclass(frozen=True)
class Reply:
    """What the gateway answered: status, headers and the whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def backend(self) -> str | None:
        """The name of the backend that answered (the ``X-Multiverse-Backend`` header)."""
        return self.headers.get("X-Multiverse-Backend")

    def json(self) -> Any:
        return json.loads(self.body)


class RunningGateway:
    """A gateway listening on a real port of 127.0.0.1."""

    def __init__(self, server: TestServer) -> None:
        self.server = server

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the admin API is under it."""
        return str(self.server.make_url("")).rstrip("/")

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: give it to the OpenAI SDK as ``base_url``."""
        return self.url + "/v1"

    @property
    def state(self) -> Gateway:
        """The gateway's own state: config, registry, plugins."""
        return self.server.app[GATEWAY]

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> Reply:
        """GET ``path`` (``/admin/servers`` with ``headers=ADMIN``) and read the whole answer."""
        async with aiohttp.ClientSession() as session, session.get(self.url + path, headers=headers) as response:
            return Reply(response.status, response.headers, await response.read())

    async def post(self, path: str, body: Any, headers: Mapping[str, str] | None = None) -> Reply:
        """POST ``body`` as JSON to ``path`` (``/v1/chat/completions``) and read the whole answer."""
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url + path, json=body, headers=headers) as response,
        ):
            return Reply(response.status, response.headers, await response.read())

    async def chat(self, content: str = "hi", *, model: str = "echo", **body: Any) -> Reply:
        """Send one user message to ``/v1/chat/completions``; other fields (``user``, ``stream``) as keywords."""
        return await self.post(
            "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": content}], **body}
        )


class StartBackend(Protocol):
    def __call__(self, **fields: Any) -> Awaitable[FakeBackend]: ...


class StartGateway(Protocol):
    def __call__(
        self,
        *backends: FakeBackend,
        config_file: str | Path | None = None,
        base_dir: str | Path | None = None,
        **sections: Any,
    ) -> Awaitable[RunningGateway]: ...


def make_config(
    tmp_path: Path,
    base_dir: Path,
    sections: Mapping[str, Any],
    config_file: str | Path | None = None,
) -> config_mod.GatewayConfig:
    """A test gateway's config: ``config_file`` (if any), then ``sections``; its database in ``tmp_path``.

    The admin key is always ``ADMIN_KEY`` and private backend addresses are allowed. Relative
    paths (plugin files) resolve against the config file's folder, or ``base_dir`` without one.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        path = base_dir / Path(config_file).expanduser()
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        base_dir = path.resolve().parent
    data["storage"] = {"sqlite": str(tmp_path / "gateway.db")}
    data["admin"] = {**(data.get("admin") or {}), "api_key": ADMIN_KEY, "allow_private_backends": True}
    data.update(sections)
    return config_mod.parse(data, base_dir=base_dir)


def _folder(request: pytest.FixtureRequest, base_dir: str | Path | None) -> Path:
    return Path(base_dir) if base_dir is not None else request.path.parent


@pytest.fixture
def gateway_config(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., config_mod.GatewayConfig]:
    """``gateway_config(config_file=None, base_dir=None, **sections)``: the config ``start_gateway`` uses."""

    def make(
        config_file: str | Path | None = None, base_dir: str | Path | None = None, **sections: Any
    ) -> config_mod.GatewayConfig:
        return make_config(tmp_path, _folder(request, base_dir), sections, config_file)

    return make


@pytest_asyncio.fixture
async def start_backend(aiohttp_server: AiohttpServer) -> AsyncIterator[StartBackend]:
    """``await start_backend(mode=..., models=[...], ...)``: a FakeBackend listening on a free port."""

    async def start(**fields: Any) -> FakeBackend:
        backend = FakeBackend(**fields)
        server = await aiohttp_server(backend.app())
        backend.url = str(server.make_url("")).rstrip("/")
        return backend

    yield start


@pytest_asyncio.fixture
async def start_gateway(
    aiohttp_server: AiohttpServer, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[StartGateway]:
    """``await start_gateway(*fake_backends, config_file=None, base_dir=None, **sections)``.

    The fake backends become the gateway's static backends, named by their ``name`` or
    ``b0``, ``b1``, ...; they replace any the config file lists. Without fake backends,
    ``backends=[...]`` (or the config file's) are used.
    """

    async def start(
        *backends: FakeBackend,
        config_file: str | Path | None = None,
        base_dir: str | Path | None = None,
        **sections: Any,
    ) -> RunningGateway:
        if backends or config_file is None:
            static = [{"name": b.name or f"b{i}", "url": b.url, "models": b.models} for i, b in enumerate(backends)]
            sections.setdefault("backends", static)
        config = make_config(tmp_path, _folder(request, base_dir), sections, config_file)
        app: web.Application = create_app(config)
        return RunningGateway(await aiohttp_server(app))

    yield start


def closed_port_url() -> str:
    """A URL on which nothing listens: connections are refused at once (a dead backend)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds (a health probe ran, a log line came), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)

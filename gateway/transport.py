"""How the relay reaches a backend: one small interface, so the relay has no special cases.

A backend's ``transport`` is None for the usual HTTP pool (``HTTP``, over ``gateway.pool``),
or a connection its agent dialed in on (``gateway.agent_link.AgentLink``). Either opens a
request and returns an ``Upstream`` once the answer's headers are in: the part of an aiohttp
``ClientResponse`` the relay reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway

AGENT_HOST = ".agent.invalid"
"""The host of a dialed-in backend's placeholder URL (``.invalid`` never resolves): nothing dials it."""


def dialed_in(url: str) -> bool:
    """Whether ``url`` is the placeholder of a backend reached only through its agent's connection."""
    return url.endswith(AGENT_HOST)


class Upstream(Protocol):
    """A backend's answer as the relay reads it (an aiohttp ``ClientResponse`` is one)."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_type(self) -> str: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> aiohttp.StreamReader: ...
    def release(self) -> Any: ...
    def close(self) -> None: ...


class Transport(Protocol):
    """Sends one request to one backend; raises an ``aiohttp.ClientError`` when the backend cannot be reached."""

    async def open(
        self,
        gateway: Gateway,
        call: Call,
        backend: Backend,
        headers: CIMultiDict[str],
        body: bytes,
        timeout: aiohttp.ClientTimeout | None,
    ) -> Upstream: ...


class HTTPTransport:
    """The gateway's keep-alive pool: ``POST {url}{api_path}/{endpoint}``, redirects never followed."""

    async def open(
        self,
        gateway: Gateway,
        call: Call,
        backend: Backend,
        headers: CIMultiDict[str],
        body: bytes,
        timeout: aiohttp.ClientTimeout | None,
    ) -> Upstream:
        return await gateway.pool.post(backend.endpoint_url(call.endpoint), headers, body, timeout)


HTTP = HTTPTransport()

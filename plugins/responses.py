"""responses: the Responses API's conversations stay on the backend that holds them (on by default).

A response's id is remembered with the backend that made it (read from the JSON answer, or from
a stream's first event, ``response.created``) for ``remember_seconds``. A request carrying
``previous_response_id`` is routed to that backend only, and ``GET`` / ``DELETE
/v1/responses/{id}`` (and ``.../input_items``) are relayed to it. An id whose backend is gone is a
404 naming why; an id this gateway never saw (or forgot) goes where routing sends it, and that
backend answers for itself.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway import hookimpl
from gateway.errors import GatewayError
from gateway.handler import authenticate
from gateway.state import GATEWAY
from gateway.upstream import looks_like_json
from gateway.validate import positive

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway

HOLDER = "responses.holder"
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*"([^"\\]{1,200})"')


@dataclass(frozen=True)
class Options:
    remember_seconds: float = field(
        default=24 * 3600.0,
        metadata={"doc": "how long a response id is remembered with its backend", "check": positive},
    )
    max_remembered: int = field(
        default=100_000, metadata={"doc": "most ids remembered; the oldest are forgotten first", "check": positive}
    )


def answer_id(body: bytes) -> str | None:
    """The ``id`` of a Response object: read from its start, where servers put it, else by parsing the whole."""
    found = _LEADING_ID.match(body, 0, 512)
    if found:
        return found.group(1).decode()
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get("id") if isinstance(data, dict) and isinstance(data.get("id"), str) else None


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.held: dict[str, tuple[str, str, float]] = {}  # response id -> (backend id, its name, forget at)
        self.gateway: Gateway | None = None

    @hookimpl
    def startup(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def remember(self, response_id: str, backend: Backend) -> None:
        if len(self.held) >= self.options.max_remembered:
            now = time.monotonic()
            self.held = {k: v for k, v in self.held.items() if v[2] > now}
            while len(self.held) >= self.options.max_remembered:
                del self.held[next(iter(self.held))]
        self.held[response_id] = (backend.id, backend.name, time.monotonic() + self.options.remember_seconds)

    def holder(self, gateway: Gateway, response_id: str) -> Backend | None:
        """The backend holding ``response_id``; None if not remembered; a 404 naming why if it is gone."""
        held = self.held.get(response_id)
        if held is None or held[2] < time.monotonic():
            return None
        backend = gateway.registry.backends.get(held[0])
        if backend is None:
            raise GatewayError(
                404,
                f"response '{response_id}' is held by backend {held[1]}, which is no longer registered; "
                "start a new conversation (without previous_response_id)",
                code="response_backend_gone",
                param="previous_response_id",
            )
        return backend

    @hookimpl
    def before_request(self, call: Call) -> None:
        if call.endpoint != "responses":
            return
        previous = call.json.get("previous_response_id")
        if isinstance(previous, str):
            backend = self.holder(call.gateway, previous)
            if backend is not None:
                call.state[HOLDER] = backend.id
        if call.stream:
            call.on_chunk(self._first_event_reader(call))

    def _first_event_reader(self, call: Call) -> Any:
        seen = [False]

        def read(chunk: bytes) -> None:
            if seen[0] or call.backend is None:
                return
            seen[0] = True
            for line in chunk.split(b"\n"):
                if line.startswith(b"data:"):
                    try:
                        response = json.loads(line[5:]).get("response") or {}
                    except ValueError:
                        return
                    if isinstance(response.get("id"), str):
                        self.remember(response["id"], call.backend)
                    return

        return read

    @hookimpl
    def filter_candidates(self, call: Call, candidates: list[Backend]) -> list[Backend] | None:
        holder = call.state.get(HOLDER) if call.endpoint == "responses" else None
        return None if holder is None else [b for b in candidates if b.id == holder]

    @hookimpl
    def request_complete(self, call: Call) -> None:
        if call.endpoint != "responses" or call.stream or call.status != 200 or call.backend is None:
            return
        body = getattr(call.response, "body", None)
        response_id = answer_id(body) if isinstance(body, bytes) else None
        if response_id:
            self.remember(response_id, call.backend)

    @hookimpl
    def register_routes(self, gateway: Gateway) -> list[web.RouteDef]:
        return [
            web.get("/v1/responses/{id}", self.relay_by_id),
            web.delete("/v1/responses/{id}", self.relay_by_id),
            web.get("/v1/responses/{id}/input_items", self.relay_by_id),
        ]

    async def relay_by_id(self, request: web.Request) -> web.Response:
        """GET or DELETE a stored response on the backend that holds it."""
        gateway = request.app[GATEWAY]
        response_id = request.match_info["id"]
        try:
            await authenticate(gateway, request)
            backend = self.holder(gateway, response_id)
            if backend is None:
                raise GatewayError(
                    404,
                    f"response '{response_id[:80]}' is not known to this gateway (ids are remembered for "
                    f"{self.options.remember_seconds:g}s, plugins.responses.remember_seconds); ask for one it made",
                    code="response_not_found",
                )
            return await self._relay(gateway, request, backend)
        except GatewayError as exc:
            return exc.to_response()

    async def _relay(self, gateway: Gateway, request: web.Request, backend: Backend) -> web.Response:
        headers = {"Accept-Encoding": "identity", **backend.auth_headers()}
        limit = gateway.config.routing.max_response_bytes
        timeout = aiohttp.ClientTimeout(total=gateway.config.routing.ttft_timeout)
        url = f"{backend.url}{request.rel_url.path}"
        try:
            async with gateway.http.request(
                request.method, url, params=request.rel_url.query, headers=headers, allow_redirects=False,
                timeout=timeout,
            ) as upstream:  # fmt: skip
                body = await upstream.content.read(limit + 1)
                status = upstream.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(
                502, f"backend {backend.name} could not be reached ({type(exc).__name__})", code="backend_error"
            ) from None
        if len(body) > limit or not looks_like_json(body) or 300 <= status < 400:
            reason = f"backend {backend.name} gave no valid answer (HTTP {status})"
            raise GatewayError(502, reason, code="backend_error")
        if request.method == "DELETE" and status == 200:
            self.held.pop(request.match_info["id"], None)
        headers_out = {"Content-Type": "application/json", "X-Multiverse-Backend": backend.name}
        return web.Response(status=status, body=body, headers=headers_out)

"""One client request as it moves through the gateway; what hooks receive."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.registry import Backend
    from gateway.relay import Failure


class Call:
    """The request, what routing decided, and what came of it.

    ``body`` is forwarded to the backend byte for byte unless a plugin calls
    ``replace_json``; only then is the JSON re-encoded, for this call only.
    """

    __slots__ = (
        "attempts",
        "backend",
        "body",
        "bytes_out",
        "chunks",
        "client_disconnected",
        "endpoint",
        "error",
        "failures",
        "first_byte_at",
        "json",
        "model",
        "request",
        "request_id",
        "requested_model",
        "response_headers",
        "route",
        "started",
        "state",
        "status",
        "stream",
    )

    def __init__(self, request: web.Request, request_id: str, endpoint: str, body: bytes, data: dict[str, Any]) -> None:
        self.request = request
        self.request_id = request_id
        self.endpoint = endpoint
        self.body = body
        self.json = data
        self.model: str = data["model"]
        self.requested_model = self.model
        self.stream: bool = data.get("stream") is True
        self.backend: Backend | None = None
        self.failures: list[Failure] = []
        self.attempts = 0
        self.status = 0
        self.error: str | None = None
        self.client_disconnected = False
        self.started = time.perf_counter()
        self.first_byte_at: float | None = None
        self.bytes_out = 0
        self.chunks = 0
        self.response_headers: dict[str, str] = {}
        self.route = ""  # the strategy that ordered the candidates
        self.state: dict[str, Any] = {}

    def replace_json(self, data: dict[str, Any]) -> None:
        """Change what is sent to the backend (e.g. resolve a model alias)."""
        self.json = data
        self.model = data["model"]
        self.stream = data.get("stream") is True
        self.body = json.dumps(data, separators=(",", ":")).encode()

    @property
    def latency(self) -> float:
        """Seconds since the gateway received the request."""
        return time.perf_counter() - self.started

    @property
    def time_to_first_byte(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at - self.started

"""One client request as it moves through the gateway; what hooks receive."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError

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
        "dry_run",
        "endpoint",
        "error",
        "explain",
        "failures",
        "fallbacks",
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
        "tags",
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
        self.fallbacks: list[str] | None = None  # models to try after this one; None: routing.fallbacks
        self.tags: dict[str, Any] = {}  # plugins' facts about the call, e.g. task_type: logged and explained
        self.explain: dict[str, Any] = {}  # plugins' reasoning, shown only by /v1/route/explain
        self.dry_run = False  # True for /v1/route/explain: decide, but change nothing and call no backend
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


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-ID if it is sensible, else a new one."""
    given = request.headers.get("X-Request-ID")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return os.urandom(12).hex()


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON, with every field the gateway reads type-checked (400 naming the field)."""
    if not body:
        raise GatewayError(400, "the request body is empty; send a JSON object with at least 'model'")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(data, dict):
        raise GatewayError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    model = data.get("model")
    if model is None:
        raise GatewayError(400, "'model' is required; GET /v1/models lists the models served here", param="model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "'model' must be a non-empty string naming a model", param="model")
    if "stream" in data and not isinstance(data["stream"], bool):
        raise GatewayError(400, "'stream' must be true or false", param="stream")
    messages = data.get("messages")
    if messages is not None and not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
        raise GatewayError(400, "'messages' must be a list of message objects", param="messages")
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str | list):
        raise GatewayError(400, "'prompt' must be a string or a list", param="prompt")
    return data

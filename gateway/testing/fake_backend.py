"""A fake OpenAI backend: a real aiohttp server whose behaviour a test sets, and changes, at will.

Start one with the ``start_backend`` fixture; it listens on a free port of 127.0.0.1 and
serves ``GET /v1/models``, ``GET /health``, ``GET /metrics`` and ``POST /v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings``. An answer echoes the prompt's words (streamed
one word per chunk when the request says ``"stream": true``), so a test can tell answers apart.

``mode`` decides what the next requests get; set it when starting the backend, or change it
in the middle of a test (``backend.mode = "hang"``):

``"ok"``         answer normally (the default).
``"error"``      answer ``error_status`` (500 unless set) with ``error_payload`` (an OpenAI
                 error envelope unless set) and ``error_headers``.
``"hang"``       never answer (probes hang too): the gateway's timeouts must act.
``"die_after"``  stream ``die_after`` chunks (2 unless set), then drop the connection.
``"garbage"``    answer 200 with an HTML page labelled JSON, as a broken tunnel does.
``"truncated"``  answer 200 with JSON cut off in the middle.

Slowness, in any mode that answers: ``first_delay`` (seconds before the first streamed
chunk: a slow first token), ``delay`` (seconds between streamed chunks), ``latency`` (seconds
before a non-streamed answer). ``chunks=N`` streams N words ``w0 w1 ...`` instead of the prompt.

What the backend saw: ``seen`` (every completion request: path, headers, raw body),
``probes`` (the headers of every ``GET /v1/models`` or ``/health``) and ``cancelled`` (how
many requests the gateway gave up on while they were being answered).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from gateway.call import prompt_text
from gateway.demo import chunk_body, completion_body, embedding_body, error_body

Mode = Literal["ok", "error", "hang", "die_after", "garbage", "truncated"]
MODES: tuple[str, ...] = ("ok", "error", "hang", "die_after", "garbage", "truncated")


@dataclass
class Seen:
    """One request a fake backend received."""

    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The request body as the gateway forwarded it, parsed."""
        return json.loads(self.body)


@dataclass
class FakeBackend:
    """A fake OpenAI server; see the module's docstring for its modes."""

    models: list[str] = field(default_factory=lambda: ["echo"])
    mode: Mode = "ok"
    name: str = ""  # its name in the gateway when given to start_gateway (b0, b1, ... if empty)
    error_status: int = 500
    error_payload: dict[str, Any] | None = None
    error_headers: dict[str, str] | None = None
    chunks: int | None = None  # stream this many chunks instead of the prompt's words
    delay: float = 0.0  # seconds between streamed chunks
    first_delay: float = 0.0  # seconds before the first chunk
    die_after: int = 2
    latency: float = 0.0  # seconds before a non-streamed answer
    models_status: int = 200  # status of GET /v1/models and /health: 503 fails the health probes
    seen: list[Seen] = field(default_factory=list)
    probes: list[dict[str, str]] = field(default_factory=list)  # headers of each GET /v1/models or /health
    listed_models: list[str] | None = None  # what GET /v1/models lists, if not ``models``
    metrics_text: str = ""  # what GET /metrics answers (Prometheus text), e.g. vLLM's queue
    cancelled: int = 0
    stream_usage: bool = True  # honour stream_options.include_usage (llama.cpp's server does not: False)
    url: str = ""  # set once it listens: http://127.0.0.1:PORT (no /v1)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"FakeBackend mode '{self.mode}' is unknown; the modes are {', '.join(MODES)}")

    def app(self) -> web.Application:
        """The aiohttp application to serve; ``start_backend`` does it for you."""
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        for path in ("chat/completions", "completions", "embeddings"):
            app.router.add_post(f"/v1/{path}", self._handle)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        self.probes.append(dict(request.headers))
        if self.mode == "hang":
            await asyncio.sleep(3600)
        listed = self.models if self.listed_models is None else self.listed_models
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in listed]
        return web.json_response({"object": "list", "data": data}, status=self.models_status)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text, content_type="text/plain")

    async def _health(self, request: web.Request) -> web.Response:
        self.probes.append(dict(request.headers))
        return web.json_response({"status": "ok"}, status=self.models_status)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(Seen(request.path, dict(request.headers), raw))
        try:
            return await self._answer(request, raw)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _answer(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "garbage":
            return web.Response(body=b"<html>502 Bad Gateway from the tunnel</html>", content_type="application/json")
        if self.mode == "truncated":
            return web.Response(
                body=b'{"id": "chatcmpl-1", "object": "chat.completion", "choi', content_type="application/json"
            )
        if self.mode == "error":
            payload = self.error_payload or {
                "error": {"message": f"fake failure {self.error_status}", "type": "server_error"}
            }
            return web.json_response(payload, status=self.error_status, headers=self.error_headers)
        body = json.loads(raw)
        if body.get("model") not in self.models:
            return web.json_response(error_body(f"fake serves {self.models}"), status=404)
        kind = "chat" if request.path.endswith("chat/completions") else "text"
        if request.path.endswith("embeddings"):
            raw_input = body.get("input", "")
            inputs = [raw_input] if isinstance(raw_input, str) else list(map(str, raw_input))
            return web.json_response(embedding_body(body["model"], inputs, body.get("encoding_format", "float")))
        prompt = prompt_text(body)
        words = [f"w{i}" for i in range(self.chunks)] if self.chunks is not None else prompt.split()
        if not body.get("stream"):
            await asyncio.sleep(self.latency)
            return web.json_response(completion_body(kind, body["model"], " ".join(words), prompt))
        return await self._stream(request, body, kind, words)

    async def _stream(
        self, request: web.Request, body: dict[str, Any], kind: str, words: list[str]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await asyncio.sleep(self.first_delay)
        chunk_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        start = len(_continued_prefix(body).split())  # a continuation picks up where the text stopped
        for i, word in enumerate(words[start:], start):
            if self.mode == "die_after" and i == self.die_after:
                if request.transport is not None:
                    request.transport.abort()
                return response
            if i > start:
                await asyncio.sleep(self.delay)
            piece = word if i == 0 else " " + word
            await response.write(
                b"data: " + json.dumps(chunk_body(kind, body["model"], piece, chunk_id)).encode() + b"\n\n"
            )
        await response.write(
            b"data: " + json.dumps(chunk_body(kind, body["model"], "", chunk_id, "stop")).encode() + b"\n\n"
        )
        if self.stream_usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = completion_body(kind, body["model"], " ".join(words), prompt_text(body))["usage"]
            last = {**chunk_body(kind, body["model"], "", chunk_id), "choices": [], "usage": usage}
            await response.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _continued_prefix(body: dict[str, Any]) -> str:
    """The assistant text to continue from, as vLLM's continue_final_message does."""
    messages = body.get("messages") or []
    if body.get("continue_final_message") and messages and messages[-1].get("role") == "assistant":
        return str(messages[-1].get("content") or "")
    return ""

"""One client request as it moves through the gateway; what hooks receive."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.registry import Backend
    from gateway.state import Gateway

MAX_MODEL_NAME = 256
MAX_ID_LENGTH = 128

OUTCOMES = ("ok", "connect_error", "timeout", "http_error", "bad_answer", "stalled", "client_gone", "key_refused")
"""What came of one attempt: answered, could not connect, no (first) byte in time, an error status or
redirect, an answer that is not what was asked for (not JSON, not an event stream, too large), silence
or a break mid-answer, the client hung up while it ran, or the backend refused the gateway's own key
(401/403: the gateway's configuration, see gateway.refused)."""


@dataclass(slots=True, eq=False)
class Attempt:
    """One try of one backend for a call. Times are ``time.perf_counter()`` seconds."""

    backend: Backend
    model: str
    started: float
    first_byte: float | None = None
    ended: float | None = None
    status: int | None = None
    outcome: str = "ok"
    reason: str | None = None
    retry_after: float | None = None
    mid_stream: bool = False

    @property
    def failed(self) -> bool:
        """The backend's fault: not ``ok``, and not the client hanging up."""
        return self.outcome not in ("ok", "client_gone")

    @property
    def time_to_first_byte(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started

    def public(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "model": self.model,
            "status": self.status,
            "outcome": self.outcome,
            "reason": self.reason,
            "ttfb_ms": None if self.first_byte is None else round((self.first_byte - self.started) * 1000, 2),
            "ms": None if self.ended is None else round((self.ended - self.started) * 1000, 2),
        }


Listener = Callable[[bytes], None]
ChunkFilter = Callable[[bytes], bytes]


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
        "ended",
        "endpoint",
        "error",
        "explain",
        "fallbacks",
        "filters",
        "first_byte_at",
        "gateway",
        "identity",
        "json",
        "listeners",
        "model",
        "request",
        "request_id",
        "requested_model",
        "response",
        "response_headers",
        "route",
        "started",
        "state",
        "status",
        "stream",
        "tags",
        "upstream_id",
        "usage",
    )

    def __init__(
        self,
        gateway: Gateway,
        request: web.Request,
        request_id: str,
        endpoint: str,
        body: bytes,
        data: dict[str, Any],
    ) -> None:
        self.gateway = gateway
        self.request = request
        self.request_id = request_id
        self.upstream_id = request_id if _is_uuid(request_id) else new_id()
        self.endpoint = endpoint
        self.body = body
        self.json = data
        self.model: str = data.get("model") or ""
        self.requested_model = self.model
        self.stream: bool = data.get("stream") is True
        self.identity: Any = None  # what ``authenticate`` answered: who is calling
        self.backend: Backend | None = None  # who answered (or was last tried)
        self.attempts: list[Attempt] = []
        self.fallbacks: list[str] | None = None  # models to try after this one; None: routing.fallbacks
        self.tags: dict[str, Any] = {}  # plugins' facts about the call, e.g. task_type: logged and explained
        self.explain: dict[str, Any] = {}  # plugins' reasoning, shown only by /v1/route/explain
        self.dry_run = False  # True for /v1/route/explain: decide, but change nothing and call no backend
        self.status = 0  # the HTTP status the client got; 499 if it hung up first
        self.error: str | None = None  # why the call failed, also when a stream broke after a 200
        self.client_disconnected = False
        self.started = time.perf_counter()
        self.ended: float | None = None  # when the client had its answer (or hung up): set once, by the core
        self.first_byte_at: float | None = None
        self.bytes_out = 0
        self.chunks = 0
        self.usage: dict[str, Any] | None = None  # the answer's OpenAI ``usage``, when it reported one
        self.listeners: list[Listener] | None = None
        self.filters: list[ChunkFilter] | None = None
        self.response: web.StreamResponse | None = None  # the client's response once it is prepared
        self.response_headers: dict[str, str] = {}  # extra headers for the client's answer
        self.route = ""  # the strategy that ordered the candidates
        self.state: dict[str, Any] = {}

    def replace_json(self, data: dict[str, Any]) -> None:
        """Change what is sent to the backend (e.g. resolve a model alias)."""
        self.json = data
        self.model = data["model"]
        self.stream = data.get("stream") is True
        self.body = json.dumps(data, separators=(",", ":")).encode()

    @property
    def prompt(self) -> str:
        """The last user message of a chat, or a completion's prompt (``prompt_text``)."""
        return prompt_text(self.json)

    def on_chunk(self, listener: Listener) -> None:
        """Call ``listener(chunk)`` with every chunk of this call's answer, as the client gets it.

        Costs nothing for calls without listeners. A listener that raises is detached and logged.
        """
        if self.listeners is None:
            self.listeners = []
        self.listeners.append(listener)

    def filter_chunks(self, chunk_filter: ChunkFilter) -> None:
        """Pass every chunk of this call's streamed answer through ``chunk_filter(chunk) -> bytes`` before it is sent.

        A filter receives whole SSE events (one or more per chunk) and returns what to send instead;
        ``b""`` drops the chunk. ``call.usage`` is read before filtering, listeners see the filtered
        chunks. Costs nothing for calls without filters. A filter that raises is detached and logged.
        """
        if self.filters is None:
            self.filters = []
        self.filters.append(chunk_filter)

    @property
    def failures(self) -> list[Attempt]:
        """The attempts that failed through the backend's fault."""
        return [a for a in self.attempts if a.failed]

    @property
    def latency(self) -> float:
        """Seconds from the request's arrival until the client had its answer (until now, before that): every
        observer of a finished call, the request line included, reads the same figure."""
        return (self.ended or time.perf_counter()) - self.started

    @property
    def time_to_first_byte(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at - self.started


_PEER_CLOSED = web.RequestKey("multiverse.peer_closed", asyncio.Event)


def peer_closed(request: web.BaseRequest) -> asyncio.Event:
    """Set when the client closed its side of the connection (EOF) while its request is being answered.

    A client that only half-closes still gets its answer (``multiverse serve`` keeps the write side
    open), so work that can tell nothing to the client in the meantime, such as waiting in a queue,
    may give up when this is set.
    """
    event = request.get(_PEER_CLOSED)
    if event is None:
        event = request[_PEER_CLOSED] = asyncio.Event()
        if getattr(request.protocol, "peer_eof", False):  # it came with the request itself
            event.set()
    return event


def prompt_text(body: dict[str, Any]) -> str:
    """The prompt of a request: the last user message of a chat (its text parts), or a completion's prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):  # multi-part content: its text parts
                    return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
                return str(content or "")
        return ""
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt)) if isinstance(prompt, list) else ""


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def ms(seconds: float, places: int = 2) -> float:
    """A duration in milliseconds to ``places`` decimals, by arithmetic: ``round(x, places)`` formats and
    parses a decimal string (~2,700 instructions a call), and logs and tables take this for every request.
    The quotient of two integers is the same float, the tie rule aside."""
    scale: int = 10**places
    return int(seconds * 1000 * scale + 0.5) / scale


def new_id() -> str:
    """A time-ordered (version 7, RFC 9562) UUID as text, which every backend accepts: the time in
    milliseconds, then 74 random bits. Ids that grow with time go to the end of the index the request
    log finds them by (random ones cost a page write each: about 4x a row's cost); 4x as fast as
    ``str(uuid.uuid4())``."""
    h = f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"  # 48 bits of time, 80 random
    return f"{h[:8]}-{h[8:12]}-7{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _is_uuid(value: str) -> bool:
    """A UUID in its canonical text (what every backend parses): a quarter of ``uuid.UUID(value)``'s cost,
    which every request paid for the gateway's own ids, and stricter (hyphens where they belong)."""
    return _UUID.fullmatch(value) is not None


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-ID if it is sensible (kept for the client and the logs), else a new UUID."""
    given = request.headers.get("X-Request-ID")
    if given and len(given) <= MAX_ID_LENGTH and given.isprintable() and given.isascii():
        return given
    return new_id()


def shown(value: str, limit: int = 80) -> str:
    """A client-supplied string, cut short for an error message or a log line."""
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON, with every field the gateway reads type-checked (400 naming the field)."""
    if not body:
        raise GatewayError(400, "the request body is empty; send a JSON object with at least 'model'")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"the request body is not valid JSON ({shown(str(exc))}); send a JSON object") from None
    except RecursionError:
        raise GatewayError(400, "the request body is JSON nested too deeply; flatten it") from None
    if not isinstance(data, dict):
        raise GatewayError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    model = data.get("model")
    if model is None:
        raise GatewayError(400, "'model' is required; GET /v1/models lists the models served here", param="model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "'model' must be a non-empty string naming a model", param="model")
    if not model.isprintable():  # control characters, or a lone surrogate (JSON's "\ud800") no database can store
        raise GatewayError(
            400, "'model' must be printable text: no control characters or unpaired \\u escapes", param="model"
        )
    if len(model) > MAX_MODEL_NAME:
        raise GatewayError(
            400, f"'model' is {len(model)} characters; a model name has at most {MAX_MODEL_NAME}", param="model"
        )
    if "stream" in data and not isinstance(data["stream"], bool):
        raise GatewayError(400, "'stream' must be true or false", param="stream")
    messages = data.get("messages")
    if messages is not None and not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
        raise GatewayError(400, "'messages' must be a list of message objects", param="messages")
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str | list):
        raise GatewayError(400, "'prompt' must be a string or a list", param="prompt")
    return data

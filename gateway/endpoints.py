"""The API endpoints relayed, which backends serve which, and what routing reads from a multipart upload."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.backend import Backend

OPENAI = (
    "chat/completions", "completions", "embeddings", "responses",
    "audio/transcriptions", "audio/translations", "audio/speech",
    "images/generations", "rerank", "score", "moderations",
)  # fmt: skip
ANTHROPIC = ("messages", "messages/count_tokens")
ENDPOINTS = OPENAI + ANTHROPIC
"""Every ``POST /v1/<endpoint>`` relayed to a backend."""
MULTIPART = frozenset({"audio/transcriptions", "audio/translations"})
"""Endpoints whose body is a multipart form (an audio file): limited by server.max_upload_bytes."""
PASSED_THROUGH = frozenset({"audio/speech", "audio/transcriptions", "audio/translations"})
"""Endpoints whose answer may be anything (audio, text, subtitles): streamed through as it comes, unchecked."""
MODEL_AT = "multipart_model_at"
"""``call.state`` key of a multipart call: (the body as sent, start and end of the model's value in it)."""
_NOT_BY_DEFAULT = frozenset(ANTHROPIC)
"""Served only by backends that declare them: most OpenAI-compatible servers do not speak Anthropic's API."""


def serves(backend: Backend, endpoint: str) -> bool:
    """Whether ``backend`` serves ``endpoint``: as its ``endpoints`` declare, else every OpenAI one."""
    declared = backend.endpoints
    return endpoint not in _NOT_BY_DEFAULT if declared is None else endpoint in declared


def endpoints_problem(value: list[str] | None) -> str | None:
    """The config and registration check of an ``endpoints`` list."""
    if value is None:
        return None
    unknown = [e for e in value if e not in ENDPOINTS]
    if unknown or not value:
        return f"unknown endpoint {unknown[0]!r}; choose from {', '.join(ENDPOINTS)}" if unknown else "list one or more"
    return None


def not_served(model: str, endpoint: str) -> GatewayError:
    return GatewayError(
        404,
        f"no backend of model '{model}' serves /v1/{endpoint}; choose a model whose backends do, or declare "
        f"'{endpoint}' in the backend's endpoints",
        code="endpoint_not_served",
        param="model",
    )


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'name="([^"]*)"', re.IGNORECASE)
_READ = (b"model", b"stream")
MAX_PART_HEADER = 4096


def form_fields(body: bytes, content_type: str) -> tuple[dict[str, Any], tuple[int, int]]:
    """``model`` (and ``stream``) of a multipart form, and where the model's value sits in ``body``.

    A scan of the raw body for part headers (``bytes.find``, no copy of the file): the body is
    forwarded as sent, and an alias is put in by replacing the span.
    """
    found = _BOUNDARY.search(content_type) if content_type.lower().startswith("multipart/form-data") else None
    if found is None:
        raise GatewayError(400, "send this endpoint's fields as multipart/form-data (with a boundary), as the SDK does")
    delimiter = b"\r\n--" + found.group(1).encode("latin-1")
    spans: dict[bytes, tuple[int, int]] = {}
    at = body.find(delimiter[2:])
    while at >= 0 and len(spans) < len(_READ):
        head = at + len(delimiter) - 2
        head_end = body.find(b"\r\n\r\n", head, head + MAX_PART_HEADER)
        if body.startswith(b"--", head) or head_end < 0:
            break
        name = _NAME.search(body, head, head_end)
        end = body.find(delimiter, head_end + 4)
        if end < 0:
            break
        if name and name.group(1) in _READ and b"filename=" not in body[head:head_end]:
            spans.setdefault(name.group(1), (head_end + 4, end))
        at = end + 2
    if b"model" not in spans:
        raise GatewayError(400, "'model' is required: send it as a form field", param="model")
    start, end = spans[b"model"]
    data: dict[str, Any] = {"model": body[start:end].decode("utf-8", "replace")}
    if b"stream" in spans:
        data["stream"] = body[slice(*spans[b"stream"])].strip().lower() == b"true"
    return data, spans[b"model"]

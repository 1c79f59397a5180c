"""structlog set-up: one JSON line per event off a terminal, secrets always redacted."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from aiohttp.http_exceptions import HttpProcessingError

REDACTED = "[redacted]"
# "token" but not "*_tokens": token counts (prompt_tokens, max_tokens) are numbers worth logging.
_SECRET_KEY = re.compile(r"(api[_-]?key|authorization|token(?!s)|secret|password)", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[^\s\"',]+", re.IGNORECASE)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@functools.cache
def _is_secret_key(key: str) -> bool:
    return _SECRET_KEY.search(key) is not None


def redact(value: Any, key: str = "") -> Any:
    """Return ``value`` with secrets replaced: by key name, and bearer tokens inside text."""
    if key and _is_secret_key(key):
        return REDACTED if value else value
    if isinstance(value, str):
        return _BEARER.sub(r"\1" + REDACTED, value) if "earer" in value else value
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if value.__class__ in _PLAIN and not _is_secret_key(key):
            continue  # numbers, booleans and None hide no secret
        event[key] = redact(value, key)
    return event


_PLAIN = frozenset({int, float, bool, type(None)})


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once per process."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=json.dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through the standard library: same format, same redaction.
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_quiet_client_errors)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _redact_processor, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(_LEVELS[level])


def _quiet_client_errors(record: logging.LogRecord) -> bool:
    """A malformed request from a client is worth one line, not a traceback."""
    if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
        record.msg = f"{record.getMessage()}: {record.exc_info[1].message}"
        record.args, record.exc_info, record.exc_text = None, None, None
    return True


def get_logger(name: str = "gateway") -> Any:
    return structlog.get_logger(name)

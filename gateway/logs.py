"""structlog set-up: one JSON line per event off a terminal, secrets always redacted."""

from __future__ import annotations

import datetime
import functools
import json
import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import orjson
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


def dumps(value: Any, default: Any = None, **options: Any) -> str:
    """A log line's JSON, in ASCII whatever stdout's encoding: orjson's, compact (0.4 against 7 µs for a
    request's line with json's ``dumps``) when it is ASCII; else json's, which escapes the rest (a model
    named in another script), and writes what orjson refuses (a lone surrogate, an integer past 64 bits)."""
    try:
        text = orjson.dumps(value, default=default).decode()
    except orjson.JSONEncodeError:
        pass
    else:
        if text.isascii():  # O(1): Python knows it of every str
            return text
    return json.dumps(value, default=default, separators=(",", ":"), **options)


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


class _Direct:
    """Where ``request_line`` writes when the JSON chain below is the one in force."""

    processors: list[Any] | None = None
    file: Any = None
    threshold = logging.INFO


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once per process."""
    global _direct
    as_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    processors = [
        structlog.contextvars.merge_contextvars,
        *shared,
        structlog.processors.format_exc_info,
        _redact_processor,
        renderer,
    ]
    _direct = _Direct()
    if as_json:
        _direct.processors, _direct.file, _direct.threshold = processors, sys.stdout, _LEVELS[level]
    structlog.configure(
        processors=processors,
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


_direct = _Direct()
_UTC = datetime.UTC


def request_line(logger: Any, level: int, event: str, fields: dict[str, Any]) -> None:
    """One log line, rendered as the JSON chain of ``configure`` would, without running the chain.

    On the hot path (once per request) the chain costs more than the rendering. The fields,
    their order, the redaction and the timestamp are the chain's; under any other set-up (the
    console format, ``structlog.testing.capture_logs``) the line goes through structlog.
    """
    direct = _direct
    if direct.processors is None or structlog.get_config()["processors"] is not direct.processors:
        (logger.warning if level >= logging.WARNING else logger.info)(event, **fields)
        return
    if level < direct.threshold:
        return
    fields = structlog.contextvars.merge_contextvars(None, "", fields)  # type: ignore[assignment]
    fields["event"] = event
    fields["level"] = "warning" if level >= logging.WARNING else "info"
    fields["timestamp"] = _timestamp()
    for key, value in fields.items():  # _redact_processor, with strings checked inline
        if value.__class__ is str and not _is_secret_key(key):
            if "earer" in value:
                fields[key] = redact(value)
        elif value.__class__ not in _PLAIN or _is_secret_key(key):
            fields[key] = redact(value, key)
    direct.file.write(dumps(fields) + "\n")
    direct.file.flush()


_second: list[Any] = [-1, ""]


def _timestamp() -> str:
    """TimeStamper(fmt="iso", utc=True)'s text, its date and time formatted once a second."""
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[:] = [whole, datetime.datetime.fromtimestamp(whole, _UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{int((now - whole) * 1e6):06d}Z"


def _quiet_client_errors(record: logging.LogRecord) -> bool:
    """A malformed request from a client is worth one line, not a traceback."""
    if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
        record.msg = f"{record.getMessage()}: {record.exc_info[1].message}"
        record.args, record.exc_info, record.exc_text = None, None, None
    return True


def get_logger(name: str = "gateway") -> Any:
    return structlog.get_logger(name)

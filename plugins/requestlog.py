"""requestlog: every request in a searchable table; who asked for what, who answered, and why it failed.

One row per request (refused, answered, failed over, broken mid-stream or abandoned): time,
request id, key name (never the key), client address, model asked and served, backend, strategy,
each attempt with its outcome, status, latency, time to first token, tokens, cache status, error.
``request_complete`` only queues what it saw, as plain values; a background job writes the queue every
``flush_interval`` seconds and at shutdown, and prunes rows past ``retention_days`` or ``max_rows``.
Prompts and answers are kept only with ``store_content: true``, each cut at ``max_content_chars``.

``GET /admin/requests`` searches the log (admin and readonly keys), ``GET /admin/requests/{id}``
shows one request; ``multiverse requests`` is the command line for both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway import hookimpl
from gateway.admin_auth import allow
from gateway.call import Attempt, Call
from gateway.errors import GatewayError
from gateway.identity import Identity
from gateway.state import Gateway
from gateway.validate import positive
from plugins import _bulk_insert as bulk_insert
from plugins import _json_text, _tokens
from plugins import _requestlog_query as q


@dataclass(frozen=True)
class Options:
    flush_interval: float = field(
        default=0.5, metadata={"doc": "seconds between batched writes (a crash loses at most this)", "check": positive}
    )
    retention_days: float | None = field(
        default=7.0, metadata={"doc": "rows older than this many days are deleted (null: keep)", "check": positive}
    )
    max_rows: int | None = field(
        default=100_000, metadata={"doc": "only the newest this many rows are kept (null: no limit)", "check": positive}
    )
    prune_interval: float = field(
        default=60.0, metadata={"doc": "seconds between prunes by retention_days and max_rows", "check": positive}
    )
    store_content: bool = field(
        default=False, metadata={"doc": "also keep each request's messages and the answer's text"}
    )
    max_content_chars: int = field(
        default=8000,
        metadata={"doc": "with store_content: most characters kept of a prompt or answer", "check": positive},
    )


WITHOUT_CONTENT = (*q.FILTERED, "detail")
"""The INSERT's columns without ``store_content``: no prompt and completion to bind as NULLs."""
WIDTH = len(WITHOUT_CONTENT)
"""Values ``request_complete`` queues a request (the FILTERED columns, then the detail), one more with
``store_content`` (what ``_content`` makes the prompt and completion from)."""
_json = _json_text.encoder()
CONTENT_QUEUED = 4096
"""Rows with content kept queued for a database that refuses them: each holds up to twice max_content_chars."""
RAW_PER_CHAR = 64
"""Raw stream bytes kept per character of text: an SSE event carries a token or two in ~200 bytes."""


class Rendered(tuple):  # type: ignore[type-arg]
    """A queued entry's prompt and answer as text, once made (a row queued again after a refused flush)."""


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.pending: list[Any] = []  # flat: WIDTH values a request (one more with store_content)
        self.gateway: Gateway | None = None
        if not self.options.store_content:  # nothing to capture: registered, the hook would cost every request
            self.before_request = None  # type: ignore[method-assign,assignment]

    @hookimpl
    async def startup(self, gateway: Gateway) -> None:
        self.gateway = gateway
        await gateway.registry.migrate("requestlog", q.SCHEMA)
        gateway.every(self.options.flush_interval, self.flush, name="requestlog")
        gateway.every(self.options.prune_interval, self.prune, name="requestlog-prune")

    @hookimpl
    async def shutdown(self) -> None:
        try:
            await self.flush()
        finally:
            width = WIDTH + 1 if self.options.store_content else WIDTH
            await bulk_insert.last_commit(self.gateway, "requestlog", len(self.pending) // width)

    @hookimpl
    def before_request(self, call: Call) -> None:
        if not call.stream or call.dry_run:
            return
        chunks: list[bytes] = []
        budget = [self.options.max_content_chars * RAW_PER_CHAR]

        def keep(chunk: bytes) -> None:
            if budget[0] > 0:
                chunks.append(chunk)
                budget[0] -= len(chunk)

        call.state["requestlog.chunks"] = chunks
        call.on_chunk(keep)

    @hookimpl
    def request_complete(self, call: Call) -> None:
        """Queue what happened as plain values (no reference to the call's objects), flat, in the order of
        the INSERT's columns (``WITHOUT_CONTENT``), the detail already as its JSON text; any content and the
        SQL write happen in ``flush``."""
        if call.dry_run:
            return
        latency = call.latency
        backend = call.backend
        usage = call.usage
        prompt = completion = None
        if usage:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            prompt = prompt if prompt.__class__ is int else None
            completion = completion if completion.__class__ is int else None
        cache = call.tags.get("cache")
        remote = call.request.remote
        started = call.started
        first_byte = call.first_byte_at
        attempts = call.attempts
        told: Any
        if len(attempts) == 1 and _usual(attempts[0], call):  # the row tells the rest: its three times
            told = times(attempts[0], started)
        else:
            told = [story(attempt, started) for attempt in attempts]
        values = (
            remote, call.endpoint, call.stream, call.route or None, int(latency * 1e6),
            None if first_byte is None else int((first_byte - started) * 1e6), prompt, completion,
            None if cache is None else str(cache), told,
        )  # fmt: skip  # q.DETAIL, in order
        try:
            detail = orjson.dumps(values).decode()  # half the time of one % format with its texts quoted
        except orjson.JSONEncodeError:  # what orjson refuses (a lone surrogate, 2**64 tokens): json's encoder writes it
            detail = _json(values)
        row = (
            time.time() - latency, call.request_id, getattr(call.identity, "name", None), call.requested_model,
            call.model if backend else None, backend.name if backend else None, call.status, call.error, detail,
        )  # fmt: skip
        if self.options.store_content:  # made into the prompt and completion columns in flush
            row += ((call.json, call.state.get("requestlog.chunks"), getattr(call.response, "body", None)),)
        self.pending += row  # one extend: the queue stays aligned whatever happens

    async def flush(self) -> None:
        """Write the queued requests in one transaction."""
        if not self.pending or self.gateway is None:
            return
        values, self.pending = self.pending, []
        db = self.gateway.registry.db
        width, most = (WIDTH + 1, CONTENT_QUEUED) if self.options.store_content else (WIDTH, bulk_insert.MOST_QUEUED)
        if self.options.store_content:
            rows = [self._row(values[at : at + width]) for at in range(0, len(values), width)]
            values = [v for row in rows for v in (*row[:WIDTH], Rendered(row[WIDTH:]))]  # queued again: no bodies
            columns, inserted = q.COLUMN_NAMES, [v for row in rows for v in row]
        else:
            columns, inserted = WITHOUT_CONTENT, values
        try:
            left_out = await bulk_insert.insert_and_commit(db, "requestlog", columns, inserted)
        except bulk_insert.NotInserted as failed:  # kept for the next flush (the failure is logged by the caller)
            self.pending, dropped = bulk_insert.requeue(values, failed, self.pending, width, most)
            if dropped:
                self.gateway.log.error("requestlog_rows_dropped", rows=dropped, queued=len(self.pending) // width)
            raise
        if left_out:
            self.gateway.log.error("requestlog_rows_dropped", rows=left_out, reason="values the database cannot store")

    def _row(self, entry: list[Any]) -> tuple[Any, ...]:
        """A queued entry with content as the row to insert: its prompt and answer made text, cut short (once: a
        row queued again after a refused flush keeps the text, not the request's body)."""
        extra = entry[WIDTH]
        if isinstance(extra, Rendered):
            return (*entry[:WIDTH], *extra)
        return (*entry[:WIDTH], *self._content(*extra))

    def _content(self, body: dict[str, Any], chunks: list[bytes] | None, answer: Any) -> tuple[str, str | None]:
        """The request's messages (or prompt, or input) as JSON, and the answer's text; each cut short."""
        limit = self.options.max_content_chars
        asked = next((body[k] for k in ("messages", "prompt", "input") if k in body), None)
        prompt = json.dumps(asked)
        if len(prompt) > limit:
            prompt = json.dumps(prompt[:limit] + f"... (cut at {limit} characters)")
        text = _tokens.streamed_text(chunks) if chunks is not None else None
        if text is None and isinstance(answer, bytes):
            text = _tokens.answer_text(answer)
        if text is not None and len(text) > limit:
            text = text[:limit] + f"... (cut at {limit} characters)"
        return prompt, text

    async def prune(self, now: float | None = None) -> int:
        """Delete rows older than ``retention_days`` and beyond the newest ``max_rows``; how many went."""
        if self.gateway is None:
            return 0
        await self.flush()
        db = self.gateway.registry.db
        deleted = 0
        if self.options.retention_days is not None:
            cutoff = (time.time() if now is None else now) - self.options.retention_days * 86400
            deleted += (await db.execute(q.PRUNE_OLD, (cutoff,))).rowcount
        if self.options.max_rows is not None:
            deleted += (await db.execute(q.PRUNE_ROWS, (self.options.max_rows,))).rowcount
        await db.commit()
        return deleted

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/admin/requests", allow("readonly")(self.search)),
            web.get("/admin/requests/{request_id:.+}", allow("readonly")(self.show)),
        ]

    async def search(self, request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        """``GET /admin/requests?status=5xx&model=&backend=&key=&since=1h&request_id=&limit=50&cursor=``."""
        try:
            sql, params, limit = q.query(request.query)
        except ValueError as exc:
            raise GatewayError(400, str(exc), code="invalid_query") from None
        await self.flush()
        async with gateway.registry.db.execute(sql, params) as cursor:
            rows = [q.to_dict(tuple(row)) for row in await cursor.fetchall()]
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = str(rows[-1]["id"]) if more else None
        return web.json_response({"requests": rows, "count": len(rows), "next_cursor": next_cursor})

    async def show(self, request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        """``GET /admin/requests/{request_id}``: the newest request with that id, every attempt included."""
        request_id = request.match_info["request_id"]
        await self.flush()
        async with gateway.registry.db.execute(
            f"{q.SELECT} WHERE request_id = ? ORDER BY id DESC LIMIT 1", (request_id,)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            kept = f"{self.options.retention_days:g} days" if self.options.retention_days else "all days"
            raise GatewayError(
                404,
                f"no request with id '{request_id[:128]}' in the request log (it keeps {kept}, "
                f"at most {self.options.max_rows or 'unlimited'} rows); GET /admin/requests?since=1h lists recent ones",
                code="request_not_found",
            )
        return web.json_response(q.to_dict(tuple(row)))


Story = tuple[Any, ...]


def _usual(attempt: Attempt, call: Call) -> bool:
    """The one attempt of a call it answered, as most are: the row's backend, model and status, nothing else to tell
    but its times (all three known)."""
    return (
        attempt.outcome == "ok" and attempt.backend is call.backend and attempt.model == call.model
        and attempt.status == call.status and attempt.reason is None and attempt.retry_after is None
        and not attempt.mid_stream and attempt.first_byte is not None and attempt.ended is not None
    )  # fmt: skip


def times(attempt: Attempt, started: float) -> tuple[int, int | None, int | None]:
    """An attempt's start (counted from the request's), first byte and end, in whole microseconds: a float's
    JSON costs ~2,500 instructions, an int's a tenth of that."""
    first, ended, at = attempt.first_byte, attempt.ended, attempt.started
    return (
        int((at - started) * 1e6), None if first is None else int((first - at) * 1e6),
        None if ended is None else int((ended - at) * 1e6),
    )  # fmt: skip


def story(attempt: Attempt, started: float) -> Story:
    """One attempt as the table keeps it, compactly (``_requestlog_query.ATTEMPT`` names the fields)."""
    return (
        attempt.backend.name, attempt.model, attempt.status, attempt.outcome, attempt.reason,
        *times(attempt, started), attempt.mid_stream, attempt.retry_after,
    )  # fmt: skip

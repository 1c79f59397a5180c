"""Usage and budgets: who used which model, how many tokens, at what cost; a key over its budget gets 429.

Every answered call becomes one row (key, model, backend, tokens, latency, status, cache hit,
cost). Rows are queued and written by a background job every ``flush_interval`` seconds and at
shutdown, never on the request's path: a crash loses at most that interval, and rows the database
refuses wait for the next flush (``_bulk_insert.requeue``). Spend per key is kept
in memory (loaded from the table at start-up) and checked in ``before_request``. With a shared
store (``state: {redis: ...}``) every gateway adds its spend to one counter per key at each flush
and reads the others' back, so several gateways enforce one budget between them.

Streams: unless the client asked, the backend is asked for ``stream_options.include_usage`` and
its extra usage-only event is removed before the client sees it. A backend that reports no usage
at all is counted from the text (see ``plugins/_tokens.py``) and the row is marked ``estimated``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from gateway import hookimpl
from gateway.call import Call
from gateway.errors import GatewayError
from gateway.pump import Recorder
from gateway.state import GATEWAY, Gateway
from gateway.store import MemoryStore
from gateway.validate import positive
from plugins import _bulk_insert, _tokens, _usage_report

_USAGE_MARK = b'"prompt_tokens"'
_SPENT = "usage:spent:"  # the shared store's counter of a key's spend
_KEPT_FOR_COUNTING = 4 << 20  # bytes of a stream kept to count its tokens if the backend reports none


@dataclass(frozen=True)
class Options:
    flush_interval: float = field(
        default=0.5, metadata={"doc": "seconds between batched writes (a crash loses at most this)", "check": positive}
    )
    stream_usage: bool = field(
        default=True, metadata={"doc": "ask streaming backends for usage; the extra event never reaches the client"}
    )
    tokenizer: Literal["auto", "heuristic"] = field(
        default="auto", metadata={"doc": "counting answers without usage: auto (cl100k if installed), heuristic"}
    )


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.spent: dict[str, float] = {}
        self.pending: list[Any] = []  # flat: the values of _usage_report.COLUMNS, request after request
        self.unshared: dict[str, float] = {}  # spend not yet added to the shared store, by key id
        self.count_tokens: _tokens.Counter = _tokens.heuristic
        self.tokenizer = "heuristic"
        self.gateway: Gateway | None = None

    @hookimpl
    async def startup(self, gateway: Gateway) -> None:
        self.gateway = gateway
        await gateway.registry.migrate("usage", _usage_report.SCHEMA)
        async with gateway.registry.db.execute(_usage_report.SPENT) as cursor:
            self.spent = {str(row[0]): float(row[1]) async for row in cursor}
        if self.options.tokenizer == "auto":
            self.count_tokens, self.tokenizer = await asyncio.to_thread(_tokens.load_counter, "auto")
        if self._shared(gateway):
            for key_id, spent in self.spent.items():  # a new store starts from what the database knows
                known = await gateway.store.add(_SPENT + key_id, 0.0)
                if known < spent:
                    await gateway.store.add(_SPENT + key_id, spent - known)
        gateway.every(self.options.flush_interval, self.flush, name="usage")

    @hookimpl
    async def shutdown(self) -> None:
        try:
            await self.flush()
        finally:
            await _bulk_insert.last_commit(self.gateway, "usage", len(self.pending) // len(_usage_report.COLUMNS))

    @staticmethod
    def _shared(gateway: Gateway) -> bool:
        return not isinstance(gateway.store, MemoryStore)

    async def flush(self) -> None:
        """Write the queued rows in one transaction; with a shared store, exchange spend with other gateways."""
        if self.gateway is None:
            return
        if self._shared(self.gateway):
            await self._share_spend(self.gateway)
        if not self.pending:
            return
        values, self.pending = self.pending, []
        db = self.gateway.registry.db
        try:
            left_out = await _bulk_insert.insert_and_commit(db, "usage_requests", _usage_report.COLUMNS, values)
        except _bulk_insert.NotInserted as failed:  # kept for the next flush (the failure is logged by the caller)
            width = len(_usage_report.COLUMNS)
            self.pending, dropped = _bulk_insert.requeue(values, failed, self.pending, width)
            if dropped:
                self.gateway.log.error("usage_rows_dropped", rows=dropped, queued=len(self.pending) // width)
            raise
        if left_out:
            self.gateway.log.error("usage_rows_dropped", rows=left_out, reason="values the database cannot store")

    async def _share_spend(self, gateway: Gateway) -> None:
        unshared, self.unshared = self.unshared, {}
        for key_id in {*self.spent, *unshared}:
            self.spent[key_id] = await gateway.store.add(_SPENT + key_id, unshared.get(key_id, 0.0))

    @hookimpl(trylast=True)
    def before_request(self, call: Call) -> None:
        identity = call.identity
        budget = getattr(identity, "budget", None)
        if budget is not None:
            spent = self.spent.get(identity.key_id, 0.0)
            if spent >= budget:
                raise GatewayError(
                    429,
                    f"key '{identity.name}' has spent {spent:.4f} of its budget of {budget:.4f}; "
                    "ask an admin to raise the key's budget",
                    code="budget_exceeded",
                )
        if not call.stream or call.dry_run:
            return
        recorder = call.state["usage.recorder"] = Recorder(_KEPT_FOR_COUNTING)
        call.on_chunk(recorder)
        options = call.json.get("stream_options")
        if self.options.stream_usage and not (isinstance(options, dict) and options.get("include_usage")):
            asked = options if isinstance(options, dict) else {}
            call.replace_json({**call.json, "stream_options": {**asked, "include_usage": True}})
            call.filter_chunks(strip_usage_events)

    @hookimpl
    def request_complete(self, call: Call) -> None:
        if call.dry_run or not call.model:
            return  # refused before its body was read: no model to account it to
        hit = call.tags.get("cache") == "hit"
        usage = call.usage
        prompt, completion = (usage.get("prompt_tokens"), usage.get("completion_tokens")) if usage else (None, None)
        if isinstance(prompt, int) and (isinstance(completion, int) or call.endpoint == "embeddings"):
            completion, estimated = completion or 0, False  # the backend's usage: the usual case, inline
        else:
            prompt, completion, estimated = self._counted(call)
        seconds = 0.0
        if not hit:  # time backends spent answering: every attempt that got as far as a first byte
            for a in call.attempts:  # a loop, not sum() over a generator: this runs for every request
                if a.first_byte is not None and a.ended is not None:
                    seconds += a.ended - a.started
        profile = call.gateway.config.models.get(call.model)
        cost = 0.0
        if profile is not None and not hit:
            cost = (
                prompt * profile.cost_per_1k_prompt_tokens / 1000
                + completion * profile.cost_per_1k_completion_tokens / 1000
                + seconds * profile.cost_per_second
            )
        identity = call.identity
        key_id = getattr(identity, "key_id", None)
        if key_id is not None and cost:
            self.spent[key_id] = self.spent.get(key_id, 0.0) + cost
            self.unshared[key_id] = self.unshared.get(key_id, 0.0) + cost
        backend = call.backend.name if call.backend is not None else None
        self.pending += (  # booleans as 1 or 0: sqlite3 binds an exact int directly, a bool through its adapters
            time.time(), call.request_id, key_id, getattr(identity, "name", None), call.model, backend,
            call.endpoint, 1 if call.stream else 0, call.status, prompt, completion, 1 if estimated else 0,
            call.latency * 1000, seconds, 1 if hit else 0, cost,
        )  # fmt: skip

    def _counted(self, call: Call) -> tuple[int, int, bool]:
        """(prompt, completion, estimated) for a call whose backend reported no usage: counted from the text."""
        if call.status != 200:
            return 0, 0, False
        if call.stream:
            recorder: Recorder | None = call.state.get("usage.recorder")
            text = _tokens.streamed_text(recorder.chunks if recorder else ())
            if recorder and recorder.overflow:  # the rest of a very long answer: about 4 bytes a token
                return (
                    _tokens.prompt_tokens(call.json, self.count_tokens),
                    self.count_tokens(text) + (recorder.overflow // 4),
                    True,
                )
        else:
            body = getattr(call.response, "body", None)
            text = _tokens.answer_text(body) if isinstance(body, bytes) else ""
        return _tokens.prompt_tokens(call.json, self.count_tokens), self.count_tokens(text), True

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        return [web.get("/admin/usage", self.report)]

    @hookimpl
    def register_commands(self, subparsers: Any) -> None:
        _usage_report.add_command(subparsers)

    async def report(self, request: web.Request) -> web.Response:
        """``GET /admin/usage?key=&model=&since=&group_by=``: totals per key, model, backend or day."""
        gateway = request.app[GATEWAY]
        try:
            await _require_admin(request, gateway)
            group_by = request.query.get("group_by", "key")
            since = _usage_report.parse_since(request.query.get("since"))
            sql, params = _usage_report.query(request.query.get("key"), request.query.get("model"), since, group_by)
        except GatewayError as exc:
            return exc.to_response()
        except ValueError as exc:
            return GatewayError(400, str(exc), code="invalid_query").to_response()
        await self.flush()
        async with gateway.registry.db.execute(sql, params) as cursor:
            rows = [tuple(row) for row in await cursor.fetchall()]
        data = _usage_report.to_dicts(group_by, rows)
        return web.json_response({"group_by": group_by, "since": since, "tokenizer": self.tokenizer, "data": data})


async def _require_admin(request: web.Request, gateway: Gateway) -> None:
    """The admin key (``X-API-Key`` or Bearer), or an identity whose role is admin; else 401/403."""
    given = request.headers.get("X-API-Key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
    if given and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), gateway.admin_key.encode()):
        return
    from gateway.handler import authenticate

    identity = await authenticate(gateway, request)
    if getattr(identity, "is_admin", False):
        return
    if identity is not None:
        raise GatewayError(403, "usage reports need an admin key or a key with role admin", code="not_admin")
    raise GatewayError(
        401, "send the admin key as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'", code="invalid_admin_key"
    )


def strip_usage_events(chunk: bytes) -> bytes:
    """Remove the usage-only event (``"choices": []``) the gateway asked for and the client did not."""
    if _USAGE_MARK not in chunk:
        return chunk
    return b"\n\n".join(event for event in chunk.split(b"\n\n") if not _usage_only(event))


def _usage_only(event: bytes) -> bool:
    if _USAGE_MARK not in event or not event.startswith(b"data:"):
        return False
    try:
        data = json.loads(event[5:])
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("choices") == [] and isinstance(data.get("usage"), dict)

"""The requestlog plugin: what a request leaves in the log, searching it, paging, retention, content."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

import aiosqlite
import pytest
from aiohttp.test_utils import make_mocked_request

from gateway import migrations
from gateway.call import Attempt, Call
from plugins import _bulk_insert
from plugins import _requestlog_query as q
from plugins.requestlog import WIDTH, Rendered
from tests.conftest import ADMIN, RunningGateway, StartBackend, StartGateway
from tests.test_usage import refuse_inserts

ROLES = "tests.role_identity"


async def entry(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    reply = await gateway.get(f"/admin/requests/{request_id}", headers=ADMIN)
    assert reply.status == 200, reply.body
    found: dict[str, Any] = reply.json()
    return found


async def search(gateway: RunningGateway, headers: dict[str, str] = ADMIN, **filters: str) -> tuple[int, Any]:
    query = "&".join(f"{name}={value}" for name, value in filters.items())
    reply = await gateway.get(f"/admin/requests?{query}", headers=headers)
    return reply.status, reply.json()


def plugin(gateway: RunningGateway) -> Any:
    return gateway.state.plugins.pm.get_plugin("requestlog")


async def test_a_failover_is_told_attempt_by_attempt(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    broken, good = await start_backend(mode="error", error_status=503), await start_backend()
    gateway = await start_gateway(broken, good, plugins={"requestlog": {}})
    reply = await gateway.post(
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": "user", "content": "secret homework"}]},
        headers={"X-Request-ID": "story-1"},
    )
    assert reply.status == 200 and reply.backend == "b1"
    logged = await entry(gateway, "story-1")
    assert (logged["status"], logged["backend"], logged["model"], logged["served_model"]) == (200, "b1", "echo", "echo")
    assert [(a["backend"], a["outcome"], a["status"]) for a in logged["attempts"]] == [
        ("b0", "http_error", 503),
        ("b1", "ok", 200),
    ]
    assert "503" in logged["attempts"][0]["reason"]
    assert logged["attempts"][1]["start_ms"] >= logged["attempts"][0]["start_ms"]
    assert logged["client"] == "127.0.0.1" and logged["strategy"] == "round_robin" and logged["ok"] is True
    assert logged["latency_ms"] > 0 and logged["prompt_tokens"] == 2
    assert "prompt" not in logged and "completion" not in logged  # store_content is off by default
    database = sqlite3.connect(gateway.state.config.database_path)
    try:
        everything = " ".join(map(str, database.execute("SELECT * FROM requestlog").fetchall()))
    finally:
        database.close()
    assert "homework" not in everything


async def test_a_stream_that_breaks_after_its_200_is_a_failure(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(mode="die_after", chunks=6), plugins={"requestlog": {}})
    reply = await gateway.chat("one two three", stream=True)
    assert reply.status == 200
    status, found = await search(gateway, status="error")
    assert status == 200
    [logged] = found["requests"]
    assert logged["status"] == 200 and logged["ok"] is False and "mid-stream" in logged["error"]
    [attempt] = logged["attempts"]
    assert (attempt["backend"], attempt["outcome"], attempt["mid_stream"]) == ("b0", "stalled", True)
    assert logged["ttft_ms"] is not None and logged["stream"] is True
    assert (await search(gateway, status="5xx"))[1]["count"] == 0
    assert (await search(gateway, status="ok"))[1]["count"] == 0


async def test_filters_and_paging(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    fine, failing = await start_backend(name="fine"), await start_backend(name="failing", models=["other"])
    failing.mode = "error"
    gateway = await start_gateway(fine, failing, plugins={ROLES: {}, "requestlog": {}})
    for i in range(5):
        await gateway.post(
            "/v1/chat/completions",
            {"model": "echo", "messages": [{"role": "user", "content": f"hi {i}"}]},
            headers={"Authorization": f"Bearer user:{'ada' if i % 2 else 'alan'}"},
        )
    for _ in range(2):
        assert (await gateway.chat(model="other")).status >= 500
    assert (await search(gateway))[1]["count"] == 7
    assert {r["status"] for r in (await search(gateway, status="5xx"))[1]["requests"]} == {500}
    assert (await search(gateway, status="2xx"))[1]["count"] == 5
    assert (await search(gateway, model="other"))[1]["count"] == 2
    assert (await search(gateway, backend="fine"))[1]["count"] == 5
    assert [r["key"] for r in (await search(gateway, key="ada"))[1]["requests"]] == ["ada", "ada"]
    assert (await search(gateway, since="1h"))[1]["count"] == 7
    assert (await search(gateway, since="2999-01-01"))[1]["count"] == 0
    pages, cursor = [], ""
    while True:
        status, page = await search(gateway, limit="3", cursor=cursor)
        assert status == 200
        pages.append([r["id"] for r in page["requests"]])
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert [len(p) for p in pages] == [3, 3, 1]
    ids = [i for p in pages for i in p]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 7  # newest first, none twice
    one = (await search(gateway, limit="1"))[1]["requests"][0]
    assert (await search(gateway, request_id=one["request_id"]))[1]["requests"] == [one]


async def test_who_may_search_and_what_a_bad_filter_says(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(), plugins={ROLES: {}, "requestlog": {}})
    await gateway.chat()
    assert (await search(gateway, headers={"Authorization": "Bearer readonly:ta"}))[1]["count"] == 1
    status, body = await search(gateway, headers={"Authorization": "Bearer user:student"})
    assert status == 403 and "readonly" in body["error"]["message"]
    status, body = await search(gateway, headers={})
    assert status == 401
    status, body = await search(gateway, status="6xx")
    assert status == 400 and "5xx" in body["error"]["message"] and body["error"]["code"] == "invalid_query"
    status, body = await search(gateway, since="yesterday")
    assert status == 400 and "1h" in body["error"]["message"]
    status, body = await search(gateway, colour="red")
    assert status == 400 and "request_id" in body["error"]["message"]
    missing = await gateway.get("/admin/requests/nope", headers=ADMIN)
    assert missing.status == 404 and "GET /admin/requests" in missing.json()["error"]["message"]


async def test_retention_by_rows_and_by_days(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(await start_backend(), plugins={"requestlog": {"max_rows": 3, "retention_days": 1}})
    for i in range(5):
        await gateway.chat(f"number {i}")
    newest = [r["id"] for r in (await search(gateway))[1]["requests"]][:3]
    assert await plugin(gateway).prune() == 2
    assert [r["id"] for r in (await search(gateway))[1]["requests"]] == newest
    assert await plugin(gateway).prune(now=time.time() + 2 * 86400) == 3
    assert (await search(gateway))[1]["count"] == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_store_content_keeps_prompt_and_answer(
    start_backend: StartBackend, start_gateway: StartGateway, stream: bool
) -> None:
    gateway = await start_gateway(
        await start_backend(), plugins={"requestlog": {"store_content": True, "max_content_chars": 80}}
    )
    await gateway.post(
        "/v1/chat/completions",
        {"model": "echo", "stream": stream, "messages": [{"role": "user", "content": "tell me about owls"}]},
        headers={"X-Request-ID": "owls"},
    )
    long = "word " * 30
    await gateway.post(
        "/v1/chat/completions",
        {"model": "echo", "stream": stream, "messages": [{"role": "user", "content": long}]},
        headers={"X-Request-ID": "long"},
    )
    logged = await entry(gateway, "owls")
    assert logged["prompt"] == [{"role": "user", "content": "tell me about owls"}]
    assert "owls" in logged["completion"]
    cut = await entry(gateway, "long")
    assert cut["completion"].endswith("(cut at 80 characters)") and len(cut["completion"]) < 120
    assert "cut at 80 characters" in cut["prompt"]


async def test_a_large_batch_is_written_whole_and_in_order(tmp_path: Any) -> None:
    """A flush writes its rows in chunks of a power of two rows, the last one padded; none lost, none reordered."""
    columns = ("n", "text", "value")
    rows = [(n, f"row {n}" if n % 3 else None, n / 7) for n in range(1000)]  # 4 chunks of 256, 24 rows of padding
    async with aiosqlite.connect(tmp_path / "bulk.db") as db:
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, text TEXT, value REAL)")
        await _bulk_insert.insert(db, "t", columns, rows)
        await _bulk_insert.insert(db, "t", columns, rows[:1])
        await _bulk_insert.insert_flat(db, "t", columns, [*rows[1], *rows[2]])  # as a queue extends it
        with pytest.raises(ValueError, match="do not make rows of 3 columns"):
            await _bulk_insert.insert_flat(db, "t", columns, [1, "one"])
        await db.commit()
        async with db.execute("SELECT n, text, value FROM t ORDER BY id") as cursor:
            written = [tuple(row) for row in await cursor.fetchall()]
    assert written == [*rows, rows[0], rows[1], rows[2]]


async def test_attempt_times_are_stored_in_microseconds_and_shown_in_milliseconds(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    """Times are kept as whole microseconds (an int's JSON is a tenth of a float's cost); the API shows
    milliseconds, for new rows and for rows an older version wrote in milliseconds."""
    gateway = await start_gateway(await start_backend(latency=0.12), plugins={"requestlog": {}})
    reply = await gateway.post(
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": "user", "content": "slow"}]},
        headers={"X-Request-ID": "timed-1"},
    )
    assert reply.status == 200
    logged = await entry(gateway, "timed-1")
    [attempt] = logged["attempts"]
    told = ("backend", "model", "status", "outcome", "reason", "mid_stream", "retry_after")
    assert {k: attempt[k] for k in told} == {
        "backend": "b0", "model": "echo", "status": 200, "outcome": "ok", "reason": None, "mid_stream": False,
        "retry_after": None,
    }  # fmt: skip
    assert 120 <= attempt["ms"] <= logged["latency_ms"] < 1000
    assert 0 <= attempt["start_ms"] < logged["latency_ms"] - attempt["ms"] + 1
    assert attempt["ttfb_ms"] is not None and 120 <= attempt["ttfb_ms"] <= attempt["ms"]
    database = sqlite3.connect(gateway.state.config.database_path)
    try:
        [(stored,)] = database.execute("SELECT detail FROM requestlog WHERE request_id = 'timed-1'").fetchall()
        latency, attempts = json.loads(stored)[4], json.loads(stored)[9]
        assert isinstance(latency, int) and latency >= 120_000
        assert len(attempts) == 3 and isinstance(attempts[2], int) and attempts[2] >= 120_000  # the usual: times only
        older = (
            '["127.0.0.1","chat/completions",0,"round_robin",121.5,null,1,1,null,'
            '[["b0","echo",200,"ok",null,0.05,118.25,120.5,false,null]]]'
        )  # as an older version's row is migrated
        database.execute("UPDATE requestlog SET detail = ? WHERE request_id = 'timed-1'", (older,))
        database.commit()
    finally:
        database.close()
    logged = await entry(gateway, "timed-1")
    [attempt] = logged["attempts"]
    assert (attempt["start_ms"], attempt["ttfb_ms"], attempt["ms"]) == (0.05, 118.25, 120.5)
    assert (logged["latency_ms"], logged["ttft_ms"], logged["stream"]) == (121.5, None, False)


async def test_rows_written_before_the_detail_column_are_kept_and_shown_alike(tmp_path: Any) -> None:
    """Schema step 2 packs the columns no filter reads into ``detail``: a row the older layout wrote reads back
    as it did (times in milliseconds, attempts whole, content kept), and filters still find it."""
    path = tmp_path / "old.db"
    async with aiosqlite.connect(path) as db:
        await migrations.migrate(db, path, "requestlog", q.SCHEMA[:1])
        await db.execute(
            "INSERT INTO requestlog (at, request_id, key_name, client, endpoint, stream, model, served_model, backend,"
            " strategy, attempts, status, latency_ms, ttft_ms, prompt_tokens, completion_tokens, cache, error, prompt,"
            " completion) VALUES (1700000000.5, 'old-1', 'alice', '10.0.0.7', 'chat/completions', 1, 'echo', 'echo-2',"
            " 'b1', 'round_robin', ?, 502, 250.0, 12.25, 7, 3, 'miss', 'broke mid-stream', '[\"hi\"]', 'hello')",
            (
                '[["b0","echo",503,"http_error","503 from b0",0.01,null,4.5,false,2.0],'
                '["b1","echo-2",200,"stalled",null,5.0,12.25,249.5,true,null]]',
            ),
        )
        await db.execute(  # refused before routing: the NULLs; a backend's Retry-After of inf, which Python wrote
            "INSERT INTO requestlog (at, request_id, key_name, client, endpoint, stream, model, served_model, backend,"
            " strategy, attempts, status, latency_ms, ttft_ms, prompt_tokens, completion_tokens, cache, error)"
            " VALUES (1700000001.0, 'old-2', NULL, NULL, 'embeddings', 0, 'e5', NULL, NULL, NULL, ?, 429, 0.5,"
            " NULL, NULL, NULL, NULL, 'rate limited')",
            ('[["b0","e5",429,"http_error","429 from b0",0.0,1.0,1.5,false,Infinity]]',),
        )
        await db.commit()
        assert await migrations.migrate(db, path, "requestlog", q.SCHEMA) == 2
        async with db.execute(f"{q.SELECT} WHERE request_id = 'old-2'") as cursor:
            [refused] = await cursor.fetchall()
        sql, params, _ = q.query({"model": "echo-2", "status": "5xx", "key": "alice", "since": "100000d"})
        async with db.execute(sql, params) as cursor:
            [row] = await cursor.fetchall()
    shown = q.to_dict(tuple(row))
    assert {k: v for k, v in shown.items() if k != "attempts"} == {
        "id": 1, "at": 1700000000.5, "request_id": "old-1", "key": "alice", "client": "10.0.0.7",
        "endpoint": "chat/completions", "stream": True, "model": "echo", "served_model": "echo-2", "backend": "b1",
        "strategy": "round_robin", "status": 502, "ok": False, "latency_ms": 250.0, "ttft_ms": 12.25,
        "prompt_tokens": 7, "completion_tokens": 3, "cache": "miss", "error": "broke mid-stream",
        "prompt": ["hi"], "completion": "hello",
    }  # fmt: skip
    assert shown["attempts"] == [
        {"backend": "b0", "model": "echo", "status": 503, "outcome": "http_error", "reason": "503 from b0",
         "start_ms": 0.01, "ttfb_ms": None, "ms": 4.5, "mid_stream": False, "retry_after": 2.0},
        {"backend": "b1", "model": "echo-2", "status": 200, "outcome": "stalled", "reason": None,
         "start_ms": 5.0, "ttfb_ms": 12.25, "ms": 249.5, "mid_stream": True, "retry_after": None},
    ]  # fmt: skip
    shown = q.to_dict(tuple(refused))
    assert (shown["key"], shown["client"], shown["served_model"], shown["strategy"], shown["ttft_ms"]) == (None,) * 5
    assert (shown["stream"], shown["latency_ms"], shown["prompt_tokens"], shown["cache"]) == (False, 0.5, None, None)
    [attempt] = shown["attempts"]
    assert attempt["retry_after"] == 3600.0 and attempt["status"] == 429 and "prompt" not in shown
    json.loads(json.dumps(shown), parse_constant=lambda name: pytest.fail(f"{name} is no JSON"))  # strict JSON


@pytest.mark.parametrize(
    "change",
    [{}, {"reason": "slow"}, {"retry_after": 3.0}, {"model": "echo-v1"}, {"status": 201}, {"mid_stream": True},
     {"outcome": "client_gone"}, {"backend": "b1"}, {"first_byte": None}],
)  # fmt: skip
async def test_one_attempt_is_kept_whole_unless_the_row_tells_all_of_it(
    start_backend: StartBackend, start_gateway: StartGateway, change: dict[str, Any]
) -> None:
    """A call answered by its one attempt, with nothing more to tell, keeps only that attempt's times; an
    attempt that differs from its row in anything is kept whole. Either way the API shows every field."""
    gateway = await start_gateway(await start_backend(), await start_backend(), plugins={"requestlog": {}})
    state = gateway.state
    backends = {b.name: b for b in state.registry.backends.values()}
    call = Call(state, make_mocked_request("POST", "/v1/chat/completions"), "one-1", "chat/completions", b"{}",
                {"model": "echo"})  # fmt: skip
    call.backend, call.status = backends["b0"], 200
    now = time.perf_counter()
    first_byte = change.get("first_byte", now + 0.002)  # none: the stream's first byte never came
    fields: dict[str, Any] = {"backend": "b0", "model": "echo", "status": 200, "outcome": "ok", "reason": None,
                              "mid_stream": False, "retry_after": None, **change}  # fmt: skip
    fields.pop("first_byte", None)
    attempt = Attempt(backends[fields["backend"]], fields["model"], now, first_byte, now + 0.005, fields["status"])
    attempt.outcome, attempt.reason, attempt.retry_after = fields["outcome"], fields["reason"], fields["retry_after"]
    attempt.mid_stream = fields["mid_stream"]
    call.attempts.append(attempt)
    plugin(gateway).request_complete(call)
    logged = await entry(gateway, "one-1")
    [shown] = logged["attempts"]
    assert {k: shown[k] for k in fields} == fields
    assert shown["ttfb_ms"] == (None if first_byte is None else pytest.approx(2, abs=0.01))
    assert shown["ms"] == pytest.approx(5, abs=0.01)
    database = sqlite3.connect(state.config.database_path)
    try:
        [(stored,)] = database.execute("SELECT detail FROM requestlog WHERE request_id = 'one-1'").fetchall()
    finally:
        database.close()
    kept = json.loads(stored)[9]
    assert (len(kept) == 3 and isinstance(kept[0], int)) if not change else isinstance(kept[0], list)


@pytest.mark.parametrize("store_content", [False, True])
async def test_the_chunk_capture_is_registered_only_to_store_content(
    start_backend: StartBackend, start_gateway: StartGateway, store_content: bool
) -> None:
    """Without ``store_content`` the plugin has no ``before_request``: a hook nobody implements costs no call."""
    gateway = await start_gateway(await start_backend(), plugins={"requestlog": {"store_content": store_content}})
    assert ("requestlog" in [name for name, _ in gateway.state.plugins.before_request]) is store_content
    reply = await gateway.post(
        "/v1/chat/completions",
        {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "owls"}]},
        headers={"X-Request-ID": "hooked"},
    )
    assert reply.status == 200
    logged = await entry(gateway, "hooked")
    assert ("owls" in logged.get("completion", "")) is store_content


@pytest.mark.parametrize(
    "odd",
    [
        {"remote": None, "route": 'ro"und\\robin\n', "cache": 3, "stream": True, "first_byte": False, "usage": None},
        {"remote": "10.0.0.7", "route": "", "cache": "hit é", "stream": False, "first_byte": True,
         "usage": {"prompt_tokens": 7, "completion_tokens": "x"}},
        {"remote": "::1", "route": "round_robin", "cache": None, "stream": False, "first_byte": True,
         "usage": {"prompt_tokens": 7, "completion_tokens": 0}},
        {"remote": "::1", "route": "\x00\x1f\x7f\u2028/\t", "cache": "😀", "stream": True, "first_byte": True,
         "usage": {"prompt_tokens": 2**64, "completion_tokens": 1}},  # past orjson's 64 bits: json's encoder
    ],
)  # fmt: skip
async def test_the_detail_is_the_json_of_its_values(
    start_backend: StartBackend, start_gateway: StartGateway, odd: dict[str, Any]
) -> None:
    """The hook writes ``detail`` with orjson (json's encoder for what orjson refuses): the same JSON, whatever the
    text (quotes, backslashes, newlines, non-ASCII), a tag that is no text, and the missing values."""
    gateway = await start_gateway(await start_backend(), plugins={"requestlog": {}})
    state = gateway.state
    [backend] = state.registry.backends.values()
    request = make_mocked_request("POST", "/v1/chat/completions")
    if odd["remote"] is not None:
        request = request.clone(remote=odd["remote"])
    call = Call(state, request, "odd-1", "chat/completions", b"{}", {"model": "echo", "stream": odd["stream"]})
    call.backend, call.status, call.route, call.usage = backend, 200, odd["route"], odd["usage"]
    call.tags["cache"] = odd["cache"]
    now = time.perf_counter()
    call.attempts.append(Attempt(backend, "echo", now, now + 0.002, now + 0.005, 200))
    if odd["first_byte"]:
        call.first_byte_at = now + 0.002
    call.ended = now + 0.006
    plugin(gateway).request_complete(call)
    await plugin(gateway).flush()
    database = sqlite3.connect(state.config.database_path)
    try:
        [(stored,)] = database.execute("SELECT detail FROM requestlog WHERE request_id = 'odd-1'").fetchall()
    finally:
        database.close()
    values = json.loads(stored)
    usage = odd["usage"] or {}
    completion = usage.get("completion_tokens")
    expected = [
        odd["remote"], "chat/completions", odd["stream"], odd["route"] or None, values[4], values[5],
        usage.get("prompt_tokens"), completion if isinstance(completion, int) else None,
        None if odd["cache"] is None else str(odd["cache"]), values[9],
    ]  # fmt: skip
    assert values == expected
    assert stored == json.dumps(expected, separators=(",", ":"), ensure_ascii=False)
    micro = pytest.approx  # whole microseconds, truncated
    assert values[4] == micro((now + 0.006 - call.started) * 1e6, abs=1)
    assert values[5] == (micro((now + 0.002 - call.started) * 1e6, abs=1) if odd["first_byte"] else None)
    assert values[9] == [micro((now - call.started) * 1e6, abs=1), micro(2000, abs=1), micro(5000, abs=1)]
    assert all(isinstance(v, int) for v in (values[4], *values[9]))


@pytest.mark.parametrize("store_content", [False, True])
async def test_entries_the_database_refuses_are_kept_and_written_once_it_takes_them(
    start_backend: StartBackend, start_gateway: StartGateway, store_content: bool
) -> None:
    """A flush the database refuses at the second request's row (an OperationalError, as when it is locked or
    full) keeps the rows that are not in for the next one, with or without content (whose queue holds a value a
    row more than it inserts, and keeps the text, not the request's body)."""
    options = {"flush_interval": 0.05, "store_content": store_content}
    gateway = await start_gateway(await start_backend(), plugins={"requestlog": options})
    refusing = [True]

    def refuse(request_id: str) -> int:
        if refusing[0] and request_id == "r-2":
            raise RuntimeError("the disk is busy")
        return 0

    await refuse_inserts(gateway, "requestlog", "refuse(NEW.request_id)", refuse)
    for n in range(1, 4):
        body = {"model": "echo", "messages": [{"role": "user", "content": f"question {n}"}]}
        assert (await gateway.post("/v1/chat/completions", body, headers={"X-Request-ID": f"r-{n}"})).status == 200
    await asyncio.sleep(0.3)  # several flushes, each refused at r-2 (r-1, in the same chunk, is not in either)
    if store_content:
        queued = plugin(gateway).pending
        assert queued and all(isinstance(entry[-1], Rendered) for entry in _entries(queued))
    refusing[0] = False

    async def logged() -> list[str]:
        rows = await asyncio.to_thread(_sql, gateway.state.config.database_path)
        return [row[0] for row in rows]

    for _ in range(100):
        if len(await logged()) >= 3:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert await logged() == ["r-1", "r-2", "r-3"]
    if store_content:
        assert (await entry(gateway, "r-2"))["prompt"] == [{"role": "user", "content": "question 2"}]


def _entries(queued: list[Any]) -> list[list[Any]]:
    return [queued[at : at + WIDTH + 1] for at in range(0, len(queued), WIDTH + 1)]


def _sql(path: str) -> list[Any]:
    """The logged request ids, on a connection of its own, off the event loop."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT request_id FROM requestlog ORDER BY id").fetchall()
    finally:
        db.close()


async def test_an_answer_of_an_odd_shape_costs_its_row_its_content_not_the_batch_its_rows(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    """``"choices": [1]`` made the content's text raise while the batch was made into rows: the whole batch went."""
    from aiohttp import web

    from tests.test_response_path import raw_backend

    async def odd(request: web.Request) -> web.Response:
        body = await request.json()
        choices: Any = [1] if body["messages"][0]["content"] == "odd" else [{"message": {"content": "fine"}}]
        return web.json_response({"id": "c", "object": "chat.completion", "choices": choices})

    options = {"flush_interval": 60, "store_content": True}
    gateway = await start_gateway(await raw_backend(aiohttp_server, odd), plugins={"requestlog": options})
    for n, content in enumerate(("hello", "odd", "hello")):
        body = {"model": "echo", "messages": [{"role": "user", "content": content}]}
        assert (await gateway.post("/v1/chat/completions", body, headers={"X-Request-ID": f"o-{n}"})).status == 200
    await plugin(gateway).flush()
    assert [row[0] for row in await asyncio.to_thread(_sql, gateway.state.config.database_path)] == [
        "o-0", "o-1", "o-2"
    ]  # fmt: skip
    assert (await entry(gateway, "o-1"))["completion"] == ""

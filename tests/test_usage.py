"""The usage plugin: tokens per request (reported or estimated), spend, budgets, /admin/usage and the CLI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from gateway.cli import main
from tests.conftest import ADMIN, StartBackend, StartGateway, eventually

IDENTITY = "tests.bearer_identity"
PRICES = {"echo": {"cost_per_1k_prompt_tokens": 1.0, "cost_per_1k_completion_tokens": 2.0}}
MESSAGES = [{"role": "user", "content": "one two three four"}]


def client(gateway: Any, key: str = "alice") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


async def report(gateway: Any, headers: dict[str, str] = ADMIN, **query: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + "/admin/usage", params=query, headers=headers) as response,
    ):
        return response.status, await response.json()


def rows(gateway: Any) -> list[sqlite3.Row]:
    db = sqlite3.connect(gateway.state.config.database_path)
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM usage_requests ORDER BY id").fetchall()
    finally:
        db.close()


async def test_a_plain_answer_is_recorded_with_its_key_tokens_and_cost(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(), plugins={IDENTITY: {}, "usage": {}}, models=PRICES)
    answer = await client(gateway).chat.completions.create(model="echo", messages=MESSAGES)
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (4, 4)
    status, body = await report(gateway)
    assert status == 200
    [alice] = body["data"]
    assert (alice["key"], alice["key_id"], alice["requests"]) == ("alice", "k-alice", 1)
    assert (alice["prompt_tokens"], alice["completion_tokens"], alice["estimated_requests"]) == (4, 4, 0)
    assert alice["cost"] == pytest.approx(4 / 1000 * 1.0 + 4 / 1000 * 2.0)
    [row] = rows(gateway)
    assert (row["model"], row["backend"], row["status"], row["stream"], row["cache_hit"]) == ("echo", "b0", 200, 0, 0)
    assert row["latency_ms"] > 0


async def test_a_stream_gets_usage_from_the_backend_and_the_client_never_sees_the_extra_chunk(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins={IDENTITY: {}, "usage": {}}, models=PRICES)
    stream = await client(gateway).chat.completions.create(model="echo", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert json.loads(backend.seen[-1].body)["stream_options"] == {"include_usage": True}
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two three four"
    assert chunks[-1].choices[0].finish_reason == "stop"
    _, body = await report(gateway)
    [alice] = body["data"]
    assert (alice["prompt_tokens"], alice["completion_tokens"], alice["estimated_requests"]) == (4, 4, 0)

    asked = await client(gateway).chat.completions.create(
        model="echo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    last = [chunk async for chunk in asked][-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 4


async def test_a_backend_that_reports_no_usage_is_counted_with_a_tokenizer_and_marked_estimated(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(stream_usage=False), plugins={"usage": {}}, models=PRICES)
    stream = await client(gateway, "anonymous").chat.completions.create(model="echo", messages=MESSAGES, stream=True)
    assert [c async for c in stream][-1].usage is None
    status, body = await report(gateway, group_by="model")
    [echo] = body["data"]
    assert status == 200 and body["tokenizer"] in ("cl100k_base", "heuristic")
    assert echo["model"] == "echo" and echo["estimated_requests"] == 1
    # "one two three four": 4 tokens in cl100k_base and by the heuristic; the prompt adds message overhead
    assert echo["completion_tokens"] == 4 and echo["prompt_tokens"] == 4 + 4 + 3
    assert rows(gateway)[0]["estimated"] == 1 and rows(gateway)[0]["key_id"] is None


BUDGETED = {IDENTITY: {"budgets": {"alice": 0.01}}, "usage": {"flush_interval": 60}}  # a flush a minute away
PRICEY = {"echo": {"cost_per_1k_prompt_tokens": 1500.0}}  # 4 prompt tokens: 6.0 a request


async def test_writes_are_batched_and_spend_survives_a_restart_so_the_budget_still_holds(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins=BUDGETED, models=PRICEY)
    await client(gateway).chat.completions.create(model="echo", messages=MESSAGES)
    await client(gateway, "bob").chat.completions.create(model="echo", messages=MESSAGES)  # bob has no budget
    assert rows(gateway) == []  # queued, not yet written: the next flush is a minute away
    with pytest.raises(openai.RateLimitError) as refused:
        await client(gateway).chat.completions.create(model="echo", messages=MESSAGES)
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "budget_exceeded"
    assert "spent 6.0000 of its budget of 0.0100" in error["message"]
    assert len(backend.seen) == 2

    await gateway.server.close()  # a clean shutdown writes the queue
    assert [(r["key_name"], r["status"]) for r in rows(gateway)] == [("alice", 200), ("bob", 200), ("alice", 429)]
    again = await start_gateway(backend, plugins=BUDGETED, models=PRICEY)
    with pytest.raises(openai.RateLimitError):
        await client(again).chat.completions.create(model="echo", messages=MESSAGES)
    assert len(backend.seen) == 2


async def test_an_older_database_loses_the_unread_key_index_and_keeps_its_rows_and_spend(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins=BUDGETED, models=PRICEY)
    await client(gateway).chat.completions.create(model="echo", messages=MESSAGES)
    await gateway.server.close()  # writes the row
    path = gateway.state.config.database_path
    with sqlite3.connect(path) as db:  # as the version before this one left it: the index, at schema version 1
        db.execute("CREATE INDEX usage_requests_key ON usage_requests (key_id)")
        db.execute("UPDATE plugin_schemas SET version = 1 WHERE plugin = 'usage'")
    again = await start_gateway(backend, plugins=BUDGETED, models=PRICEY)
    with pytest.raises(openai.RateLimitError):  # the spend was read back: alice is over her budget
        await client(again).chat.completions.create(model="echo", messages=MESSAGES)
    with sqlite3.connect(path) as db:
        indexes = {row[1] for row in db.execute("PRAGMA index_list(usage_requests)")}
        version = db.execute("SELECT version FROM plugin_schemas WHERE plugin = 'usage'").fetchone()[0]
    assert indexes == {"usage_requests_at"} and version == 2
    assert [r["key_name"] for r in rows(again)] == ["alice"]  # the refusal is still queued; the old row stayed
    status, body = await report(again, key="alice")
    assert status == 200 and [d["requests"] for d in body["data"]] == [2]


async def test_the_flush_job_writes_within_its_interval(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(), plugins={"usage": {"flush_interval": 0.2}})
    await client(gateway).chat.completions.create(model="echo", messages=MESSAGES)
    await eventually(lambda: len(rows(gateway)) == 1, timeout=2.0)


async def test_admin_usage_groups_filters_and_needs_an_admin(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(models=["echo", "other"])
    plugins = {IDENTITY: {"admins": ["root"]}, "usage": {}}
    gateway = await start_gateway(backend, plugins=plugins, models=PRICES)
    for key, model in [("alice", "echo"), ("alice", "other"), ("bob", "echo")]:
        await client(gateway, key).chat.completions.create(model=model, messages=MESSAGES)
    _, by_model = await report(gateway, group_by="model")
    assert {d["model"]: d["requests"] for d in by_model["data"]} == {"echo": 2, "other": 1}
    _, by_key = await report(gateway, group_by="key", model="echo", since="1h")
    assert {d["key"]: d["requests"] for d in by_key["data"]} == {"alice": 1, "bob": 1}
    _, alice = await report(gateway, key="alice", group_by="model")
    assert sorted(d["model"] for d in alice["data"]) == ["echo", "other"]
    status, as_root = await report(gateway, {"Authorization": "Bearer root"}, group_by="key")
    assert status == 200 and sum(d["requests"] for d in as_root["data"]) == 3
    status, refused = await report(gateway, {"Authorization": "Bearer alice"})
    assert status == 403 and refused["error"]["code"] == "not_admin"
    status, missing = await report(gateway, {})
    assert status == 401 and "X-API-Key" in missing["error"]["message"]
    status, bad = await report(gateway, since="yesterday")
    assert status == 400 and "30m, 1h or 7d" in bad["error"]["message"]
    status, bad = await report(gateway, group_by="colour")
    assert status == 400 and "key, model, backend, day" in bad["error"]["message"]


async def test_multiverse_usage_reads_the_database(
    tmp_path: Path,
    start_backend: StartBackend,
    start_gateway: StartGateway,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gateway = await start_gateway(await start_backend(), plugins={IDENTITY: {}, "usage": {}}, models=PRICES)
    await client(gateway).chat.completions.create(model="echo", messages=MESSAGES)
    await client(gateway, "bob").chat.completions.create(model="echo", messages=MESSAGES)
    await gateway.server.close()
    config = tmp_path / "gateway.yaml"
    database = str(gateway.state.config.database_path)
    config.write_text(yaml.safe_dump({"storage": {"sqlite": database}, "plugins": {"usage": {}}}))
    monkeypatch.setenv("MULTIVERSE_CONFIG", str(config))
    capsys.readouterr()  # the gateway's log lines
    assert main(["usage", "--since", "1h", "--group-by", "key", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {d["key"]: d["prompt_tokens"] for d in printed["data"]} == {"alice": 4, "bob": 4}
    assert main(["usage", "--group-by", "model"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["model", "requests", "prompt_tokens"] and table[1].split()[:2] == ["echo", "2"]
    assert main(["usage", "--since", "soon"]) == 2
    assert "30m, 1h or 7d" in capsys.readouterr().err


async def test_rows_the_database_refuses_are_kept_and_written_once_it_takes_them(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    """A flush the database refuses (locked past its busy timeout, a full disk: here a function a trigger calls
    fails, an OperationalError like those) used to lose its rows, and with them the spend a restart reads back:
    they now wait for the next flush."""
    gateway = await start_gateway(await start_backend(), plugins={IDENTITY: {}, "usage": {"flush_interval": 0.05}})
    refusing = [True]

    def refuse() -> int:
        if refusing[0]:
            raise RuntimeError("the disk is busy")
        return 0

    await refuse_inserts(gateway, "usage_requests", "refuse()", refuse)
    for _ in range(3):
        await client(gateway).chat.completions.create(model="echo", messages=MESSAGES)
    await asyncio.sleep(0.3)  # several flushes, each refused
    assert await asyncio.to_thread(rows, gateway) == []
    refusing[0] = False
    await eventually(lambda: len(rows(gateway)) == 3)
    await asyncio.sleep(0.2)
    assert len({row["request_id"] for row in rows(gateway)}) == 3 == len(rows(gateway))  # each once


async def refuse_inserts(gateway: Any, table: str, when: str, function: Any) -> None:
    """A trigger on the gateway's own connection (TEMP: nobody else's) that calls ``function`` before each insert
    into ``table``: when it raises, SQLite refuses the insert with an OperationalError."""
    db = gateway.state.registry.db
    await db.create_function(function.__name__, function.__code__.co_argcount, function)
    await db.execute(f"CREATE TEMP TRIGGER refuse BEFORE INSERT ON {table} WHEN {when} BEGIN SELECT 1; END")


async def test_a_flush_cancelled_at_the_stop_still_gets_its_rows_committed(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    """The stop cancels the flush job, maybe in the middle of a flush: the rows it took from the queue still go
    into the transaction (aiosqlite's thread runs what it was given), and with an empty queue the shutdown's
    flush had nothing to commit them with, so closing the database dropped them."""
    gateway = await start_gateway(await start_backend(), plugins={IDENTITY: {}, "usage": {"flush_interval": 60}})
    for _ in range(2):
        await client(gateway).chat.completions.create(model="echo", messages=MESSAGES)
    usage = gateway.state.plugins.pm.get_plugin("usage")
    flushing = asyncio.ensure_future(usage.flush())
    await asyncio.sleep(0)  # the flush has taken the queue and handed the insert to the database thread
    assert usage.pending == []
    flushing.cancel()
    await gateway.server.close()
    assert len(rows(gateway)) == 2

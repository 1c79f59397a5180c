"""Multi-row inserts: a row whose text SQLite cannot take never costs the batch its other rows."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from plugins import _bulk_insert


async def test_a_lone_surrogate_is_stored_as_a_question_mark_and_the_other_rows_are_kept(tmp_path: Path) -> None:
    hostile = json.loads('"answer \\ud800 text"')  # valid JSON, and a str with no UTF-8 form
    async with aiosqlite.connect(tmp_path / "rows.db") as db:
        await db.execute("CREATE TABLE t (n INTEGER, text TEXT, missing TEXT)")
        rows = [(1, "fine", None), (2, hostile, None), (3, "également", None)]
        await _bulk_insert.insert(db, "t", ("n", "text", "missing"), rows)
        async with db.execute("SELECT n, text, missing FROM t ORDER BY n") as cursor:
            stored = [tuple(row) for row in await cursor.fetchall()]
    assert stored == [(1, "fine", None), (2, "answer ? text", None), (3, "également", None)]


async def test_a_lone_surrogate_in_a_later_chunk_keeps_every_row_once_and_in_order(tmp_path: Path) -> None:
    """The chunks before the one that cannot be bound are in already: the retry starts at that one."""
    hostile = json.loads('"bad \\udc80"')
    rows = [(n, hostile if n == 700 else f"row {n}") for n in range(1000)]  # 4 chunks of 256: 700 is in the third
    async with aiosqlite.connect(tmp_path / "rows.db") as db:
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, text TEXT)")
        await _bulk_insert.insert(db, "t", ("n", "text"), rows)
        async with db.execute("SELECT n, text FROM t ORDER BY id") as cursor:
            stored = [tuple(row) for row in await cursor.fetchall()]
    assert stored == [(n, "bad ?" if n == 700 else text) for n, text in rows]


async def test_a_batch_is_one_call_into_the_database_thread(tmp_path: Path) -> None:
    """1000 rows (four chunks, the last padded) go in through one executemany: no call a chunk."""
    rows = [(n, None if n % 2 else f"row {n}") for n in range(1000)]
    async with aiosqlite.connect(tmp_path / "rows.db") as db:
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, text TEXT)")
        calls: list[str] = []
        for name in ("execute", "executemany"):
            method = getattr(db, name)

            def counted(*args: object, _method: object = method, _name: str = name) -> object:
                calls.append(_name)
                return _method(*args)  # type: ignore[operator]

            setattr(db, name, counted)
        await _bulk_insert.insert(db, "t", ("n", "text"), rows)
        await _bulk_insert.insert(db, "t", ("n", "text"), rows[:3])  # one chunk of 4 rows, one of them padding
        assert calls == ["executemany", "executemany"]
        async with db.execute("SELECT n, text FROM t ORDER BY id") as cursor:
            stored = [tuple(row) for row in await cursor.fetchall()]
    assert stored == [*rows, *rows[:3]]


async def test_rows_of_nulls_and_nans_are_kept_and_only_the_padding_is_left_out(tmp_path: Path) -> None:
    """The padding is cut by the chunk's row count, not by what a row holds: a row of NULLs (NaN binds as NULL)
    is a row like any other."""
    rows = [(None, None), (float("nan"), "nan"), (1.5, None), (None, "last")]  # one chunk of 4, no padding
    rows += rows[:3]  # and one of 4 with a row of padding
    async with aiosqlite.connect(tmp_path / "rows.db") as db:
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, x REAL, text TEXT)")
        await _bulk_insert.insert(db, "t", ("x", "text"), rows[:4])
        await _bulk_insert.insert(db, "t", ("x", "text"), rows[4:])
        async with db.execute("SELECT x, text FROM t ORDER BY id") as cursor:
            stored = [tuple(row) for row in await cursor.fetchall()]
    kept = [(None, None), (None, "nan"), (1.5, None)]
    assert stored == [*kept, (None, "last"), *kept]


class _Odd:
    """A value sqlite3 adapts (through a registered adapter) to text with a lone surrogate."""


async def test_text_that_cannot_be_made_storable_is_left_out_and_the_rest_kept(tmp_path: Path) -> None:
    sqlite3.register_adapter(_Odd, lambda _: "odd \udc80")
    try:
        async with aiosqlite.connect(tmp_path / "rows.db") as db:
            await db.execute("CREATE TABLE t (n INTEGER, text TEXT)")
            rows = [(1, "a"), (2, _Odd()), (3, "c")]
            assert await asyncio.wait_for(_bulk_insert.insert(db, "t", ("n", "text"), rows), 5) == 1
            async with db.execute("SELECT n, text FROM t ORDER BY n") as cursor:
                assert [tuple(row) for row in await cursor.fetchall()] == [(1, "a"), (3, "c")]
    finally:
        del sqlite3.adapters[(_Odd, sqlite3.PrepareProtocol)]


async def test_a_row_the_database_cannot_take_costs_the_batch_only_that_row(tmp_path: Path) -> None:
    """A number past SQLite's integers (OverflowError) or a constraint, in the third chunk: every other row is kept,
    once and in order, and the count of those left out comes back."""
    rows = [(10**30 if n == 700 else n, f"row {n}") for n in range(1000)]
    async with aiosqlite.connect(tmp_path / "rows.db") as db:
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, text TEXT CHECK (text != 'row 900'))")
        assert await _bulk_insert.insert(db, "t", ("n", "text"), rows) == 2
        async with db.execute("SELECT n FROM t ORDER BY id") as cursor:
            assert [row[0] for row in await cursor.fetchall()] == [n for n in range(1000) if n not in (700, 900)]


def test_more_columns_than_a_statement_can_bind_is_a_clear_error() -> None:
    columns = tuple(f"c{n}" for n in range(_bulk_insert.MOST_PARAMETERS))
    with pytest.raises(ValueError, match="columns: more than the"):
        asyncio.run(_bulk_insert.insert(None, "t", columns, [tuple(range(len(columns)))]))  # type: ignore[arg-type]


def test_chunks_are_as_full_as_few_statement_shapes_allow() -> None:
    """As few chunks as MOST_ROWS allows, padded by under 16 rows each, in at most 20 sizes (each a statement)."""
    sizes = set()
    for rows in range(1, 3000):
        size = _bulk_insert._chunk_rows(rows, 256)
        chunks = -(-rows // size)
        assert chunks == -(-rows // 256) and chunks * size - rows < 16 * chunks, rows
        sizes.add(size)
    assert len(sizes) <= 20 and max(sizes) == 256


async def test_a_refused_insert_says_how_many_rows_went_in(tmp_path: Path) -> None:
    """The database refuses (an OperationalError: here a function a trigger calls fails, as a locked or full
    database would) in the third chunk: the two chunks before it are in, in the open transaction, and the writer
    learns that, so it queues again exactly the rows that are not."""

    def refuse(n: int) -> int:
        if n == 700:
            raise RuntimeError("the disk is busy")
        return 0

    rows = [(n, f"row {n}") for n in range(1000)]  # 4 chunks of 256: 700 is in the third
    async with aiosqlite.connect(tmp_path / "rows.db") as db:
        await db.create_function("refuse", 1, refuse)
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, text TEXT)")
        await db.execute("CREATE TEMP TRIGGER no_700 BEFORE INSERT ON t WHEN refuse(NEW.n) BEGIN SELECT 1; END")
        with pytest.raises(_bulk_insert.NotInserted, match="OperationalError") as refused:
            await _bulk_insert.insert(db, "t", ("n", "text"), rows)
        assert refused.value.rows == 512 and isinstance(refused.value.__cause__, sqlite3.OperationalError)
        async with db.execute("SELECT n FROM t ORDER BY id") as cursor:
            assert [row[0] for row in await cursor.fetchall()] == list(range(512))
        with pytest.raises(_bulk_insert.NotInserted) as missing:
            await _bulk_insert.insert(db, "nowhere", ("n", "text"), rows)
        assert missing.value.rows == 0


async def test_a_full_disk_that_rolls_the_transaction_back_says_no_row_went_in(tmp_path: Path) -> None:
    """On a full disk SQLite may roll the whole transaction back: the chunks before the failing one are gone too,
    and the writer must queue them again (a reviewer found 512 rows lost here)."""
    rows = [(n, "x" * 200) for n in range(1000)]
    async with aiosqlite.connect(tmp_path / "rows.db") as db:
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, text TEXT)")
        await db.commit()
        await db.execute("PRAGMA max_page_count = 40")  # ~160 KB: room for about half of the rows
        with pytest.raises(_bulk_insert.NotInserted, match="full") as refused:
            await _bulk_insert.insert(db, "t", ("n", "text"), rows)
        assert not db.in_transaction and refused.value.rows == 0
        async with db.execute("SELECT count(*) FROM t") as cursor:
            assert (await cursor.fetchone()) == (0,)


def test_a_queue_the_database_refuses_keeps_the_rows_not_in_and_drops_the_oldest_past_its_bound() -> None:
    failed = _bulk_insert.NotInserted(2, RuntimeError("locked"))
    assert _bulk_insert.requeue([0, 0, 1, 1, 2, 2, 3, 3], failed, [4, 4], 2) == ([2, 2, 3, 3, 4, 4], 0)
    most = _bulk_insert.MOST_QUEUED
    queue, dropped = _bulk_insert.requeue(list(range(most + 10)), _bulk_insert.NotInserted(0, failed), [-1], 1)
    assert dropped == 11 and queue[0] == 11 and queue[-1] == -1 and len(queue) == most


async def test_rows_left_out_row_by_row_still_get_a_question_mark_for_a_lone_surrogate(tmp_path: Path) -> None:
    """The chunk first fails on a number past SQLite's integers, so it goes row by row uncleaned: the row with a
    lone surrogate is stored with '?' (not left out), and a dict, which sqlite3 cannot bind, is left out."""
    rows = [(1, "a"), (10**30, "big"), (3, json.loads('"s \\ud800"')), (4, {"a": 1}), (5, "e")]
    async with aiosqlite.connect(tmp_path / "rows.db") as db:
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, text TEXT)")
        assert await _bulk_insert.insert(db, "t", ("n", "text"), rows) == 2
        async with db.execute("SELECT n, text FROM t ORDER BY id") as cursor:
            assert [tuple(row) for row in await cursor.fetchall()] == [(1, "a"), (3, "s ?"), (5, "e")]


class _DiskFullAtCommit:
    """An aiosqlite connection whose disk fills up at the commit: SQLite then rolls the transaction back."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)

    async def commit(self) -> None:
        await self.db.rollback()
        raise sqlite3.OperationalError("database or disk is full")


async def test_a_commit_the_disk_refuses_says_no_row_went_in(tmp_path: Path) -> None:
    """Every chunk went in, then the commit failed and SQLite rolled back: the writer must queue all of them again
    (a reviewer lost 300 rows on a full tmpfs, where the batch had been counted as written)."""
    rows = [(n, f"row {n}") for n in range(300)]
    async with aiosqlite.connect(tmp_path / "rows.db") as db:
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, text TEXT)")
        await db.commit()
        full: Any = _DiskFullAtCommit(db)
        values = [value for row in rows for value in row]
        with pytest.raises(_bulk_insert.NotInserted, match="full") as refused:
            await _bulk_insert.insert_and_commit(full, "t", ("n", "text"), values)
        assert refused.value.rows == 0
        assert await _bulk_insert.insert_and_commit(db, "t", ("n", "text"), values) == 0
        async with db.execute("SELECT count(*) FROM t") as cursor:
            assert (await cursor.fetchone()) == (300,)

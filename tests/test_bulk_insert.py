"""Multi-row inserts: a row whose text SQLite cannot take never costs the batch its other rows."""

from __future__ import annotations

import json
from pathlib import Path

import aiosqlite

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

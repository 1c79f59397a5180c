"""Many rows into one SQLite table in one round trip to aiosqlite's thread.

The rows go in equal chunks (at most ``MOST_ROWS`` rows; ``_chunk_rows``), every chunk through one statement,
``INSERT INTO t (...) SELECT * FROM (VALUES (...), (...), ...) LIMIT ?+0``, and all of them through one
``executemany``; the last chunk is padded with rows of NULLs, which its ``LIMIT`` (the chunk's real row
count, bound last) leaves out unread. So a batch of any size is one call into aiosqlite's thread and one
statement (prepared once, then cached by sqlite3) stepped once a chunk.

When it fails: a row the database cannot take (text with no UTF-8, a number past its integers, a
constraint) is left out and the rest kept (its chunk is tried again row by row); when the database
refuses (locked past its busy timeout, a full disk), ``NotInserted`` says how many rows went in, and the
writer queues the rest again (``requeue``).

Why so few calls: each one is a hand-over to aiosqlite's thread and back, and each time that thread takes
the GIL back from a busy event loop it is woken again and again (every time the loop lets go of the GIL
for a system call) until it gets it. Row by row (``executemany`` of a one-row statement) that is a
hand-over a row; a call a statement of 256 rows cost ~4 µs of CPU a request at 4,500 requests/s
(docs/benchmarks.md, "tenth pass").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from itertools import chain
from typing import Any

import aiosqlite

# sqlite3 binds int, float and str directly but "adapts" every other value, None included, and
# before Python 3.12 its failed look-ups for an adapter format two AttributeErrors each time (about
# 0.2 us a None; a logged request has half a dozen). An adapter for None that answers None binds
# the same NULL, found at the first look-up; an empty dict's ``get`` is that adapter in C (a Python
# function costs four times as much a call). (sqlite3's adapters are the process's: this one changes
# no value any connection writes.)
_null: Callable[[None], None] = {}.get
sqlite3.register_adapter(type(None), _null)

MOST_PARAMETERS = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
"""Parameters SQLite allows in one statement (unless built with another limit)."""
MOST_ROWS = 256
MOST_QUEUED = 65536
"""Rows a writer keeps queued for a database that refuses them (``requeue``): ~20 MB of usage rows."""


class NotInserted(Exception):
    """The database refused an insert (the cause is chained) after its first ``rows`` rows: those are in the
    connection's open transaction, for its next commit; the rest are not."""

    def __init__(self, rows: int, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.rows = rows


def requeue(
    values: list[Any], failed: NotInserted, queue: list[Any], width: int, most: int = MOST_QUEUED
) -> tuple[list[Any], int]:
    """The queue to keep after a refused insert of ``values`` (flat, ``width`` a row): the rows not inserted, then
    those queued meanwhile; over ``most`` rows, the oldest go (a database that refuses for long must not take all
    the memory). Returns the queue and how many rows were dropped."""
    kept = values[failed.rows * width :] + queue
    over = len(kept) // width - most
    if over > 0:
        del kept[: over * width]
        return kept, over
    return kept, 0


async def last_commit(gateway: Any, plugin: str, unwritten: int) -> None:
    """At shutdown, after a writer's last flush: commit (a flush cancelled at the stop still inserts what it had
    taken from the queue, and nothing else would commit it), and say how many rows were never written."""
    if gateway is not None:
        if unwritten:
            gateway.log.error(f"{plugin}_rows_unwritten", rows=unwritten)
        await gateway.registry.db.commit()


@cache
def statement(table: str, columns: tuple[str, ...], rows: int) -> str:
    """Up to ``rows`` rows into ``table``: as many as the last parameter says (the rest is padding)."""
    one = "(" + ", ".join("?" * len(columns)) + ")"
    # ?+0, not ?: SQLite from mid-2024 on folds a bare LIMIT ? into the prepared statement as a constant and
    # prepares the statement again each time it is bound anew (a 256-row statement: ~3x a chunk's cost)
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM (VALUES {', '.join([one] * rows)}) LIMIT ?+0"


async def insert(db: aiosqlite.Connection, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> int:
    """Insert ``rows`` (each a value per column); see ``insert_flat``."""
    return await insert_flat(db, table, columns, list(chain.from_iterable(rows)))  # one flat list, made in C


_ROW_ERRORS = (UnicodeEncodeError, OverflowError, sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError)
"""What a row's own values cause (text with no UTF-8, a number past SQLite's integers, a constraint, a type sqlite3
cannot bind): no retry helps. (``ProgrammingError`` only for a binding: see ``_is_row_error``.)"""


def _is_row_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.ProgrammingError):
        return str(exc).startswith("Error binding parameter")
    return isinstance(exc, _ROW_ERRORS)


async def insert_and_commit(db: aiosqlite.Connection, table: str, columns: tuple[str, ...], values: list[Any]) -> int:
    """``insert_flat``, then commit: how many rows were left out, or ``NotInserted`` with how many are in (none
    when SQLite rolled the transaction back, at the insert or at the commit: a full disk). Commits what went in
    even when the insert was refused part-way, so that no write transaction is left open to block other writers."""
    try:
        left_out = await insert_flat(db, table, columns, values)
    except NotInserted as failed:
        try:
            await db.commit()
        except Exception as exc:
            raise _not_inserted(db, failed.rows, exc) from exc
        raise
    try:
        await db.commit()
    except Exception as exc:
        raise _not_inserted(db, len(values) // len(columns), exc) from exc
    return left_out


async def insert_flat(db: aiosqlite.Connection, table: str, columns: tuple[str, ...], values: list[Any]) -> int:
    """Insert rows given as one flat list (the first row's values, then the second's...: a queue that
    ``extend``s it needs no tuple a row), in one call into aiosqlite's thread. Text SQLite cannot store
    (a lone surrogate) is stored with '?' for it. A row the database cannot take at all is left out (its
    chunk is tried again row by row) and the batch's other rows are kept, each once: returns how many were
    left out. When the database refuses (locked past its busy timeout, a full disk), ``NotInserted`` says
    how many rows went in."""
    width = len(columns)
    if len(values) % width:
        raise ValueError(f"{len(values)} values do not make rows of {width} columns")
    rows = len(values) // width
    if not rows:
        return 0
    most = min(MOST_ROWS, (MOST_PARAMETERS - 1) // width)
    if most < 1:
        raise ValueError(f"{width} columns: more than the {MOST_PARAMETERS - 1} a statement of this SQLite can bind")
    size = _chunk_rows(rows, most)
    step = size * width
    chunks = [values[at : at + step] for at in range(0, len(values), step)]  # copies: what is appended is ours
    for chunk in chunks[:-1]:
        chunk.append(size)
    last = chunks[-1]
    real = len(last) // width
    last += [None] * (step - len(last))
    last.append(real)
    sql = statement(table, columns, size)
    start = 0
    cleaned: set[int] = set()
    left_out = 0
    while start < len(chunks):
        feed = _Feed(chunks, start)
        try:
            await db.executemany(sql, feed)
            return left_out
        except Exception as exc:  # the chunks before the failing one are in; from it on, none
            failed = max(feed.next - 1, start)  # (start: it failed before taking a chunk)
            if not _is_row_error(exc):  # the database refused (locked, full, closed): say which rows are in
                raise _not_inserted(db, failed * size, exc) from exc
            if isinstance(exc, UnicodeEncodeError) and failed not in cleaned:  # a lone surrogate (a client's JSON)
                chunks[failed] = [_storable(value) for value in chunks[failed]]
                cleaned.add(failed)
            else:  # no whole-chunk fix: row by row, leaving out what the database will not take
                left_out += await _row_by_row(db, table, columns, chunks[failed], failed * size)
                failed += 1
            start = failed
    return left_out


async def _row_by_row(
    db: aiosqlite.Connection, table: str, columns: tuple[str, ...], chunk: list[Any], before: int
) -> int:
    """A chunk the database would not take whole, a row at a time (``before``: the batch's rows before it); how
    many rows it would not take."""
    width = len(columns)
    sql = statement(table, columns, 1)
    left_out = 0
    for at in range(0, chunk[-1] * width, width):  # the chunk's last value is its real row count: no padding
        row = [*chunk[at : at + width], 1]
        for attempt in (row, [_storable(value) for value in row]):  # then with '?' for a lone surrogate
            try:
                await db.execute(sql, attempt)
                break
            except Exception as exc:
                if not _is_row_error(exc):
                    raise _not_inserted(db, before + at // width, exc) from exc
                if not isinstance(exc, UnicodeEncodeError) or attempt is not row:
                    left_out += 1
                    break
    return left_out


def _not_inserted(db: aiosqlite.Connection, rows: int, cause: BaseException) -> NotInserted:
    """``rows`` went in, unless SQLite rolled the transaction back (an I/O error, a full disk): then none did."""
    try:
        kept = rows if db.in_transaction else 0
    except Exception:  # the connection is gone: nothing of it is in
        kept = 0
    return NotInserted(kept, cause)


def _chunk_rows(rows: int, most: int) -> int:
    """Rows a chunk for ``rows`` rows in chunks of at most ``most``: as few chunks as that allows, each as
    full as can be with few statement shapes (a power of two up to 16, then a multiple of 16), so that the
    padding is under 16 rows a chunk (600 rows: 3 chunks of 208, 24 rows of padding, not 168)."""
    chunks = -(-rows // most)
    size = -(-rows // chunks)
    size = 1 << (size - 1).bit_length() if size <= 16 else -(-size // 16) * 16
    return min(size, most)


class _Feed:
    """The chunks from ``start`` on, for ``executemany``; ``next`` tells how far it got (it binds, then
    steps, each chunk in turn, so a chunk that cannot be bound is the last one taken)."""

    def __init__(self, chunks: list[list[Any]], start: int) -> None:
        self.chunks, self.next = chunks, start

    def __iter__(self) -> Iterator[list[Any]]:
        return self

    def __next__(self) -> list[Any]:
        at = self.next
        if at >= len(self.chunks):
            raise StopIteration
        self.next = at + 1
        return self.chunks[at]


def _storable(value: Any) -> Any:
    """Text SQLite can store: a lone surrogate, which has no UTF-8, becomes '?'."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value

"""Many rows into one SQLite table with few statements: ``INSERT ... VALUES (...), (...), ...``.

``executemany`` binds and steps row by row, and Python's sqlite3 takes the GIL back for every
row: from aiosqlite's thread, that is a GIL hand-over with the event loop per row written (two
context switches each, and the loop waiting while it lasts). A statement of many rows binds
them all at once and steps once, so a batch of a thousand rows costs a few hand-overs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
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


@cache
def statement(table: str, columns: tuple[str, ...], rows: int) -> str:
    one = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)}"


async def insert(db: aiosqlite.Connection, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> None:
    """Insert ``rows`` (each a value per column); see ``insert_flat``."""
    await insert_flat(db, table, columns, list(chain.from_iterable(rows)))  # one flat list, made in C


async def insert_flat(db: aiosqlite.Connection, table: str, columns: tuple[str, ...], values: list[Any]) -> None:
    """Insert rows given as one flat list (the first row's values, then the second's...: a queue that
    ``extend``s it needs no tuple a row) in statements of a power of two rows, so that the statements
    are few, and the same from batch to batch (sqlite3 caches them prepared)."""
    width = len(columns)
    if len(values) % width:
        raise ValueError(f"{len(values)} values do not make rows of {width} columns")
    rows = len(values) // width
    most = max(1, min(MOST_ROWS, MOST_PARAMETERS // width))
    done = 0
    while done < rows:
        count = min(most, 1 << ((rows - done).bit_length() - 1))
        part = values if count == rows else values[done * width : (done + count) * width]
        try:
            await db.execute(statement(table, columns, count), part)
        except UnicodeEncodeError:  # text with a lone surrogate (from a backend's JSON, say): never lose the batch
            await db.execute(statement(table, columns, count), [_storable(value) for value in part])
        done += count


def _storable(value: Any) -> Any:
    """Text SQLite can store: a lone surrogate, which has no UTF-8, becomes '?'."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value

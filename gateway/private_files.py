"""Files that hold secrets (the database, its WAL, backups, exports) are readable by their owner only.

Files are created mode 0600 rather than under a changed umask: the umask is
process-wide, and SQLite writes from other threads. Files that exist with wider
modes are tightened, and each tightening is logged so an operator knows.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
"""Files SQLite keeps beside a database; they hold its pages, so the same secrets."""


def create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (an empty file is a valid SQLite database)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def tighten(paths: list[Path], log: Any) -> None:
    """Remove group and other permissions from each existing path, logging what changed."""
    for path in paths:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            path.chmod(mode & 0o700)
            log.warning("file_mode_tightened", path=str(path), was=f"{mode:04o}", now=f"{mode & 0o700:04o}")


def sqlite_files(path: Path) -> list[Path]:
    """A database and the companion files SQLite may create beside it."""
    return [path, *(path.with_name(path.name + suffix) for suffix in SQLITE_COMPANIONS)]


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, also when it already existed with wider modes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)

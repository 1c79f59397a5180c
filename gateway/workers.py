"""Several worker processes on one port (``server.workers``): every core serves requests.

Each worker is a whole gateway (``server._run``) on its own socket bound with
``SO_REUSEPORT``, so the kernel spreads connections between them. What they share lives
in the SQLite database (registrations reach every worker within 0.5 s, see
``registry.py``) and, for ``/metrics``, in a ``PROMETHEUS_MULTIPROC_DIR`` made for the
run. Each worker probes the backends itself and keeps its own circuit breakers.
The parent only forwards SIGTERM and Ctrl-C and waits for all of them to drain.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from types import FrameType

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client (plugins/metrics.py)

WORKER_ENV = "MULTIVERSE_WORKER"


def worker_count(setting: int | str) -> int:
    """How many processes ``server.workers`` asks for: a number, or ``auto`` for one per core."""
    return (os.cpu_count() or 1) if setting == "auto" else int(setting)


def port_free(host: str, port: int) -> OSError | None:
    """Why the port cannot be had, if it cannot; asked without SO_REUSEPORT, so that a second
    gateway on the same port is refused instead of silently sharing it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def serve_workers(count: int, run_worker: Callable[[], int]) -> int:
    """Fork ``count`` workers running ``run_worker``; forward SIGTERM/SIGINT; the worst exit status."""
    made_dir = None
    if not os.environ.get(MULTIPROC_ENV):  # prometheus-client reads it at import: set it before any worker starts
        made_dir = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="multiverse-metrics-")
    sys.stdout.flush()
    children: list[int] = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker's own process
            os.setpgid(0, 0)  # signals reach workers once, through the parent
            os.environ[WORKER_ENV] = str(index)
            status = 1
            try:
                status = run_worker()
            finally:
                sys.stdout.flush()
                os._exit(status)
        children.append(pid)

    def forward(signum: int, _: FrameType | None) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    worst = 0
    try:
        for child in children:
            _, status = os.waitpid(child, 0)
            worst = max(worst, os.waitstatus_to_exitcode(status) if status else 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if made_dir:
            shutil.rmtree(made_dir, ignore_errors=True)
    return worst

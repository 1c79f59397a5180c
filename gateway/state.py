"""The state one running gateway owns, shared by the core and handed to plugins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.logs import get_logger
from gateway.plugins import Plugins
from gateway.pool import Pool
from gateway.registry import Backend, Registry
from gateway.store import MemoryStore, Store


@dataclass(eq=False)
class Gateway:
    """Everything one running gateway owns; plugins receive it in ``startup``."""

    config: GatewayConfig
    plugins: Plugins
    registry: Registry
    log: Any = field(default_factory=lambda: get_logger("gateway"))
    admin_key: str = ""
    started_at: float = field(default_factory=time.time)
    requests_total: int = 0
    requests_failed: int = 0
    group_turns: dict[str, int] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    store: Store = field(default_factory=MemoryStore)
    """State several gateway processes may share (rate buckets, counters, a cache): see gateway/store.py."""
    connections: set[web.WebSocketResponse] = field(default_factory=set)
    """Long-lived connections (agents dialed in): closed first at shutdown, so draining never waits on them."""
    _http: aiohttp.ClientSession | None = None
    _pool: Pool | None = None

    def __post_init__(self) -> None:
        self.registry.on_change = self.backend_changed

    def start_task(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a background job for as long as the gateway runs; it is cancelled at shutdown.

        If it dies of an exception, that is logged with ``name`` (start it with your plugin's name).
        """
        task = asyncio.create_task(coroutine, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self.log.error("task_died", task=task.get_name(), exc_info=(type(error), error, error.__traceback__))

    def every(self, seconds: float, job: Callable[[], Awaitable[Any]], name: str) -> asyncio.Task[Any]:
        """Run ``await job()`` every ``seconds`` while the gateway runs; an exception is logged, the loop goes on."""

        async def loop() -> None:
            while True:
                try:
                    await job()
                except Exception:
                    self.log.exception("task_failed", task=name)
                await asyncio.sleep(seconds)

        return self.start_task(loop(), name=name)

    def backend_changed(self, backend: Backend, event: str, reason: str | None = None) -> None:
        """Tell ``backend_status_changed`` observers; every exception is logged, none escapes."""
        self.plugins.call_sync_logged(
            "backend_status_changed", "backend_status_changed_failed", self, backend, event, reason
        )

    async def close_connections(self) -> None:
        await asyncio.gather(*(ws.close() for ws in list(self.connections)), return_exceptions=True)

    async def stop_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    @property
    def http(self) -> aiohttp.ClientSession:
        """The client session for everything off the hot path (probes, discovery, plugins' own calls)."""
        if self._http is None:
            raise RuntimeError("the gateway has not started")
        return self._http

    @property
    def pool(self) -> Pool:
        """The relay's keep-alive connections to HTTP backends (see gateway/pool.py)."""
        if self._pool is None:
            raise RuntimeError("the gateway has not started")
        return self._pool


GATEWAY = web.AppKey("gateway", Gateway)

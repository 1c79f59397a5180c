"""health: probe every backend on a timer; mark it unhealthy after N failures, healthy after M successes.

A probe is a cheap ``GET {url}{path}`` (never a completion). Only routable
backends receive traffic, so an unhealthy one is skipped until it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from gateway import hookimpl
from gateway.registry import HEALTHY, UNHEALTHY, Backend

if TYPE_CHECKING:
    from gateway.state import Gateway


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value}"


def _path(value: str) -> str | None:
    return None if value.startswith("/") else f"must start with '/', got {value!r}"


@dataclass(frozen=True)
class Options:
    interval: float = field(default=10.0, metadata={"doc": "seconds between probes", "check": _positive})
    timeout: float = field(default=5.0, metadata={"doc": "seconds a probe may take", "check": _positive})
    unhealthy_after: int = field(
        default=3, metadata={"doc": "consecutive failures to mark unhealthy", "check": _positive}
    )
    healthy_after: int = field(default=1, metadata={"doc": "consecutive successes to mark healthy", "check": _positive})
    path: str = field(default="/v1/models", metadata={"doc": "what to GET; /health also works", "check": _path})


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self._streaks: dict[str, int] = {}  # > 0: consecutive successes, < 0: consecutive failures
        self._task: asyncio.Task[None] | None = None

    @hookimpl
    async def startup(self, gateway: Gateway) -> None:
        self._task = asyncio.create_task(self._run(gateway), name="health-probes")

    @hookimpl
    async def shutdown(self, gateway: Gateway) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, gateway: Gateway) -> None:
        while True:
            await self.probe_all(gateway)
            await asyncio.sleep(self.options.interval)

    async def probe_all(self, gateway: Gateway) -> None:
        """One round: every backend probed concurrently, each at most once."""
        backends = list(gateway.registry.backends.values())
        self._streaks = {b.id: self._streaks.get(b.id, 0) for b in backends}
        await asyncio.gather(*(self._probe(gateway, b) for b in backends))

    async def _probe(self, gateway: Gateway, backend: Backend) -> None:
        error = await self._check(gateway, backend)
        streak = self._streaks.get(backend.id, 0)
        if error is None:
            streak = max(streak, 0) + 1
            if backend.status != HEALTHY and streak >= self.options.healthy_after:
                await self._transition(gateway, backend, HEALTHY, None)
        else:
            streak = min(streak, 0) - 1
            if backend.status != UNHEALTHY and -streak >= self.options.unhealthy_after:
                await self._transition(gateway, backend, UNHEALTHY, error)
        self._streaks[backend.id] = streak

    async def _check(self, gateway: Gateway, backend: Backend) -> str | None:
        url = backend.url + self.options.path
        try:
            timeout = aiohttp.ClientTimeout(total=self.options.timeout)
            async with gateway.http.get(url, timeout=timeout, allow_redirects=False) as response:
                await response.read()
                return None if response.status == 200 else f"GET {self.options.path} answered HTTP {response.status}"
        except TimeoutError:
            return f"GET {self.options.path} timed out after {self.options.timeout:g}s"
        except aiohttp.ClientError as exc:
            return f"GET {self.options.path} failed: {type(exc).__name__}"

    async def _transition(self, gateway: Gateway, backend: Backend, status: str, error: str | None) -> None:
        previous = backend.status
        await gateway.registry.set_status(backend, status, error)
        log = gateway.log.warning if status == UNHEALTHY else gateway.log.info
        log("backend_health_changed", backend=backend.name, status=status, previous=previous, error=error)

"""The fault-injection harness: a gateway and fake backends as real processes on loopback.

Each scenario adds a row (requests sent, failed, p99 latency) to a table printed at the
end of the run; docs/reliability.md records it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "fault-suite-admin-key-0123"
ADMIN = {"X-API-Key": ADMIN_KEY}
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}
ROWS: list[dict[str, Any]] = []
FIGURES: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as response:
                    if response.status < 500:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered")


@dataclass
class BackendProc:
    port: int
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, **settings: Any) -> BackendProc:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.backend_proc", str(self.port)], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await wait_http(self.url + "/_control")
        if settings:
            await self.control(**settings)
        return self

    async def control(self, **settings: Any) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            if settings:
                async with session.post(self.url + "/_control", json=settings) as response:
                    return dict(await response.json())
            async with session.get(self.url + "/_control") as response:
                return dict(await response.json())

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.kill()
            self.popen.wait(5)


@dataclass
class GatewayProc:
    port: int
    workdir: Path
    popen: subprocess.Popen[bytes] | None = None
    log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, backends: list[BackendProc], **routing: Any) -> GatewayProc:
        config = {
            "server": {"port": self.port},
            "storage": {"sqlite": str(self.workdir / "gateway.db")},
            "admin": {"api_key": ADMIN_KEY, "allow_private_backends": True},
            "backends": [{"name": f"b{i}", "url": b.url, "models": ["echo"]} for i, b in enumerate(backends)],
            "routing": {"connect_timeout": 1, "ttft_timeout": 2, "stall_timeout": 1, "deadline": 3, **routing},
            "logging": {"format": "json", "level": "warning"},
            "plugins": {
                "health": {
                    "interval": 0.5,
                    "timeout": 0.5,
                    "unhealthy_after": 2,
                    "healthy_after": 1,
                    "max_interval": 2,
                },
                "circuit_breaker": {"consecutive_failures": 1, "cooldown": 1},
            },
        }
        path = self.workdir / "gateway.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.log = (self.workdir / "gateway.log").open("w")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            cwd=ROOT,
            stdout=self.log,
            stderr=self.log,
        )
        await wait_http(self.url + "/health")
        return self

    async def servers(self) -> dict[str, dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.get(self.url + "/admin/servers", headers=ADMIN) as r:
            return {s["name"]: s for s in (await r.json())["servers"]}

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        if self.log:
            self.log.close()


@dataclass
class Outcome:
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.statuses if s != 200)

    @property
    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


async def load(url: str, *, count: int | None = None, seconds: float | None = None, concurrency: int = 8) -> Outcome:
    """Send small chat completions until ``count`` are done or ``seconds`` have passed."""
    outcome = Outcome()
    stop_at = time.monotonic() + (seconds or 3600)
    sent = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker() -> None:
            nonlocal sent
            while time.monotonic() < stop_at and (count is None or sent < count):
                sent += 1
                started = time.perf_counter()
                try:
                    async with session.post(url + "/v1/chat/completions", json=CHAT) as response:
                        body = await response.json()
                        outcome.statuses.append(response.status)
                        if response.status != 200:
                            outcome.errors.append(body["error"]["message"])
                except aiohttp.ClientError as exc:  # a hang-up counts as a failure too
                    outcome.statuses.append(0)
                    outcome.errors.append(repr(exc))
                outcome.latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcome


def record(scenario: str, outcome: Outcome) -> None:
    ROWS.append(
        {"scenario": scenario, "sent": len(outcome.statuses), "failed": outcome.failed, "p99_ms": outcome.p99 * 1000}
    )


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Any]:
    """Start backends and a gateway; everything is killed afterwards."""
    started: list[Any] = []

    class Lab:
        async def backends(self, n: int, **settings: Any) -> list[BackendProc]:
            procs = [await BackendProc(free_port()).start(**settings) for _ in range(n)]
            started.extend(procs)
            return procs

        async def backend(self, **settings: Any) -> BackendProc:
            return (await self.backends(1, **settings))[0]

        def adopt(self, proc: BackendProc) -> None:
            started.append(proc)

        async def gateway(self, backends: list[BackendProc], **routing: Any) -> GatewayProc:
            gateway = await GatewayProc(free_port(), tmp_path).start(backends, **routing)
            started.append(gateway)
            return gateway

    yield Lab()
    for proc in started:
        proc.kill() if isinstance(proc, BackendProc) else proc.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    lines = ["| scenario | requests sent | failed | p99 latency (ms) |", "|---|---|---|---|"]
    lines += [f"| {r['scenario']} | {r['sent']} | {r['failed']} | {r['p99_ms']:.0f} |" for r in ROWS]
    if FIGURES:
        lines += ["", *(f"- {k}: {v}" for k, v in FIGURES.items())]
    terminalreporter.write_sep("=", "fault injection")
    terminalreporter.write_line("\n".join(lines))
    report = os.environ.get("MULTIVERSE_FAULTS_REPORT")
    if report:
        Path(report).write_text("\n".join(lines) + "\n")

"""``multiverse agent`` as a real subprocess, with its printed lines collected as they come."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class AgentProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_for(self, text: str, timeout: float = 10.0) -> str:
        """The first printed line containing ``text``; fails after ``timeout`` seconds, showing the output."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            found = next((line for line in self.lines if text in line), None)
            if found is not None:
                return found
            if self.process.returncode is not None and self._reader.done():
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"the agent never printed {text!r}; it printed:\n{self.output}")

    async def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (None: none, wait for it to end by itself) and return the exit code."""
        if sig is not None and self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await self._reader
        return code


async def start_agent(
    gateway_url: str,
    key: str,
    backend_url: str,
    state: Path,
    *extra: str,
    interval: float = 0.3,
    dial_out: bool = False,
    **env: Any,
) -> AgentProcess:
    """Start ``multiverse agent`` (through ``python -m gateway``) against a running gateway.

    By heartbeats, the gateway reaching the backend at its URL; ``dial_out``: over one connection the agent opens.
    """
    args = ["--gateway", gateway_url, "--key", key, "--backend", backend_url, "--state", str(state)]
    if not dial_out and "--public-url" not in extra:
        args += ["--public-url", backend_url]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "agent", *args, "--interval", str(interval), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=state.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )  # fmt: skip
    return AgentProcess(process)

"""``multiverse agent``: keeps a student's model server registered with a gateway, by heartbeats.

It registers the backend under a stable identity (its name and a token kept in a 0600 state
file), discovers its models, and every interval renews its lease carrying the server's load
(llama.cpp's ``/slots``, vLLM's ``/metrics``; Ollama's ``/api/ps`` only tells what is loaded).
A new public URL (a restarted tunnel) updates the registration in place. On SIGINT/SIGTERM it
drains (no new requests, running ones finish), then removes the registration or keeps it offline.
It prints one line per state change; never a key or a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.private_files import write_private

_VLLM = re.compile(r"^vllm:num_requests_(waiting|running)(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)
EXIT_REFUSED = 2


@dataclass(frozen=True)
class AgentOptions:
    gateway: str
    key: str
    backend: str
    public_url: str | None = None
    public_url_file: Path | None = None  # re-read every interval: a tunnel that writes its URL there
    name: str | None = None
    models: tuple[str, ...] = ()
    interval: float = 10.0
    state: Path | None = None
    keep: bool = False  # on exit: keep the registration as offline instead of removing it
    drain_timeout: float = 120.0


class Refused(Exception):
    """The gateway will not take this agent (key refused, not its registration): exit with the reason."""


def default_state(name: str) -> Path:
    return Path.home() / ".local" / "state" / "multiverse" / f"agent-{name}.json"


def load_state(path: Path, name: str) -> dict[str, Any]:
    """The agent's identity: its token, made once and kept (0600) so a restarted agent is the same backend."""
    try:
        state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = {}
    if not isinstance(state.get("agent_token"), str):
        state = {"name": name, "agent_token": "mva-" + secrets.token_urlsafe(32)}
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, json.dumps(state) + "\n")
    return state


class Agent:
    def __init__(self, options: AgentOptions, say: Callable[[str], None] = print) -> None:
        self.options = options
        self.say = say
        self.name = options.name or f"{socket.gethostname()}-{options.backend.rsplit(':', 1)[-1].strip('/')}"
        self.backend = options.backend.rstrip("/").removesuffix("/v1")
        self.state_path = options.state or default_state(self.name)
        self.state: dict[str, Any] = {}
        self.registered: dict[str, Any] | None = None
        self.flags: dict[str, bool] = {}
        self.stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    def _change(self, flag: str, on: bool, line: str) -> None:
        """Print ``line`` only when ``flag`` flips: one line per state change."""
        if self.flags.get(flag, False) != on:
            self.flags[flag] = on
            self.say(line)

    def public_url(self) -> str:
        if self.options.public_url_file is not None:
            with contextlib.suppress(OSError):
                text = self.options.public_url_file.read_text(encoding="utf-8").strip()
                if text:
                    return text
        return self.options.public_url or self.backend

    async def run(self) -> int:
        self.state = load_state(self.state_path, self.name)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        timeout = aiohttp.ClientTimeout(total=max(5.0, self.options.interval))
        async with aiohttp.ClientSession(timeout=timeout) as self._session:
            try:
                if self.dials_out:
                    await self._dial_until_stopped()
                else:
                    await self._beat_until_stopped()
            except Refused as exc:
                self.say(f"refused: {exc}")
                return EXIT_REFUSED
            if self.registered is not None:
                await self._leave()
        return 0

    @property
    def dials_out(self) -> bool:
        """No public URL given: the gateway cannot reach the backend, so the agent connects out to it."""
        return self.options.public_url is None and self.options.public_url_file is None

    async def _dial_until_stopped(self) -> None:
        from gateway.agent_dial import DialOut

        streams = aiohttp.ClientTimeout(total=None, sock_connect=10.0)  # answers stream for as long as they take
        async with aiohttp.ClientSession(timeout=streams) as session:
            await DialOut(self).run(session)

    async def _beat_until_stopped(self) -> None:
        backoff = 1.0
        while not self.stop.is_set():
            wait = self.options.interval
            models = await self._backend_models()
            if models:
                try:
                    await self._heartbeat(models, await self._load())
                    backoff = 1.0
                except (aiohttp.ClientError, TimeoutError) as exc:
                    wait = min(backoff, self.options.interval)
                    backoff = min(backoff * 2, 60.0)
                    self._change(
                        "gateway_down",
                        True,
                        f"gateway unreachable at {self.options.gateway} ({type(exc).__name__}); retrying with backoff",
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), wait)

    async def _backend_models(self) -> list[str]:
        """The models to announce; [] while the backend does not answer (then no heartbeat: the lease runs out)."""
        try:
            async with self.session.get(self.backend + "/v1/models", allow_redirects=False) as response:
                body = await response.json(content_type=None) if response.status == 200 else None
            listed = [m["id"] for m in (body or {}).get("data") or [] if isinstance(m, dict) and "id" in m]
            if response.status != 200 or not listed:
                raise ValueError(f"GET /v1/models answered HTTP {response.status} listing {len(listed)} model(s)")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
            self._change(
                "backend_down", True, f"backend down at {self.backend} ({reason}); no heartbeats until it answers"
            )
            return []
        self._change("backend_down", False, f"backend up at {self.backend}")
        return list(self.options.models) or listed

    async def _load(self) -> dict[str, Any]:
        """What the server says it works on: llama.cpp's /slots, vLLM's /metrics, Ollama's /api/ps."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with self.session.get(self.backend + "/slots", allow_redirects=False) as response:
                slots = await response.json(content_type=None) if response.status == 200 else None
            if isinstance(slots, list):
                busy = sum(1 for s in slots if isinstance(s, dict) and (s.get("is_processing") or s.get("state") == 1))
                return {"running": busy, "waiting": 0, "source": "llama.cpp /slots"}
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with self.session.get(self.backend + "/metrics", allow_redirects=False) as response:
                text = await response.text() if response.status == 200 else ""
            values = {kind: float(value) for kind, value in _VLLM.findall(text)}
            if values:
                return {
                    "running": values.get("running", 0),
                    "waiting": values.get("waiting", 0),
                    "source": "vllm /metrics",
                }
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with self.session.get(self.backend + "/api/ps", allow_redirects=False) as response:
                ps = await response.json(content_type=None) if response.status == 200 else None
            if isinstance(ps, dict) and isinstance(ps.get("models"), list):
                return {"running": 0, "waiting": 0, "source": "ollama /api/ps", "loaded": len(ps["models"])}
        return {"running": 0, "waiting": 0, "source": None}

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self.options.key}"}
        if not self.options.key.startswith("mvb-"):
            body = {**body, "agent_token": self.state["agent_token"]}
        url = self.options.gateway.rstrip("/") + path
        async with self.session.post(url, json=body, headers=headers, allow_redirects=False) as response:
            try:
                answer = await response.json(content_type=None)
            except ValueError:
                answer = {}
            status = response.status
        self._change("gateway_down", False, f"gateway reachable at {self.options.gateway}")
        if status == 404 and path.endswith("heartbeat"):
            raise Refused("the gateway has no agent endpoints: its admin enables them with `plugins: {leases: {}}`")
        if status in (401, 403):
            raise Refused(f"the gateway refused the key (HTTP {status}): {_message(answer)}")
        return status, answer if isinstance(answer, dict) else {}

    async def _heartbeat(self, models: list[str], load: dict[str, Any]) -> None:
        url = self.public_url()
        body = {
            "name": self.name,
            "endpoint_url": url,
            "models": models,
            "interval": self.options.interval,
            "load": load,
        }
        status, answer = await self._post("/admin/agent/heartbeat", body)
        if status >= 400:
            self._change("refused_beat", True, f"heartbeat refused (HTTP {status}): {_message(answer)}")
            return
        self._change("refused_beat", False, "heartbeats accepted again")
        held = "drained by the gateway's admin: no new requests until the agent restarts"
        self._change("held", bool(answer.get("draining")), held)
        before, self.registered = self.registered, answer
        changed = answer.get("changed") or []
        if before is None or "registered" in changed:
            pending = " (pending: waits for an admin's approval)" if answer.get("status") == "pending" else ""
            self.say(
                f"registered as {answer.get('name')} ({answer.get('registration_id')}) at "
                f"{answer.get('endpoint_url')} serving {', '.join(answer.get('models') or [])}{pending}"
            )
        elif "url" in changed:
            self.say(f"URL changed: {before.get('endpoint_url')} -> {answer.get('endpoint_url')} (updated in place)")
        elif "models" in changed:
            self.say(f"models changed: now {', '.join(answer.get('models') or [])}")
        if self.state.get("registration_id") != answer.get("registration_id"):
            self.state["registration_id"] = answer.get("registration_id")
            write_private(self.state_path, json.dumps(self.state) + "\n")

    async def _leave(self) -> None:
        """Drain (the gateway sends nothing new; running requests finish), then remove or keep offline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.drain_timeout
        try:
            status, answer = await self._post("/admin/agent/drain", {})
            self.say(f"draining: {answer.get('in_flight', 0)} request(s) in flight")
            while status == 200 and answer.get("in_flight", 0) > 0 and loop.time() < deadline:
                await asyncio.sleep(0.2)
                status, answer = await self._post("/admin/agent/drain", {})
            status, answer = await self._post("/admin/agent/leave", {"keep": self.options.keep})
        except (aiohttp.ClientError, TimeoutError, Refused) as exc:
            self.say(f"could not drain at the gateway ({type(exc).__name__}); its lease runs out by itself")
            return
        if status == 200:
            self.say("kept as offline at the gateway" if self.options.keep else "removed from the gateway")
        else:
            self.say(f"leaving failed (HTTP {status}): {_message(answer)}")


def _message(answer: Any) -> str:
    error = answer.get("error") if isinstance(answer, dict) else None
    return str(error.get("message")) if isinstance(error, dict) else "no explanation given"


def run(options: AgentOptions) -> int:
    return asyncio.run(Agent(options, lambda line: print(line, flush=True)).run())

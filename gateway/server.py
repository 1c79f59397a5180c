"""Running the gateway: the listening socket, connection timeouts, signals and a graceful drain.

``serve(config)`` is what ``multiverse serve`` runs. It binds before anything starts (a
port in use is one line and exit status 2), announces URLs people can use, and on
SIGTERM or Ctrl-C stops accepting, lets requests in flight finish for up to
``server.shutdown_timeout`` and, on a second signal or at that limit, ends the streams
still open with an SSE error event.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import ipaddress
import json
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.call import peer_closed
from gateway.config import GatewayConfig, ServerConfig
from gateway.errors import GatewayError
from gateway.state import GATEWAY
from gateway.workers import port_free, serve_workers, worker_count

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SHUTTING_DOWN = "the gateway is shutting down; retry in a moment"


class BindError(Exception):
    """The gateway cannot listen where it was told to; the message says what to change."""


class Connection(RequestHandler):
    """aiohttp's connection handler, plus a deadline for request headers and half-close support."""

    __slots__ = ("_header_timeout", "_header_timer", "peer_eof")

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self.peer_eof = False  # the client closed its side (maybe only half): see gateway.call.peer_closed

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._stop_header_timer()
        elif data and self._header_timer is None and self.transport is not None:
            self._header_timer = self._loop.call_later(self._header_timeout, self._headers_too_slow)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio.Protocol allows bool: keep the write side open
        """A client that half-closes after a whole request still gets its answer, then the connection closes."""
        pending = [payload for _, payload in self._messages]
        if self._current_request is not None:
            pending.append(self._current_request.content)
        if self._waiter is not None and not pending:
            return False  # idle: nothing is owed
        if not all(payload.is_eof() for payload in pending):
            return False  # a body cut short can never be answered
        self.peer_eof = True
        if self._current_request is not None:
            peer_closed(self._current_request).set()  # a queued request gives up; an answer still goes out
        self._close = True
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        message = f"request headers not received within {self._header_timeout:g}s (server.header_timeout)"
        body = json.dumps(GatewayError(408, message).envelope()).encode()
        head = f"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.transport.write(head.encode() + b"Connection: close\r\n\r\n" + body)
        self.force_close()


class GatewayServer:
    """One application on one listening socket, with the requests in flight tracked for a drain."""

    def __init__(self, app: web.Application, settings: ServerConfig) -> None:
        self.app = app
        self.settings = settings
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        self.listener: asyncio.Server | None = None
        self.in_flight: dict[asyncio.Task[Any], web.StreamResponse | None] = {}
        self._forced: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        app.middlewares.append(self._track)
        app.on_response_prepare.append(self._prepared)

    @property
    def port(self) -> int:
        assert self.listener is not None
        return int(self.listener.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind first (nothing starts if the port is taken), then start the application and accept."""
        loop = asyncio.get_running_loop()
        host, port = self.settings.host, self.settings.port
        try:
            self.listener = await loop.create_server(
                self._connection, host, port, start_serving=False, reuse_port=worker_count(self.settings.workers) > 1
            )
        except OSError as exc:
            raise BindError(_bind_problem(host, port, exc)) from None
        try:
            await self.runner.setup()
        except BaseException:
            self.listener.close()
            raise
        gc.collect()  # start-up's garbage goes first, then what it made
        gc.freeze()  # what start-up made (modules, config, plugins, a tokenizer) lives as long as the process:
        # the collector's full passes need not walk it again (each took ~15 ms with the usage plugin's tokenizer)
        await self.listener.start_serving()

    def _connection(self) -> Connection:
        assert self.runner.server is not None
        return Connection(
            self.runner.server,
            loop=asyncio.get_running_loop(),
            header_timeout=self.settings.header_timeout,
            keepalive_timeout=self.settings.keepalive_timeout,
            access_log=None,
        )

    async def stop(self, force: asyncio.Event | None = None) -> None:
        """Stop accepting, wait for requests in flight (until ``force`` is set or the timeout), then clean up."""
        log = self.app[GATEWAY].log
        if self.listener is not None:
            self.listener.close()
        if self.runner.server is not None:
            self.runner.server.pre_shutdown()  # idle keep-alive connections close now, busy ones after their answer
        await self.app[GATEWAY].close_connections()  # agents reconnect to another gateway process
        if self.in_flight:
            count = len(self.in_flight)
            log.info(
                "shutdown_draining",
                message=f"draining {count} request{'s' if count != 1 else ''} (again to force)",
                requests=count,
                timeout=self.settings.shutdown_timeout,
            )
            await _first(self._idle.wait(), (force or asyncio.Event()).wait(), timeout=self.settings.shutdown_timeout)
        if self.in_flight:
            log.warning("shutdown_forced", requests=len(self.in_flight), message="ending open requests with an error")
            self._forced.update(self.in_flight)
            for task in list(self.in_flight):
                task.cancel()
            await _first(self._idle.wait(), timeout=2.0)
        await self.runner.cleanup()
        log.info("gateway_stopped")

    @web.middleware
    async def _track(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self.in_flight[task] = None
        self._idle.clear()
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if task not in self._forced:
                raise
            task.uncancel()
            return await self._end_forced(self.in_flight.get(task))
        finally:
            self.in_flight.pop(task, None)
            self._forced.discard(task)
            if not self.in_flight:
                self._idle.set()

    async def _prepared(self, _: web.Request, response: web.StreamResponse) -> None:
        task = asyncio.current_task()
        if task in self.in_flight:
            self.in_flight[task] = response

    @staticmethod
    async def _end_forced(response: web.StreamResponse | None) -> web.StreamResponse:
        """What a request cut off by a forced stop gets: a 503, or an error event closing its stream."""
        if response is None:
            return GatewayError(503, SHUTTING_DOWN, code="shutting_down").to_response()
        if response.content_type != "text/event-stream":
            raise asyncio.CancelledError  # a plain body cut short: only closing the connection says so
        envelope = GatewayError(503, SHUTTING_DOWN + " (the answer was cut short)", code="shutting_down").envelope()
        await response.write(b"event: error\ndata: " + json.dumps(envelope).encode() + b"\n\n")
        return response


async def _first(*waits: Awaitable[Any], timeout: float) -> None:
    """Wait until the first of ``waits`` finishes, or ``timeout`` seconds."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} is already in use on {host} (another gateway?); "
            f"pick another with --port or server.port in gateway.yaml"
        )
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on {where} (ports below 1024 need privileges); pick another with --port"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return f"cannot listen on {where}: {host} is not an address of this machine; change --host or server.host"
    return f"cannot listen on {where}: {exc.strerror or exc}; change --host/--port or server.host/server.port"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses others on the network may reach; no traffic is sent to find them."""
    found: set[str] = set()
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(socket.gethostname(), None, family=socket.AF_INET), 1.0)
        found.update(str(info[4][0]) for info in infos)
    except (OSError, TimeoutError):
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # a UDP connect only picks the outgoing address; nothing is sent
            found.add(str(probe.getsockname()[0]))
    except OSError:
        pass
    usable = [ipaddress.ip_address(a) for a in found]
    return [str(a) for a in sorted(usable) if not (a.is_loopback or a.is_link_local or a.is_unspecified)]


async def announce(app: web.Application, port: int) -> None:
    """The start-up line: where to point an OpenAI client, and a warning if anyone on the network can."""
    gateway = app[GATEWAY]
    config = gateway.config
    host = config.server.host
    hosts = ["127.0.0.1", *(await lan_addresses())] if host in ("0.0.0.0", "::", "") else [host]
    urls = [f"http://{f'[{h}]' if ':' in h else h}:{port}/v1" for h in hosts]
    gateway.log.info(
        "gateway_started",
        listen=f"{host}:{port}",
        openai_base_urls=urls,
        strategy=config.routing.strategy,
        plugins=sorted(gateway.plugins.sources),
        database=str(config.database_path),
        event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],  # "uvloop" or "asyncio"
    )
    if not is_loopback(host) and not gateway.plugins.authenticate:
        gateway.log.warning(
            "gateway_reachable_from_network",
            listen=f"{host}:{port}",
            message="anyone who can reach this port can use the models; enable the auth plugin (docs/classroom.md)",
        )


async def _run(config: GatewayConfig) -> int:
    from gateway.app import create_app

    server = GatewayServer(create_app(config), config.server)
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (force if stop.is_set() else stop).set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        try:
            await server.start()
        except BindError as exc:
            print(f"multiverse: {exc}", file=sys.stderr)
            return 2
        await announce(server.app, server.port)
        await stop.wait()
        await server.stop(force)
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def serve(config: GatewayConfig) -> int:
    """Run the gateway until SIGTERM or Ctrl-C; the exit status (2: it could not listen)."""
    count = worker_count(config.server.workers)
    if count == 1:
        return _run_on_loop(config)
    taken = port_free(config.server.host, config.server.port)
    if taken is not None:
        print(f"multiverse: {_bind_problem(config.server.host, config.server.port, taken)}", file=sys.stderr)
        return 2
    return serve_workers(count, lambda: _run_on_loop(config))


def _run_on_loop(config: GatewayConfig) -> int:
    with asyncio.Runner(loop_factory=loop_factory(config.server.uvloop)) as runner:
        return runner.run(_run(config))


def loop_factory(wanted: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed and wanted (server.uvloop), else asyncio's (None)."""
    if not wanted:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop

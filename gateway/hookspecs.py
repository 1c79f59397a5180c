"""The plugin contract: every hook a plugin may implement, on one screen.

Hooks marked *async allowed* may be ``async def``; the gateway awaits them (pluggy
itself does not). docs/plugins.md documents each hook with an example.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeAlias

import pluggy
from aiohttp import web

from gateway import PROJECT

# Hook specifications have no bodies: pluggy reads only their signatures and docstrings.
# mypy: disable-error-code="empty-body"

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway

hookspec = pluggy.HookspecMarker(PROJECT)

Strategy: TypeAlias = "Callable[[Sequence[Backend], Call], Sequence[Backend]]"
"""Orders the candidate backends for one call, best first. Sync and fast: it runs per request."""


@hookspec
def register_strategies() -> dict[str, Strategy]:
    """Routing strategies this plugin offers, by the name ``routing.strategy`` uses.

    Called once at start-up. All are called; a name offered twice is a start-up error.
    """


@hookspec
def startup(gateway: Gateway) -> Awaitable[None] | None:
    """The gateway is starting: open resources, start background tasks.

    :param gateway: registry, HTTP client session, config and logger.
    All are called, in order; async allowed. An exception stops the start-up.
    """


@hookspec
def shutdown(gateway: Gateway) -> Awaitable[None] | None:
    """The gateway is stopping: cancel background tasks, close resources.

    All are called, in order; async allowed. Exceptions are logged and the next is called.
    """


@hookspec
def before_request(call: Call) -> Awaitable[web.StreamResponse | None] | web.StreamResponse | None:
    """Look at a call before it is routed; return a response to answer it without a backend.

    :param call: the parsed request; a plugin may change it with ``call.replace_json``.
    First non-None wins (async allowed); ``request_complete`` still fires for it.
    """


@hookspec
def filter_candidates(call: Call, candidates: list[Backend]) -> list[Backend] | None:
    """Remove backends that must not serve this call (sync: it runs per request).

    :param candidates: the routable backends serving ``call.model``, after earlier filters.
    All are called, each seeing the previous one's output; None keeps the list as it is.
    """


@hookspec
def request_complete(call: Call) -> Awaitable[None] | None:
    """Observe a finished call: success, error, short-circuit or client disconnect.

    :param call: status, backend, attempts, timings and byte counts are filled in.
    All are called (async allowed); an exception is logged with the plugin's name and ignored.
    """

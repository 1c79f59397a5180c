"""The plugin contract: every hook a plugin may implement, on one screen.

An implementation declares only the arguments it uses, in any order (pluggy's rule);
the gateway works out which at start-up. Hooks marked *async allowed* may be
``async def``: the gateway awaits them (pluggy itself does not). Plugins run in the
order ``gateway.yaml`` lists them (``tryfirst``/``trylast`` still apply). Wrappers
are refused at start-up. docs/plugins.md documents each hook with an example.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

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


# -- start-up and shutdown -------------------------------------------------------------


@hookspec
def register_strategies() -> dict[str, Strategy]:
    """Routing strategies this plugin offers, by the name ``routing.strategy`` uses.

    Called once at start-up. All are called; a name offered twice is a start-up error.
    """


@hookspec
def register_routes(gateway: Gateway) -> Sequence[web.AbstractRouteDef]:
    """Extra HTTP routes (``web.get("/metrics", handler)``); handlers reach the gateway as ``request.app[GATEWAY]``.

    Called once while the app is built. All are called; a path the core serves is refused.
    """


@hookspec
def register_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``multiverse`` subcommands: ``subparsers.add_parser(...).set_defaults(func=...)``.

    All are called, for the plugins enabled in ./gateway.yaml (or ``MULTIVERSE_CONFIG``).
    """


@hookspec
def startup(gateway: Gateway) -> Awaitable[None] | None:
    """The gateway is starting: open resources, create your tables (``gateway.registry.migrate``), start tasks.

    All are called, in order; async allowed. An exception stops the start-up.
    """


@hookspec
def shutdown(gateway: Gateway) -> Awaitable[None] | None:
    """The gateway is stopping: close resources (tasks from ``gateway.start_task`` are cancelled for you).

    All are called, in order; async allowed. Exceptions are logged and the next is called.
    """


# -- every request -------------------------------------------------------------------------


@hookspec(firstresult=True)
def authenticate(request: web.Request, gateway: Gateway) -> Awaitable[Any] | Any:
    """Who is calling, from the headers, before the body is read; raise ``GatewayError(401 or 403, ...)`` to refuse.

    First non-None wins (async allowed); it becomes ``call.identity``. None from all: anonymous.
    """


@hookspec
def filter_models(identity: Any, models: list[str]) -> list[str] | None:
    """What ``GET /v1/models`` lists for this caller; None keeps the list.

    All are called, each seeing the previous one's output.
    """


@hookspec
def before_request(call: Call) -> Awaitable[None] | None:
    """See every call before it is answered (limits, accounting); raise ``GatewayError`` to refuse it.

    :param call: the parsed request; a plugin may change it with ``call.replace_json``.
    All are called, in order (async allowed); the return value is ignored.
    """


@hookspec(firstresult=True)
def answer_request(call: Call) -> Awaitable[Any] | Any:
    """Answer without a backend (a cache hit): a ``web.Response``, or a ``ChunkSource`` to replay as a stream.

    Called after every ``before_request``. First non-None wins (async allowed).
    """


@hookspec
def filter_candidates(call: Call, candidates: list[Backend]) -> list[Backend] | None:
    """Remove backends that must not serve this call (sync: it runs per request).

    :param candidates: the routable backends serving ``call.model``, after earlier filters.
    All are called, each seeing the previous one's output; None keeps the list. One that raises is skipped.
    """


@hookspec
def request_complete(call: Call) -> Awaitable[None] | None:
    """Observe a finished call, after the client has its answer: success, error, short-circuit or hang-up.

    :param call: ``status`` (what the client got), ``attempts``, ``usage``, timings and byte counts.
    All are called (async allowed); an exception is logged with the plugin's name and ignored.
    """


# -- backends ------------------------------------------------------------------------------


@hookspec
def backend_status_changed(gateway: Gateway, backend: Backend, event: str, reason: str | None) -> None:
    """A backend changed: ``event`` is registered, updated, removed, healthy, unhealthy, mismatched or circuit_*.

    All are called (sync; start a task for slow work); an exception is logged and ignored.
    """

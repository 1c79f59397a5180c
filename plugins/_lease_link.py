"""The leases plugin's WebSocket side: an agent dials in (``GET /agent/connect``) and its backend is served over it.

The key is checked before the upgrade: a ``host`` (or admin) key with the agent's own token
in ``X-Agent-Token``, or a backend token ``mvb-...`` alone. The first message, ``hello``,
registers the backend as a heartbeat does, at a placeholder URL nothing dials; from then on the
connection is the lease and the backend's transport. When it closes, the backend leaves
routing at once and the requests on it fail (``gateway.agent_link``).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from gateway.admin_auth import allow, presented_key
from gateway.agent_frames import MAX_FRAME, TOKEN_HEADER, FrameError, control, read_control
from gateway.agent_link import AgentLink
from gateway.errors import GatewayError
from gateway.identity import Identity
from gateway.state import GATEWAY, Gateway
from gateway.transport import AGENT_HOST
from gateway.validate import ValidationError, build
from plugins._lease_api import TOKEN_PREFIX, Beat, digest, keep, leave_now

if TYPE_CHECKING:
    from gateway.registry import Backend
    from plugins.leases import Lease, Plugin

HELLO_TIMEOUT = 10.0
_numbers = itertools.count(1)


def route(plugin: Plugin) -> web.RouteDef:
    async def keyed(request: web.Request, gateway: Gateway, caller: Identity) -> web.StreamResponse:
        token = request.headers.get(TOKEN_HEADER, "")
        if len(token) < 16:
            raise GatewayError(
                400, f"{TOKEN_HEADER}: required with a key (the agent's own secret, from its state file)"
            )
        return await _accept(plugin, request, gateway, caller, digest(token))

    with_key = allow("host")(keyed)

    async def connect(request: web.Request) -> web.StreamResponse:
        given = presented_key(request) or ""
        if not given.startswith(TOKEN_PREFIX):
            return await with_key(request)
        lease = plugin.by_hash.get(digest(given))
        if lease is None:
            return GatewayError(401, "this backend token is not known here", code="invalid_backend_token").to_response()
        caller = Identity(lease.owner_key, lease.name, role="host")
        return await _accept(plugin, request, request.app[GATEWAY], caller, lease.token_hash)

    return web.get("/agent/connect", connect)


async def _accept(
    plugin: Plugin, request: web.Request, gateway: Gateway, caller: Identity, token_hash: str
) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, compress=False, autoping=True, heartbeat=None)
    await ws.prepare(request)
    gateway.connections.add(ws)
    link = AgentLink(ws, next(_numbers))
    log = gateway.log.bind(agent_connection=link.number)
    backend: Backend | None = None
    try:
        first = await ws.receive(timeout=HELLO_TIMEOUT)
        hello = read_control(first.data) if first.type == WSMsgType.TEXT else {}
        if hello.get("t") != "hello":
            raise FrameError("the first message must be 'hello'")
        backend, lease = await _hello(plugin, gateway, caller, token_hash, hello, link)
        log = log.bind(backend=backend.name, registration_id=backend.id)
        log.info("agent_connected")
        await _serve(plugin, gateway, caller, link, backend, lease)
    except GatewayError as exc:
        await ws.send_str(control("refused", status=exc.status, message=exc.message))
    except (FrameError, ValidationError) as exc:
        log.warning("agent_misbehaved", reason=str(exc)[:200])
    except TimeoutError:
        log.warning("agent_misbehaved", reason="no 'hello' in time")
    except ConnectionResetError:
        pass  # the agent went away while the gateway wrote to it: the same as hanging up
    except Exception:  # whatever an agent sends, the gateway goes on
        log.exception("agent_link_failed")
    finally:
        link.lost()
        if backend is not None and backend.transport is link:
            backend.transport = None  # the connection is the lease: out of routing now
            log.info("agent_disconnected", in_flight=backend.in_flight)
        gateway.connections.discard(ws)
        await ws.close()
    return ws


async def _hello(
    plugin: Plugin, gateway: Gateway, caller: Identity, token_hash: str, hello: dict[str, Any], link: AgentLink
) -> tuple[Backend, Lease]:
    beat = _beat(plugin, hello, token_hash)
    backend, lease, _ = await keep(plugin, gateway, caller, token_hash, beat, beat.endpoint_url)
    old = backend.transport
    if isinstance(old, AgentLink) and old is not link:
        await old.ws.close()  # a second connection for the same backend: the newer one wins
    backend.transport = link
    lease.expires_at = math.inf  # renewed by the connection itself, until it closes
    backend.notes["agent"]["transport"] = repr(link)
    welcome = {"registration_id": backend.id, "name": backend.name, "models": list(backend.models)}
    await link.ws.send_str(control("welcome", status=backend.status, **welcome))
    return backend, lease


def _beat(plugin: Plugin, message: dict[str, Any], token_hash: str) -> Beat:
    fields = {k: message[k] for k in ("name", "models", "interval", "load") if k in message}
    beat = build(Beat, {**fields, "endpoint_url": f"http://a{token_hash[:16]}{AGENT_HOST}"})
    low, high = plugin.options.min_interval, plugin.options.max_interval
    if not low <= beat.interval <= high:
        raise GatewayError(400, f"interval must be between {low:g} and {high:g} seconds")
    return beat


async def _serve(
    plugin: Plugin, gateway: Gateway, caller: Identity, link: AgentLink, backend: Backend, lease: Lease
) -> None:
    """Sort what the agent sends until it hangs up or breaks the protocol."""
    async for message in link.ws:
        if message.type == WSMsgType.BINARY:
            link.received(message.data)
            continue
        if message.type != WSMsgType.TEXT:
            raise FrameError(f"the connection failed ({message.type.name})")
        parsed = read_control(message.data)
        kind = parsed["t"]
        if kind == "beat":
            beat = _beat(plugin, {**parsed, "name": lease.name}, lease.token_hash)
            await keep(plugin, gateway, caller, lease.token_hash, beat, beat.endpoint_url)
            lease.expires_at = math.inf
            backend.notes["agent"]["transport"] = repr(link)
        elif kind == "drain":
            lease.draining = lease.draining or "agent"
            backend.notes["agent"]["draining"] = True
            await link.ws.send_str(control("drained", in_flight=backend.in_flight))
        elif kind == "leave":
            answer = await leave_now(gateway, caller, lease, backend, bool(parsed.get("keep")))
            await link.ws.send_str(control("left", **answer))
            return
        else:
            link.received(parsed)
        await asyncio.sleep(0)

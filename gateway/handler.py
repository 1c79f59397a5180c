"""A request's path through the gateway, from its headers to the observers after the answer.

authenticate → read the body → ``before_request`` (all) → ``answer_request`` (first wins)
→ relay → the answer is sent, once → the request line → ``request_complete``.
Whatever happens, the client gets exactly one response: once one is prepared, an error
can only end its stream with an error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import relay
from gateway.call import Call, ms, parse_body, request_id_of, shown
from gateway.endpoints import MODEL_AT, MULTIPART, form_fields
from gateway.errors import GatewayError, in_anthropic_shape
from gateway.logs import request_line
from gateway.plugins import awaitable
from gateway.pump import ChunkSource, replay, sse_error
from gateway.state import GATEWAY, Gateway
from gateway.upstream import CLIENT_GONE, call_headers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_anthropic(request: web.Request) -> bool:
    """Whether the request is to Anthropic's Messages API, whose errors have Anthropic's shape."""
    return request.path.startswith("/v1/messages")


def proxy(endpoint: str) -> Handler:
    """The handler of one relayed endpoint, e.g. ``chat/completions``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        gateway = request.app[GATEWAY]
        request_id = request_id_of(request)
        try:
            identity = await authenticate(gateway, request)
            if endpoint in MULTIPART:
                body, data = await read_form(gateway, request)
            else:
                body = await read_body(request)
                data = parse_body(body)
        except GatewayError as exc:
            call = Call(gateway, request, request_id, endpoint, b"", {})
            call.status, call.error = exc.status, exc.message
            gateway.requests_total += 1
            response = await send(call, exc.to_response({"X-Request-ID": request_id}))
            _finish(gateway, call, response)
            return response
        model_at = data.pop(MODEL_AT, None)
        call = Call(gateway, request, request_id, endpoint, body, data)
        if model_at is not None:
            call.state[MODEL_AT] = (body, *model_at)  # the form as sent, kept should the model change
        call.identity = identity
        return await serve(gateway, call)

    return handle


async def authenticate(gateway: Gateway, request: web.Request) -> Any:
    """The caller's identity from the ``authenticate`` hook; None (anonymous) when no plugin knows."""
    if not gateway.plugins.authenticate:
        return None
    try:
        answered = gateway.plugins.first(gateway.plugins.authenticate, request, gateway)
        if answered is not None and not isinstance(answered, tuple):  # an async authenticate hook
            answered = await answered
    except GatewayError:
        raise
    except Exception:  # a broken plugin: refuse (never let the caller in as anonymous), in the envelope
        gateway.log.exception("authenticate_failed", plugins=[name for name, _ in gateway.plugins.authenticate])
        raise GatewayError(
            500,
            "the gateway could not check who is calling (an authenticate plugin failed); see its log",
            code="authentication_failed",
        ) from None
    return answered[1] if answered else None


async def read_form(gateway: Gateway, request: web.Request) -> tuple[bytes, dict[str, Any]]:
    """A multipart upload (an audio file), within server.max_upload_bytes, and the fields routing reads from it."""
    limit = gateway.config.server.max_upload_bytes
    body = await read_body(request.clone(client_max_size=limit), "server.max_upload_bytes")
    data, model_at = form_fields(body, request.headers.get("Content-Type", ""))
    parse_body(b'{"model":%s}' % json.dumps(data["model"]).encode())  # the same checks as a JSON body's
    data[MODEL_AT] = model_at
    return body, data


async def read_body(request: web.Request, setting: str = "server.max_body_bytes") -> bytes:
    """The request's body, decoded as its Content-Encoding says; one that does not decode is a 400."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.client_max_size
        raise GatewayError(
            413, f"the request body is larger than {limit} bytes; send less, or raise {setting}"
        ) from None
    except web.RequestPayloadError as exc:
        encoding = shown(request.headers.get("Content-Encoding", "none"), 40)
        raise GatewayError(
            400, f"the request body could not be read (Content-Encoding: {encoding}): {shown(str(exc).strip(), 120)}"
        ) from None


async def serve(gateway: Gateway, call: Call) -> web.StreamResponse:
    """Answer a parsed call: plugins first, then a backend; then observers."""
    plugins = gateway.plugins
    gateway.requests_total += 1
    response: web.StreamResponse | None = None
    try:
        if plugins.before_request:
            await plugins.call_refusable(plugins.before_request, "before_request_failed", call)
        answered = plugins.first(plugins.answer_request, call) if plugins.answer_request else None
        if answered is not None and not isinstance(answered, tuple):  # an async answer_request hook
            answered = await answered
        if answered is None:
            response = await relay.relay(gateway, call)
        elif isinstance(answered[1], ChunkSource):
            call.tags.setdefault("answered_by", answered[0])
            response = await replay(call, answered[1], call_headers(call))
        else:
            call.tags.setdefault("answered_by", answered[0])
            response = answered[1]
    except GatewayError as exc:
        call.error = exc.message
        response = _error(call, exc)
    except asyncio.CancelledError:
        call.client_disconnected = True
        _finish(gateway, call, None)
        raise
    except CLIENT_GONE:
        call.client_disconnected = True
    except Exception as exc:
        call.error = f"{type(exc).__name__}: {shown(str(exc), 200)}"
        gateway.log.exception("request_crashed", request_id=call.request_id, plugin=call.tags.get("answered_by"))
        response = await _after_crash(call)
    if response is not None and not response.prepared:
        response = await send(call, response)
    call.response = call.response or response  # observers may read a JSON answer's bytes: call.response.body
    _finish(gateway, call, response)
    return response if response is not None else web.Response(status=499)


def _error(call: Call, exc: GatewayError) -> web.Response:
    headers = {"X-Request-ID": call.request_id, "X-Multiverse-Attempts": str(len(call.attempts))}
    return exc.to_response(headers)


async def _after_crash(call: Call) -> web.StreamResponse | None:
    """After a bug: a 500 in the envelope if nothing was sent yet, else an error event ends the stream."""
    message = f"the gateway failed unexpectedly; see its log for request {call.request_id}"
    response = call.response
    if response is None or not response.prepared:
        return GatewayError(500, message).to_response({"X-Request-ID": call.request_id})
    try:
        await response.write(sse_error(message, "gateway_error"))
        await response.write_eof()
    except (*CLIENT_GONE, RuntimeError):
        call.client_disconnected = True
    return response


async def send(call: Call, response: web.StreamResponse) -> web.StreamResponse:
    """Write an unsent response now, so that observers run after the client has it."""
    if response.status >= 400 and isinstance(response, web.Response) and is_anthropic(call.request):
        response = in_anthropic_shape(response)
    if "X-Request-ID" not in response.headers:
        response.headers["X-Request-ID"] = call.request_id
    try:
        await response.prepare(call.request)
        await response.write_eof()
    except CLIENT_GONE:
        call.client_disconnected = True
    return response


def _finish(gateway: Gateway, call: Call, response: web.StreamResponse | None) -> None:
    """Record what the client got and when, log the request line, then tell the observers."""
    call.ended = call.ended or time.perf_counter()
    if response is not None and not call.client_disconnected:
        call.status = response.status
    elif call.client_disconnected:
        call.status = call.status or 499
    failed = call.status >= 500 or call.error is not None
    if failed:
        gateway.requests_failed += 1
    try:  # noqa: SIM105  # not contextlib.suppress: an object a request, for an error that almost never comes
        _log_line(gateway, call, failed)
    except (OSError, ValueError):  # stdout closed or a broken pipe: the line is lost, the answer and observers are not
        pass
    observe(gateway, call)


def observe(gateway: Gateway, call: Call) -> None:
    """Tell the ``request_complete`` observers, once the client has its answer.

    Synchronous observers run here and now (nothing can interrupt them); async ones are awaited
    in a task of their own, so a slow one never holds up the client (nor its next request on the
    connection) and a client that hangs up never cancels them.
    """
    call.ended = call.ended or time.perf_counter()  # explain's calls come here without _finish
    pending: list[tuple[str, Awaitable[Any]]] | None = None
    for plugin, fn in gateway.plugins.request_complete:
        try:
            result = fn(call)
        except Exception:
            gateway.plugins.log.exception("request_complete_failed", plugin=plugin, request_id=call.request_id)
            continue
        if result is not None and awaitable(result):
            pending = [*(pending or []), (plugin, result)]
    if pending:
        gateway.start_task(_await_observers(gateway, call, pending), name=f"request-complete-{call.request_id}")


async def _await_observers(gateway: Gateway, call: Call, pending: list[tuple[str, Awaitable[Any]]]) -> None:
    for plugin, observer in pending:
        try:
            await observer
        except Exception:
            gateway.plugins.log.exception("request_complete_failed", plugin=plugin, request_id=call.request_id)


def _log_line(gateway: Gateway, call: Call, failed: bool) -> None:
    outcome: dict[str, object] = {"error": call.error} if call.error else {}
    if call.client_disconnected:
        outcome["client_disconnected"] = True
    if call.model != call.requested_model:
        outcome["served_model"] = call.model
    usage = call.usage
    if usage:  # flat numbers: cheaper to render and redact than the nested object
        outcome["prompt_tokens"] = usage.get("prompt_tokens")
        outcome["completion_tokens"] = usage.get("completion_tokens")
    core = {
        "request_id": call.request_id,
        "endpoint": call.endpoint,
        "model": shown(call.requested_model),
        "stream": call.stream,
        "backend": call.backend.name if call.backend else None,
        "status": call.status,
        "attempts": len(call.attempts),
        "latency_ms": ms(call.latency),
    }
    if call.upstream_id != call.request_id:
        core["backend_request_id"] = call.upstream_id
    # a plugin's tag never hides a core field
    request_line(gateway.log, logging.WARNING if failed else logging.INFO, "request", {**call.tags, **core, **outcome})

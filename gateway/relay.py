"""The byte relay: try a call's backends in order, fail over, stream the answer back.

The client's body is forwarded as received; the backend's bytes are written to the
client as they arrive. Failover happens only while nothing has been sent; after
that, a failure ends the stream with an error event, or with ``routing.resume_streams``
continues it on another backend. Every try is recorded on the call as an ``Attempt``.
"""

from __future__ import annotations

import asyncio
from time import monotonic, perf_counter
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.call import Attempt
from gateway.endpoints import PASSED_THROUGH
from gateway.errors import GatewayError
from gateway.pump import EventStream, body_usage, pump, sse_error
from gateway.refused import KEY_REFUSED, REFUSING_STATUSES, refusal, take_out
from gateway.resume import RESUMABLE, Continuation
from gateway.rewrite import answer_for, body_for, rename_stream
from gateway.routing import model_chain, route
from gateway.transport import HTTP, Upstream
from gateway.upstream import (
    CLIENT_GONE,
    RETRY_STATUSES,
    BackendFailed,
    call_headers,
    forward_headers,
    looks_like_json,
    read_bounded,
    retry_after,
    returned_headers,
    step,
)

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway

Opened = tuple[Attempt, Upstream, bytes]


async def relay(gateway: Gateway, call: Call) -> web.StreamResponse:
    """Try the model's candidates in order, then its fallback models', until one answers."""
    routing = gateway.config.routing
    loop = asyncio.get_running_loop()
    deadline = loop.time() + routing.deadline
    headers = forward_headers(call.request, call)
    chain = model_chain(gateway, call)
    refusals: list[GatewayError] = []
    passed_on: web.Response | None = None
    for model in chain:
        if model != call.model:
            call.replace_json({**call.json, "model": model})
        try:
            ordered = route(gateway, call)
        except GatewayError as refusal:
            refusals.append(refusal)
            continue
        for backend in ordered[: routing.max_attempts]:
            if loop.time() >= deadline:
                break
            try:
                return await _attempt(gateway, call, backend, headers, deadline)
            except BackendFailed as failed:
                passed_on = failed.response or passed_on
    if passed_on is not None:  # the last backend's own 5xx or 429: the call failed, though it has an answer
        call.error = "; ".join(f"{a.backend.name}: {a.reason}" for a in call.failures)
        return passed_on
    call.backend = None
    if not call.attempts and refusals:
        raise refusals[0]  # nothing was even tried: unknown model, or all unhealthy
    raise _exhausted(gateway, call, chain, loop.time() >= deadline)


def _exhausted(gateway: Gateway, call: Call, chain: list[str], late: bool) -> GatewayError:
    names = " or ".join(f"'{m}'" for m in chain)
    tried = "; ".join(f"{a.backend.name}: {a.reason}" for a in call.failures) or "nothing could be tried"
    if late:
        deadline = gateway.config.routing.deadline
        message = f"no backend started answering model {names} within routing.deadline ({deadline:g}s); tried: {tried}"
        return GatewayError(504, message, code="deadline_exceeded")
    if call.failures and all(a.outcome == KEY_REFUSED for a in call.failures):
        message = f"the provider refused the gateway's own API key for model {names} ({tried})"
        fix = "this is the gateway's configuration, not your request: ask its admin to fix the backend's api_key"
        return GatewayError(502, f"{message}; {fix}", code="provider_key_refused")
    if call.attempts and call.attempts[-1].status is not None:  # it answered, but not acceptably
        return GatewayError(
            502, f"no backend gave a valid answer for model {names} ({tried})", code="bad_backend_response"
        )
    return GatewayError(
        503, f"no backend could serve model {names} ({tried}); try again shortly", code="backend_unavailable"
    )


async def _attempt(
    gateway: Gateway, call: Call, backend: Backend, headers: CIMultiDict[str], deadline: float
) -> web.StreamResponse:
    attempt = _begin(call, backend)
    try:
        return await _try(gateway, call, attempt, headers, deadline)
    except BackendFailed as failed:
        _failed(gateway, call, attempt, failed.outcome, failed.reason)
        if failed.outcome == KEY_REFUSED:
            await take_out(gateway, attempt)
        raise
    except (asyncio.CancelledError, *CLIENT_GONE):
        if attempt.outcome == "ok":
            attempt.outcome = "client_gone"
        raise
    finally:
        attempt.ended = attempt.ended or perf_counter()
        backend.in_flight -= 1


def _begin(call: Call, backend: Backend) -> Attempt:
    attempt = Attempt(backend, call.model, perf_counter())
    call.attempts.append(attempt)
    call.backend = backend
    backend.in_flight += 1
    return attempt


def _failed(
    gateway: Gateway, call: Call, attempt: Attempt, outcome: str, reason: str, mid_stream: bool = False
) -> None:
    attempt.outcome, attempt.reason, attempt.mid_stream = outcome, reason, mid_stream
    attempt.ended = attempt.ended or perf_counter()
    if outcome == KEY_REFUSED:  # the gateway's configuration, not the backend's failure: refused.take_out tells
        return
    backend = attempt.backend
    backend.failed += 1
    backend.last_error = reason
    gateway.log.warning(
        "backend_failed", request_id=call.request_id, backend=backend.name, outcome=outcome, reason=reason
    )


def _first_byte_due(gateway: Gateway, backend: Backend, deadline: float) -> tuple[float, str]:
    """When the backend's first byte is due, and which setting says so."""
    ttft = backend.ttft_timeout or gateway.config.routing.ttft_timeout
    due = asyncio.get_running_loop().time() + ttft
    return (deadline, "routing.deadline") if due > deadline else (due, f"{ttft:g}s (routing.ttft_timeout)")


async def _open(
    gateway: Gateway, call: Call, attempt: Attempt, headers: CIMultiDict[str], body: bytes, due: tuple[float, str]
) -> Upstream:
    """Send the request to one backend (through its transport) and return its response once its headers are in."""
    backend = attempt.backend
    if backend.api_key:
        headers = headers.copy()
        headers.update(backend.auth_headers())
    timeout = _connect_timeout(backend.connect_timeout) if backend.connect_timeout else None
    sending = (backend.transport or HTTP).open(gateway, call, backend, headers, body, timeout)
    upstream = await step(attempt, sending, due[0], "timeout", f"no answer within {due[1]}")
    attempt.status = upstream.status
    return upstream


async def _try(
    gateway: Gateway, call: Call, attempt: Attempt, headers: CIMultiDict[str], deadline: float
) -> web.StreamResponse:
    backend = attempt.backend
    due = _first_byte_due(gateway, backend, deadline)
    upstream = await _open(gateway, call, attempt, headers, body_for(gateway, call, backend), due)
    try:
        status = upstream.status
        routing = gateway.config.routing
        stall = backend.stall_timeout or routing.stall_timeout
        limit = (routing.max_response_bytes, "routing.max_response_bytes")
        if 300 <= status < 400:
            raise BackendFailed(
                "http_error", f"answered with a redirect (HTTP {status}), which the gateway never follows"
            )
        if status in REFUSING_STATUSES:
            await read_bounded(attempt, upstream, stall, *limit)
            raise refusal(status)
        if status >= 500 or status in RETRY_STATUSES:
            body = await read_bounded(attempt, upstream, stall, *limit)
            attempt.retry_after = retry_after(upstream.headers.get("Retry-After"))
            raise BackendFailed("http_error", f"HTTP {status}", _passed_on(call, upstream, body))
        events = upstream.content_type == "text/event-stream" or (call.endpoint in PASSED_THROUGH and status < 300)
        if call.stream and status < 300 and not events:
            kind = upstream.content_type or "no content type"
            raise BackendFailed("bad_answer", f"answered a stream request with {kind}, not an event stream")
        if events and status < 300:
            chunk = await step(
                attempt, upstream.content.readany(), due[0], "timeout", f"no first token within {due[1]}"
            )
            if not chunk:
                raise BackendFailed("bad_answer", "ended its event stream before sending anything")
            attempt.first_byte = perf_counter()
            rename_stream(gateway, call, backend)
            return await _stream(gateway, call, attempt, upstream, chunk, headers)
        attempt.first_byte = perf_counter()
        body = await read_bounded(attempt, upstream, stall, *limit)
        if status >= 300:
            return _passed_on(call, upstream, body)  # the client's mistake: its 4xx, untried elsewhere
        if not looks_like_json(body):
            raise BackendFailed("bad_answer", f"answered HTTP {status} with a body that is not JSON")
        call.first_byte_at = attempt.first_byte
        backend.active_at = monotonic()
        call.bytes_out = len(body)
        call.usage = body_usage(body)
        backend.served += 1
        body = answer_for(gateway, call, backend, body)
        return web.Response(status=status, body=body, headers=returned_headers(upstream, call))
    finally:
        upstream.release()


def _passed_on(call: Call, upstream: Upstream, body: bytes) -> web.Response:
    """A backend's own error for the client: as sent if it is JSON, else wrapped in OpenAI's envelope."""
    status = upstream.status
    if looks_like_json(body):
        return web.Response(status=status, body=body, headers=returned_headers(upstream, call))
    name = call.backend.name if call.backend else "?"
    if body.strip():
        text = body[:200].decode("utf-8", "replace").strip()
        sent = f"a body that is not JSON ({upstream.content_type}): {text!r}"
    else:
        sent = "an empty body"
    error = GatewayError(status, f"backend {name} answered {status} with {sent}", code="backend_error")
    return error.to_response(call_headers(call))


async def _stream(
    gateway: Gateway,
    call: Call,
    attempt: Attempt,
    upstream: Upstream,
    chunk: bytes,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    """Relay chunks as they arrive. After the first byte a failure ends the stream with an
    error event, or, with routing.resume_streams, continues it on another backend."""
    response = EventStream(status=upstream.status, headers=returned_headers(upstream, call))
    call.status = upstream.status
    call.first_byte_at = attempt.first_byte
    routing = gateway.config.routing
    resume = Continuation(call) if routing.resume_streams and call.endpoint in RESUMABLE else None
    resumed: list[tuple[Upstream, Backend]] = []
    await response.prepare(call.request)
    call.response = response
    try:
        while True:
            stall = attempt.backend.stall_timeout or routing.stall_timeout
            whole_events = resume is not None or call.filters is not None  # filters see whole events
            failure = await pump(response, call, upstream.content, chunk, stall, whole_events)
            attempt.ended = perf_counter()
            if failure is None:
                attempt.backend.served += 1
                break
            upstream.close()  # stop the backend, whatever state it is in
            _failed(gateway, call, attempt, "stalled", failure, mid_stream=True)
            again = await _resume(gateway, call, resume, headers) if resume and not resume.finished else None
            if again is None:
                call.error = f"backend {attempt.backend.name} failed mid-stream: {failure}"
                await response.write(sse_error(call.error))
                break
            attempt, upstream, chunk = again
            resumed.append((upstream, attempt.backend))
        await response.write_eof()
    except CLIENT_GONE:
        call.client_disconnected = True
        attempt.outcome = "client_gone"
        upstream.close()  # stop the backend generating for nobody
    except asyncio.CancelledError:
        attempt.outcome = "client_gone" if attempt.outcome == "ok" else attempt.outcome
        raise
    finally:
        for other, backend in resumed:
            other.release()
            backend.in_flight -= 1
    return response


async def _resume(gateway: Gateway, call: Call, resume: Continuation, headers: CIMultiDict[str]) -> Opened | None:
    """Open a continuation of the stream on a backend that has not failed this call."""
    try:
        ordered = route(gateway, call)
    except GatewayError:
        return None
    failed = {a.backend.id for a in call.failures}
    body = resume.body()
    for backend in [b for b in ordered if b.id not in failed][: gateway.config.routing.max_attempts]:
        attempt = _begin(call, backend)
        due = _first_byte_due(gateway, backend, float("inf"))
        try:
            upstream = await _open(gateway, call, attempt, headers, body, due)
            try:
                if upstream.status != 200 or upstream.content_type != "text/event-stream":
                    raise BackendFailed("http_error", f"HTTP {upstream.status} to the continuation")
                chunk = await step(attempt, upstream.content.readany(), due[0], "timeout", "no first token")
                if not chunk:
                    raise BackendFailed("bad_answer", "ended the continuation before sending anything")
            except BaseException:  # a failure, or the call cancelled (hang-up, forced stop): let go of it
                upstream.release()
                raise
        except BackendFailed as failed_try:
            _failed(gateway, call, attempt, failed_try.outcome, failed_try.reason)
            attempt.ended = perf_counter()
            backend.in_flight -= 1
            continue
        except BaseException:
            attempt.ended = perf_counter()
            if attempt.outcome == "ok":
                attempt.outcome = "client_gone"
            backend.in_flight -= 1
            raise
        attempt.first_byte = perf_counter()
        gateway.log.info("stream_resumed", request_id=call.request_id, backend=backend.name)
        return attempt, upstream, chunk
    return None


_CONNECT_TIMEOUTS: dict[float, aiohttp.ClientTimeout] = {}


def _connect_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """A per-backend connect timeout (cached, at most 64 distinct values: registrations choose them)."""
    timeout = _CONNECT_TIMEOUTS.get(seconds)
    if timeout is None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=seconds)
        if len(_CONNECT_TIMEOUTS) < 64:
            _CONNECT_TIMEOUTS[seconds] = timeout
    return timeout

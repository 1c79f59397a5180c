"""The byte relay: route a call to a backend, fail over, stream the answer back.

The client's body is forwarded as received; the backend's bytes are written to
the client as they arrive. Failover happens only while nothing has been sent.
"""

from __future__ import annotations

import asyncio
import json
from time import perf_counter as _now
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway

HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
    }
)  # fmt: skip
# Never sent to a backend: hop-by-hop, recomputed, or the client's own credentials.
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key", "cookie"}
# Not copied back to the client: hop-by-hop, or recomputed by the gateway.
_NOT_RETURNED = HOP_BY_HOP | {"content-length", "set-cookie"}

BACKEND_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class BackendFailed(Exception):
    """A backend could not answer; the next candidate may."""

    def __init__(self, backend: Backend, reason: str, response: web.Response | None = None) -> None:
        super().__init__(reason)
        self.backend = backend
        self.reason = reason
        self.response = response


def forward_headers(request: web.Request, request_id: str) -> CIMultiDict[str]:
    headers = request.headers
    drop = _NOT_FORWARDED
    if "Connection" in headers:
        drop = drop | {t.strip().lower() for t in headers["Connection"].split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        if key.lower() not in drop:
            out.add(key, value)
    out["X-Request-ID"] = request_id
    return out


def _returned_headers(upstream: aiohttp.ClientResponse, call: Call) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in upstream.headers.items():
        if key.lower() not in _NOT_RETURNED:
            out.add(key, value)
    out["X-Request-ID"] = call.request_id
    if call.backend is not None:
        out["X-Multiverse-Backend"] = call.backend.name
    out.update(call.response_headers)
    return out


def order_candidates(gateway: Gateway, call: Call) -> list[Backend]:
    """Candidates for the call's model after filters, ordered by the strategy."""
    candidates = list(gateway.registry.for_model(call.model))
    if not candidates:
        raise _no_backend(gateway, call.model)
    for _, fn in gateway.plugins.filter_candidates:
        kept = fn(call=call, candidates=candidates)
        if kept is not None:
            candidates = kept
    if not candidates:
        raise GatewayError(
            503,
            f"no backend may serve model '{call.model}' for this request right now; try again later",
            code="no_backend_available",
        )
    return list(gateway.plugins.strategy(candidates, call))


def _no_backend(gateway: Gateway, model: str) -> GatewayError:
    if model in gateway.registry.all_models():
        return GatewayError(
            503,
            f"every backend serving model '{model}' is unhealthy; try again shortly or choose another model",
            code="model_unavailable",
        )
    available = ", ".join(gateway.registry.models()) or "none (no backend is registered and healthy)"
    return GatewayError(
        404, f"model '{model}' is not served here; available: {available}", code="model_not_found", param="model"
    )


async def relay(gateway: Gateway, call: Call) -> web.StreamResponse:
    """Send the call to its candidates in order until one answers."""
    ordered = order_candidates(gateway, call)
    headers = forward_headers(call.request, call.request_id)
    failures: list[BackendFailed] = []
    for backend in ordered[: gateway.config.routing.max_attempts]:
        call.attempts += 1
        call.backend = backend
        backend.in_flight += 1
        try:
            return await _attempt(gateway, call, backend, headers)
        except BackendFailed as failure:
            backend.failed += 1
            failures.append(failure)
            gateway.log.warning(
                "backend_failed", request_id=call.request_id, backend=backend.name, reason=failure.reason
            )
        finally:
            backend.in_flight -= 1
    last = failures[-1]
    if last.response is not None:
        return last.response  # the backend's own 5xx, passed on
    tried = "; ".join(f"{f.backend.name}: {f.reason}" for f in failures)
    raise GatewayError(
        503,
        f"no backend could serve model '{call.model}' ({tried}); try again shortly",
        code="backend_unavailable",
    )


async def _attempt(gateway: Gateway, call: Call, backend: Backend, headers: CIMultiDict[str]) -> web.StreamResponse:
    url = f"{backend.url}/v1/{call.endpoint}"
    try:
        upstream = await gateway.http.post(url, data=call.body, headers=headers, allow_redirects=False)
    except BACKEND_ERRORS as exc:
        raise BackendFailed(backend, _describe(exc)) from None
    try:
        if upstream.status >= 500:
            body = await _read(upstream, backend)
            response = web.Response(status=upstream.status, body=body, headers=_returned_headers(upstream, call))
            raise BackendFailed(backend, f"HTTP {upstream.status}", response)
        if call.stream or upstream.content_type == "text/event-stream":
            return await _stream(call, upstream, backend)
        body = await _read(upstream, backend)
        call.first_byte_at = _now()
        call.bytes_out = len(body)
        call.status = upstream.status
        backend.served += 1
        return web.Response(status=upstream.status, body=body, headers=_returned_headers(upstream, call))
    finally:
        upstream.release()


async def _read(upstream: aiohttp.ClientResponse, backend: Backend) -> bytes:
    try:
        return await upstream.read()
    except BACKEND_ERRORS as exc:
        raise BackendFailed(backend, _describe(exc)) from None


async def _stream(call: Call, upstream: aiohttp.ClientResponse, backend: Backend) -> web.StreamResponse:
    """Relay chunks as they arrive; after the first byte, failures end the stream instead."""
    content = upstream.content
    try:
        chunk = await content.readany()
    except BACKEND_ERRORS as exc:
        raise BackendFailed(backend, _describe(exc)) from None
    response = web.StreamResponse(status=upstream.status, headers=_returned_headers(upstream, call))
    call.status = upstream.status
    call.first_byte_at = _now()
    request = call.request
    try:
        await response.prepare(request)
        while chunk:
            await response.write(chunk)
            call.bytes_out += len(chunk)
            call.chunks += 1
            try:
                chunk = await content.readany()
            except BACKEND_ERRORS as exc:
                backend.failed += 1
                call.error = f"backend {backend.name} failed mid-stream: {_describe(exc)}"
                await response.write(_sse_error(call.error))
                break
        else:
            backend.served += 1
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        call.client_disconnected = True
        upstream.close()  # stop the backend generating for nobody
    return response


def _sse_error(message: str) -> bytes:
    payload = {"error": {"message": message, "type": "server_error", "param": None, "code": "backend_failed"}}
    return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if str(exc) else text

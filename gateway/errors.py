"""OpenAI's error envelope: every error a client sees has this shape."""

from __future__ import annotations

import json

from aiohttp import web

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """An error the client should see, rendered in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "api_error")

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_response(self, headers: dict[str, str] | None = None) -> web.Response:
        if self.headers:
            headers = {**self.headers, **(headers or {})}
        return web.Response(
            status=self.status,
            body=json.dumps(self.envelope()).encode(),
            content_type="application/json",
            headers=headers,
        )


_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def in_anthropic_shape(response: web.Response) -> web.Response:
    """An error answer in Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``) for the
    Messages endpoints; one already in it (a backend that speaks Messages) is left as it is."""
    body = response.body
    try:
        data = json.loads(body) if isinstance(body, bytes) else None
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("type") == "error":
        return response
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or error)
    else:
        message = str(error or (body[:200].decode("utf-8", "replace") if isinstance(body, bytes) else "error"))
    kind = _ANTHROPIC_TYPE_BY_STATUS.get(response.status, "api_error")
    shaped = {"type": "error", "error": {"type": kind, "message": message}}
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")}
    return web.Response(
        status=response.status, body=json.dumps(shaped).encode(), content_type="application/json", headers=headers
    )

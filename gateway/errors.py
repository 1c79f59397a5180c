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

"""A test-only ``authenticate`` plugin: the bearer token spells the caller's identity.

``Authorization: Bearer alice,rpm=2,tpm=900,max_concurrency=1,priority=high`` is key
``alice`` with those limits; no token is an anonymous caller. The real ``auth`` plugin
issues and checks keys; limits only need an ``Identity``.
"""

from __future__ import annotations

from typing import Any

from gateway import hookimpl
from gateway.identity import Identity

INTS = ("rpm", "tpm", "max_concurrency")


def identity_of(token: str) -> Identity:
    name, *settings = token.split(",")
    fields: dict[str, Any] = {}
    for setting in settings:
        field, value = setting.split("=", 1)
        fields[field] = int(value) if field in INTS else value
    return Identity(key_id=f"id-{name}", name=name, **fields)


@hookimpl
def authenticate(request: Any) -> Identity | None:
    header = request.headers.get("Authorization", "")
    token = header.removeprefix("Bearer ").strip()
    return identity_of(token) if token and token != "anonymous" else None

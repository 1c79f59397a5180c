"""A test authenticate plugin: ``Authorization: Bearer <role>:<name>`` becomes an ``Identity`` with that role.

Stands in for the ``auth`` plugin (whose identities have the same shape) where a test needs a
readonly, host or user key; the secret never matters.
"""

from __future__ import annotations

from typing import Any

from gateway import hookimpl
from gateway.identity import ROLES, Identity


@hookimpl
def authenticate(request: Any) -> Identity | None:
    role, _, name = request.headers.get("Authorization", "").removeprefix("Bearer ").partition(":")
    return Identity(key_id=f"k-{name}", name=name, role=role) if role in ROLES and name else None

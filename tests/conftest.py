"""The suite's fixtures are the public ones of ``gateway.testing``; these names are re-exported for the tests."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("gateway.testing")

from gateway.testing import (  # noqa: E402
    ADMIN,
    ADMIN_KEY,
    FakeBackend,
    Reply,
    RunningGateway,
    StartBackend,
    StartGateway,
    closed_port_url,
    eventually,
)

pytest_plugins = ["gateway.testing"]

__all__ = [
    "ADMIN",
    "ADMIN_KEY",
    "FakeBackend",
    "Reply",
    "RunningGateway",
    "StartBackend",
    "StartGateway",
    "closed_port_url",
    "eventually",
]

"""The state one running gateway owns, shared by the core and handed to plugins."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.logs import get_logger
from gateway.plugins import Plugins
from gateway.registry import Registry


@dataclass(eq=False)
class Gateway:
    """Everything one running gateway owns; plugins receive it in ``startup``."""

    config: GatewayConfig
    plugins: Plugins
    registry: Registry
    log: Any = field(default_factory=lambda: get_logger("gateway"))
    admin_key: str = ""
    started_at: float = field(default_factory=time.time)
    requests_total: int = 0
    requests_failed: int = 0
    group_turns: dict[str, int] = field(default_factory=dict)
    _http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        """The one client session for backends: pooled, cookie-less, bytes passed through as-is."""
        if self._http is None:
            raise RuntimeError("the gateway has not started")
        return self._http


GATEWAY = web.AppKey("gateway", Gateway)

"""A test plugin, enabled as ``plugins: {tests.observer_plugin: {}}``: keeps every finished call."""

from __future__ import annotations

from typing import Any

from gateway import hookimpl


class Plugin:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    @hookimpl
    def request_complete(self, call: Any) -> None:
        self.calls.append(call)

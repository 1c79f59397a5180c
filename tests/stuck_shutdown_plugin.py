"""A test plugin, enabled as ``plugins: {tests.stuck_shutdown_plugin: {}}``: its shutdown never ends."""

from __future__ import annotations

import asyncio

from gateway import hookimpl


class Plugin:
    def __init__(self) -> None:
        self.stuck = False

    @hookimpl
    async def shutdown(self) -> None:
        self.stuck = True
        await asyncio.Event().wait()  # a store or a database that never answers

"""A fake backend in a process of its own, for the fault suite: ``python -m tests.faults.backend_proc PORT``.

``POST /_control`` with a JSON object sets the FakeBackend's fields (mode, delay, ...);
``GET /_control`` tells how many completions it has received.
"""

from __future__ import annotations

import sys

from aiohttp import web

from tests.fake_backend import FakeBackend


def main() -> None:
    backend = FakeBackend(models=["echo"])
    app = backend.app()

    async def control(request: web.Request) -> web.Response:
        if request.method == "POST":
            for key, value in (await request.json()).items():
                setattr(backend, key, value)
        return web.json_response({"seen": len(backend.seen), "mode": backend.mode})

    app.router.add_route("*", "/_control", control)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=lambda *_: None)


if __name__ == "__main__":
    main()

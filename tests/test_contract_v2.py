"""Hook contract v2: declared arguments only, YAML order, the new hooks, and plugins that fail."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import structlog

from gateway.app import create_app
from gateway.call import ms
from gateway.config import ConfigError
from gateway.state import GATEWAY
from tests.conftest import ADMIN, StartBackend, StartGateway, eventually
from tests.test_plugins import CHAT, _post, _problems, write_plugin


async def test_an_implementation_declares_only_the_arguments_it_uses(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    path = write_plugin(
        tmp_path,
        """
        from gateway import hookimpl
        seen = []

        @hookimpl
        def filter_candidates(candidates):
            return [b for b in candidates if b.name == "b1"]

        @hookimpl
        def register_strategies():
            return {"last_first": lambda candidates, call: list(reversed(candidates))}

        @hookimpl
        def request_complete():
            seen.append("done")
        """,
    )
    gateway = await start_gateway(await start_backend(), await start_backend(), plugins={path: None})
    status, _, headers = await _post(gateway.url)
    assert status == 200 and headers["X-Multiverse-Backend"] == "b1"
    assert gateway.state.plugins.pm.get_plugin(path).seen == ["done"]


def test_wrappers_are_refused_at_start_up_naming_the_plugin(tmp_path: Path) -> None:
    path = write_plugin(
        tmp_path,
        """
        from gateway import hookimpl

        @hookimpl(wrapper=True)
        def request_complete(call):
            yield
        """,
    )
    problems = _problems({"plugins": {path: None}}, tmp_path)
    assert f"plugins.{path}: request_complete is a wrapper" in problems and "plain @hookimpl" in problems


async def test_plugins_run_in_the_order_gateway_yaml_lists_them(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    order: list[str] = []
    sys.modules[__name__].ORDER = order  # type: ignore[attr-defined]
    source = """
        from gateway import hookimpl
        import tests.test_contract_v2 as t

        @hookimpl
        def before_request(call):
            t.ORDER.append("{name}")
        """
    first = write_plugin(tmp_path, source.replace("{name}", "first"), "zz_first.py")
    second = write_plugin(tmp_path, source.replace("{name}", "second"), "aa_second.py")
    gateway = await start_gateway(await start_backend(), plugins={first: None, second: None})
    await _post(gateway.url)
    assert order == ["first", "second"]


IDENTITY = """
    from gateway import hookimpl
    from gateway.errors import GatewayError
    seen = []

    @hookimpl
    def authenticate(request):
        name = request.headers.get("X-Student")
        if name is None:
            raise GatewayError(401, "send X-Student: <your name>")
        if name == "mallory":
            raise GatewayError(403, "mallory may not use this gateway")
        return {"name": name}

    @hookimpl
    def filter_models(identity, models):
        return [m for m in models if identity["name"] == "teacher" or m != "secret"]

    @hookimpl
    def request_complete(call):
        seen.append((call.identity, call.status))
"""


async def test_authenticate_identifies_or_refuses_before_the_body_is_read(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    path = write_plugin(tmp_path, IDENTITY)
    gateway = await start_gateway(await start_backend(models=["echo", "secret"]), plugins={path: None})
    module = gateway.state.plugins.pm.get_plugin(path)
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/chat/completions", data=b"not even json") as response:
            assert response.status == 401
            assert (await response.json())["error"]["message"] == "send X-Student: <your name>"
        headers = {"X-Student": "mallory"}
        async with session.post(gateway.base_url + "/chat/completions", json=CHAT, headers=headers) as response:
            assert response.status == 403 and (await response.json())["error"]["type"] == "permission_error"
        for who, listed in (("ada", ["echo"]), ("teacher", ["echo", "secret"])):
            async with session.get(gateway.base_url + "/models", headers={"X-Student": who}) as response:
                assert [m["id"] for m in (await response.json())["data"]] == listed
    client = openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key="x", max_retries=0, default_headers={"X-Student": "ada"}
    )
    reply = await client.chat.completions.create(model="echo", messages=CHAT["messages"])  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "hi"
    await client.close()
    assert module.seen[-1] == ({"name": "ada"}, 200)
    assert (None, 401) in module.seen  # observers see refusals too


ANSWERING = """
    from gateway import hookimpl
    from gateway.pump import ChunkSource
    counted, heard = [], []
    EVENTS = [
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"echo",'
        b'"choices":[{"index":0,"delta":{"content":"from"},"finish_reason":null}]}\\n\\n',
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"echo",'
        b'"choices":[{"index":0,"delta":{"content":" cache"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\\n\\n',
        b"data: [DONE]\\n\\n",
    ]

    class Plugin:
        @hookimpl
        def before_request(self, call):
            counted.append(call.request_id)
            call.on_chunk(heard.append)

        @hookimpl
        async def answer_request(self, call):
            if call.stream and call.json.get("user") == "cached":
                return ChunkSource(EVENTS)
            return None
"""


async def test_an_answering_plugin_never_skips_anothers_accounting_and_replays_a_stream(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    path = write_plugin(tmp_path, ANSWERING)
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins={"tests.observer_plugin": None, path: None})
    plugin = gateway.state.plugins.pm.get_plugin(path)
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="echo",
        messages=CHAT["messages"],
        stream=True,
        user="cached",  # type: ignore[arg-type]
    )
    pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    assert pieces == ["from", " cache"] and backend.seen == []
    module = sys.modules[type(plugin).__module__]
    assert len(module.counted) == 1 and b"".join(module.heard).endswith(b"data: [DONE]\n\n")
    call = gateway.state.plugins.pm.get_plugin("tests.observer_plugin").calls[-1]
    assert (call.status, call.chunks, call.usage["total_tokens"]) == (200, 3, 5)
    assert call.tags["answered_by"] == path
    await client.close()


async def test_plugin_routes_are_served_and_a_core_path_is_refused(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway, gateway_config: Any
) -> None:
    path = write_plugin(
        tmp_path,
        """
        from aiohttp import web
        from gateway import hookimpl
        from gateway.state import GATEWAY

        async def hello(request):
            return web.json_response({"backends": len(request.app[GATEWAY].registry.backends)})

        @hookimpl
        def register_routes(gateway):
            return [web.get("/hello", hello)]
        """,
    )
    gateway = await start_gateway(await start_backend(), plugins={path: None})
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/hello") as response:
        assert await response.json() == {"backends": 1}
    taken = write_plugin(
        tmp_path,
        """
        from aiohttp import web
        from gateway import hookimpl

        @hookimpl
        def register_routes():
            return [web.get("/v1/models", lambda request: None)]
        """,
        "taken.py",
    )
    with pytest.raises(ConfigError, match=r"GET /v1/models is already served by the gateway"):
        create_app(gateway_config(plugins={taken: None}))


async def test_backend_changes_reach_the_event_hook(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    path = write_plugin(
        tmp_path,
        """
        from gateway import hookimpl
        events = []

        @hookimpl
        def backend_status_changed(backend, event, reason):
            events.append((backend.name, event))
        """,
    )
    backend = await start_backend()
    gateway = await start_gateway(plugins={path: None, "health": {"interval": 0.05, "unhealthy_after": 1}}, backends=[])
    events = gateway.state.plugins.pm.get_plugin(path).events
    async with aiohttp.ClientSession(headers=ADMIN) as session:
        body = {"endpoint_url": backend.url, "name": "ada-gpu", "models": ["echo"]}
        async with session.post(gateway.url + "/admin/register", json=body) as response:
            registration = (await response.json())["registration_id"]
        await eventually(lambda: ("ada-gpu", "healthy") in events)
        async with session.put(gateway.url + f"/admin/register/{registration}", json={"weight": 2}) as response:
            assert response.status == 200
        async with session.delete(gateway.url + f"/admin/register/{registration}") as response:
            assert response.status == 200
    assert [e for e in events if e[1] != "healthy"] == [
        ("ada-gpu", "registered"), ("ada-gpu", "updated"), ("ada-gpu", "removed")
    ]  # fmt: skip


TABLES = """
    from gateway import hookimpl
    STEPS = {steps}

    class Plugin:
        @hookimpl
        async def startup(self, gateway):
            self.version = await gateway.registry.migrate("counter", STEPS)
            await gateway.registry.db.execute("INSERT INTO counter_hits (n) VALUES (?)", (len(STEPS),))
            await gateway.registry.db.commit()
            async with gateway.registry.db.execute("SELECT * FROM counter_hits") as cursor:
                self.rows = [tuple(row) for row in await cursor.fetchall()]
"""


async def test_a_plugin_keeps_its_own_tables_with_its_own_schema_version(
    tmp_path: Path, aiohttp_server: Any, gateway_config: Any
) -> None:
    one = ["CREATE TABLE counter_hits (n INTEGER NOT NULL)"]
    two = [*one, "ALTER TABLE counter_hits ADD COLUMN note TEXT DEFAULT 'v2'"]
    for steps, version, rows in ((one, 1, [(1,)]), (two, 2, [(1, "v2"), (2, "v2")]), (two, 2, None)):
        path = write_plugin(tmp_path, TABLES.replace("{steps}", repr(steps)), "counter.py")
        app = create_app(gateway_config(plugins={path: None}))
        server = await aiohttp_server(app)
        plugin = app[GATEWAY].plugins.pm.get_plugin(path)
        assert plugin.version == version
        if rows is not None:
            assert plugin.rows == rows
        await server.close()


BROKEN_ROUTING = """
    from gateway import hookimpl

    @hookimpl
    def register_strategies():
        return {"broken": lambda candidates, call: 1 / 0}

    @hookimpl
    def filter_candidates(candidates):
        raise KeyError("oops")
"""


async def test_a_strategy_or_filter_that_raises_is_routed_around_and_explained(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    path = write_plugin(tmp_path, BROKEN_ROUTING, "broken.py")
    gateway = await start_gateway(
        await start_backend(), await start_backend(), plugins={path: None}, routing={"strategy": "broken"}
    )
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            status, _, headers = await _post(gateway.url)
            assert status == 200 and headers["X-Multiverse-Route"] == "registry_order"
    failed = [e for e in logs if e["event"] == "plugin_failed"]
    assert {e["hook"] for e in failed} == {"filter_candidates", "strategy 'broken'"}
    assert all(e["plugin"] == path for e in failed)
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/route/explain", json=CHAT) as response,
    ):
        assert response.status == 500
        error = (await response.json())["error"]
    assert error["code"] == "plugin_failed" and f"plugin '{path}'" in error["message"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "route", "--explain", "--url", gateway.url, "--model", "echo", "hi",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 1 and b"Traceback" not in err and b"plugin_failed" not in out
    assert b"500: plugin '" in err and b"KeyError" in err


async def test_explain_is_a_dry_run_for_every_strategy_and_group(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backends = [await start_backend(models=["a", "b"]) for _ in range(2)]
    for routing in ({"strategy": "round_robin"}, {"strategy": "weighted"}, {"groups": {"both": ["a", "b"]}}):
        gateway = await start_gateway(*backends, routing=routing)
        model = "both" if "groups" in routing else "a"
        served = []
        for _ in range(4):
            async with aiohttp.ClientSession() as session:
                body = {**CHAT, "model": model}
                async with session.post(gateway.url + "/v1/route/explain", json=body) as response:
                    assert response.status == 200
            _, _, headers = await _post(gateway.url, {**CHAT, "model": model})
            served.append(headers["X-Multiverse-Backend" if "groups" not in routing else "X-Multiverse-Model"])
        assert len(set(served)) == 2, (routing, served)


async def test_a_background_job_that_raises_is_logged_and_goes_on(
    tmp_path: Path, aiohttp_server: Any, gateway_config: Any
) -> None:
    path = write_plugin(
        tmp_path,
        """
        from gateway import hookimpl
        runs = []

        async def job():
            runs.append(1)
            if len(runs) < 3:
                raise RuntimeError("flaky poller")

        async def dies():
            raise ValueError("a one-off task that dies")

        @hookimpl
        def startup(gateway):
            gateway.every(0.01, job, name="poller")
            gateway.start_task(dies(), name="one_off")
        """,
    )
    with structlog.testing.capture_logs() as logs:
        app = create_app(gateway_config(plugins={path: None}))
        server = await aiohttp_server(app)
        module = app[GATEWAY].plugins.pm.get_plugin(path)
        await eventually(lambda: len(module.runs) >= 5)
        await server.close()
    assert [e["task"] for e in logs if e["event"] == "task_failed"] == ["poller", "poller"]
    assert [e["task"] for e in logs if e["event"] == "task_died"] == ["one_off"]


async def test_a_built_in_strategy_is_enabled_by_naming_it(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(), routing={"strategy": "least_latency"}, plugins={})
    assert "least_latency" in gateway.state.plugins.sources
    status, _, headers = await _post(gateway.url)
    assert status == 200 and headers["X-Multiverse-Route"] == "least_latency"


def test_plugin_commands_join_the_cli(tmp_path: Path) -> None:
    import subprocess

    path = write_plugin(
        tmp_path,
        """
        from gateway import hookimpl

        def hello(args):
            print(f"hello {args.who}")
            return 3

        @hookimpl
        def register_commands(subparsers):
            command = subparsers.add_parser("hello", help="say hello")
            command.add_argument("who")
            command.set_defaults(func=hello)
        """,
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"plugins": {path: None}}))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "hello", "class"],
        capture_output=True, text=True, cwd=tmp_path, env={"PATH": "", "PYTHONPATH": str(Path.cwd())},
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (3, "hello class\n"), result.stderr


async def test_an_authenticate_plugin_that_raises_refuses_in_the_envelope(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    path = write_plugin(
        tmp_path,
        """
        from gateway import hookimpl

        @hookimpl
        def authenticate(request):
            return request.headers["X-Missing"]
        """,
    )
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins={path: None})
    with structlog.testing.capture_logs() as logs:
        status, body, _ = await _post(gateway.url)
    assert status == 500 and body["error"]["code"] == "authentication_failed"  # refused, not let in anonymous
    assert backend.seen == [] and [e["plugins"] for e in logs if e["event"] == "authenticate_failed"] == [[path]]


MIXED = """
    import asyncio
    from aiohttp import web
    from gateway import hookimpl
    from gateway.errors import GatewayError

    {name}_seen = []

    @hookimpl
    {kind}def authenticate(request):
        {pause}
        if request.headers.get("X-Fail") == "{name}":
            raise RuntimeError("a broken authenticate")
        return request.headers.get("X-Who-{name}")

    @hookimpl
    {kind}def before_request(call):
        {pause}
        {name}_seen.append(call.json.get("user"))
        if call.json.get("user") == "refuse-{name}":
            raise GatewayError(429, "refused by {name}", code="refused_by_{name}")
        if call.json.get("user") == "break-{name}":
            raise RuntimeError("a broken before_request")

    @hookimpl
    {kind}def answer_request(call):
        {pause}
        if call.json.get("user") == "answer-{name}":
            return web.json_response({{"from": "{name}", "who": call.identity}})
        return None
"""


@pytest.mark.parametrize("kinds", [("sync", "async", "sync"), ("async", "sync", "async")])
async def test_sync_and_async_implementations_mix_in_order(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway, kinds: tuple[str, ...]
) -> None:
    """Sync and async implementations of one hook, in any order: an async one is awaited in its turn and the
    rest still run after it; every plugin sees the call in order, a refusal or a failure from either kind
    counts, the first answer wins, and a failing authenticate refuses (never lets the caller in anonymous)."""
    paths = []
    for name, kind in zip("abc", kinds, strict=True):
        asynchronous = kind == "async"
        source = MIXED.format(
            name=name, kind="async " if asynchronous else "", pause="await asyncio.sleep(0)" if asynchronous else ""
        )
        paths.append(write_plugin(tmp_path, source, f"mixed_{name}.py"))
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins={path: None for path in paths})
    modules = [gateway.state.plugins.pm.get_plugin(path) for path in paths]

    async def post(user: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        url = gateway.url + "/v1/chat/completions"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json={**CHAT, "user": user}, headers=headers or {}) as reply,
        ):
            return reply.status, await reply.json()

    assert (await post("plain"))[0] == 200
    assert [getattr(m, f"{n}_seen") for m, n in zip(modules, "abc", strict=True)] == [["plain"]] * 3
    status, body = await post("refuse-b")
    assert (status, body["error"]["code"]) == (429, "refused_by_b")
    assert [len(getattr(m, f"{n}_seen")) for m, n in zip(modules, "abc", strict=True)] == [2, 2, 1]  # c never saw it
    with structlog.testing.capture_logs() as logs:
        status, _ = await post("break-a")
    assert status == 200 and [e["plugin"] for e in logs if e["event"] == "before_request_failed"] == [paths[0]]
    assert modules[2].c_seen == ["plain", "break-a"]  # the others still ran after a's failure
    for name in "bc":  # the first answer wins; one that answers None lets the next one answer
        status, body = await post(f"answer-{name}", {"X-Who-b": "bob", "X-Who-c": "carol"})
        assert (status, body) == (200, {"from": name, "who": "bob"})
    seen = len(backend.seen)
    with structlog.testing.capture_logs() as logs:
        status, body = await post("plain", {"X-Fail": "b"})
    assert (status, body["error"]["code"]) == (500, "authentication_failed") and len(backend.seen) == seen
    assert [e["event"] for e in logs].count("authenticate_failed") == 1


async def test_every_observer_reads_the_latency_the_client_got(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    """``call.latency`` stops when the client has its answer: an observer that reads it later (an async one,
    after a wait) reads what the first one and the request line read."""
    path = write_plugin(
        tmp_path,
        """
        import asyncio
        from gateway import hookimpl

        read = []

        @hookimpl
        async def request_complete(call):
            first = call.latency
            await asyncio.sleep(0.2)
            read.append((first, call.latency))
        """,
    )
    gateway = await start_gateway(await start_backend(), plugins={path: None})
    with structlog.testing.capture_logs() as logs:
        status, _, _ = await _post(gateway.url)
        assert status == 200
        module = gateway.state.plugins.pm.get_plugin(path)
        await eventually(lambda: module.read)
    [(first, later)] = module.read
    assert first == later < 0.2
    [line] = [e for e in logs if e["event"] == "request"]
    assert line["latency_ms"] == ms(first)
    explain = gateway.url + "/v1/route/explain"  # its refusals reach the observers without _finish
    async with aiohttp.ClientSession() as session, session.post(explain, data=b"not json") as reply:
        assert reply.status == 400
    await eventually(lambda: len(module.read) == 2)
    first, later = module.read[1]
    assert first == later < 0.2

"""The plugin system: finding plugins by name, their options, and every hook in the contract."""

from __future__ import annotations

import asyncio
import re
import textwrap
import types
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from gateway import hookspecs
from gateway.app import create_app
from gateway.config import ConfigError, parse
from gateway.plugins import Plugins, awaitable
from gateway.state import GATEWAY
from tests.conftest import StartBackend, StartGateway

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


def write_plugin(tmp_path: Path, source: str, name: str = "my_plugin.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


async def _post(url: str, body: dict[str, Any] = CHAT) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.post(url + "/v1/chat/completions", json=body) as response:
        return response.status, await response.json(), response.headers


# -- finding and configuring plugins ---------------------------------------------------------


def _problems(data: dict[str, Any], base: Path = ROOT) -> str:
    with pytest.raises(ConfigError) as caught:
        Plugins(parse(data, base_dir=base))
    return "\n".join(caught.value.problems)


def test_unknown_plugin_name_suggests_the_right_one() -> None:
    problems = _problems({"plugins": {"helth": {}}})
    assert "plugins.helth: no plugin named 'helth'; did you mean 'health'?" in problems


def test_plugin_options_are_validated_with_their_paths() -> None:
    problems = _problems({"plugins": {"health": {"interval": -1, "timout": 3, "path": "v1/models"}}})
    assert "plugins.health.interval: must be greater than 0, got -1" in problems
    assert "plugins.health.timout: unknown key; did you mean 'timeout'?" in problems
    assert "plugins.health.path: must start with '/'" in problems


def test_options_for_a_plugin_without_options_are_refused(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "from gateway import hookimpl\n")
    assert "this plugin takes no options; remove speed" in _problems({"plugins": {path: {"speed": 1}}})


def test_unknown_strategy_lists_the_available_ones() -> None:
    problems = _problems({"routing": {"strategy": "round_robbin"}})
    assert "routing.strategy: no strategy named 'round_robbin'; did you mean 'round_robin'?" in problems


def test_a_misspelt_hook_fails_at_start_up(tmp_path: Path) -> None:
    path = write_plugin(
        tmp_path,
        """
        from gateway import hookimpl
        @hookimpl
        def register_strategys():
            return {}
    """,
    )
    assert "unknown hook 'register_strategys'; did you mean 'register_strategies'?" in _problems(
        {"plugins": {path: None}}
    )


def test_a_strategy_name_offered_twice_is_refused(tmp_path: Path) -> None:
    path = write_plugin(
        tmp_path,
        """
        from gateway import hookimpl
        @hookimpl
        def register_strategies():
            return {"round_robin": lambda candidates, call: candidates}
    """,
    )
    assert f"plugins.{path}: strategy 'round_robin' is already offered by round_robin" in _problems(
        {"plugins": {path: None}}
    )


def test_a_plugin_file_that_fails_to_import_is_reported(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "import not_a_module_anywhere\n")
    assert "failed to import: ModuleNotFoundError" in _problems({"plugins": {path: None}})


def test_plugins_load_by_module_path_and_relative_file_path(tmp_path: Path) -> None:
    by_module = Plugins(
        parse({"plugins": {"plugins.examples.shortest_name": None}, "routing": {"strategy": "shortest_name"}})
    )
    assert by_module.sources["plugins.examples.shortest_name"] == "module"
    write_plugin(tmp_path, "from plugins.examples.shortest_name import register_strategies\n", "mine.py")
    by_file = Plugins(
        parse({"plugins": {"./mine.py": None}, "routing": {"strategy": "shortest_name"}}, base_dir=tmp_path)
    )
    assert by_file.sources["./mine.py"] == f"file {tmp_path / 'mine.py'}"


def test_plugins_load_from_an_installed_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "multiverse_fastest-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: multiverse-fastest\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[multiverse.plugins]\nfastest = fastest_plugin\n")
    write_plugin(
        tmp_path,
        """
        from gateway import hookimpl
        @hookimpl
        def register_strategies():
            return {"fastest": lambda candidates, call: candidates}
    """,
        "fastest_plugin.py",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = Plugins(parse({"plugins": {"fastest": None}, "routing": {"strategy": "fastest"}}))
    assert loaded.sources["fastest"] == "entry point of multiverse-fastest"
    listed = {info.name: info for info in loaded.describe(parse({}))}
    assert listed["fastest"].enabled and listed["fastest"].hooks == ("register_strategies",)
    assert not listed["health"].enabled and listed["health"].hooks == ("register_routes", "startup")


# -- the example strategies from docs/plugins.md ------------------------------------------


async def test_example_shortest_name_strategy_routes_to_the_shortest_name(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    long_named, short_named = await start_backend(), await start_backend()
    gateway = await start_gateway(
        backends=[{"name": "a-rather-long-name", "url": long_named.url, "models": ["echo"]},
                  {"name": "gpu1", "url": short_named.url, "models": ["echo"]}],
        plugins={str(ROOT / "plugins/examples/shortest_name.py"): None},
        routing={"strategy": "shortest_name"},
    )  # fmt: skip
    for _ in range(3):
        assert (await _post(gateway.url))[2]["X-Multiverse-Backend"] == "gpu1"


async def test_example_long_prompts_strategy(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    big, small = await start_backend(), await start_backend()
    gateway = await start_gateway(
        backends=[
            {"name": "big", "url": big.url, "models": ["echo"]},
            {"name": "small", "url": small.url, "models": ["echo"]},
        ],
        plugins={str(ROOT / "plugins/examples/long_prompts.py"): {"backend": "big", "min_chars": 100}},
        routing={"strategy": "long_prompts"},
    )
    long_chat = {"model": "echo", "messages": [{"role": "user", "content": "x " * 80}]}
    assert (await _post(gateway.url, long_chat))[2]["X-Multiverse-Backend"] == "big"
    assert (await _post(gateway.url))[2]["X-Multiverse-Backend"] == "small"


# -- every hook of the contract, through real plugins ----------------------------------------

OBSERVER = """
    import asyncio
    from aiohttp import web
    from gateway import hookimpl

    seen = []

    @hookimpl
    async def before_request(call):
        await asyncio.sleep(0)
        if call.json.get("user") == "rename":
            call.replace_json({**call.json, "model": "echo", "user": "renamed"})

    @hookimpl
    async def answer_request(call):
        await asyncio.sleep(0)
        if call.json.get("user") == "cached":
            return web.json_response({"from": "plugin"})
        return None

    @hookimpl
    def filter_candidates(call, candidates):
        if call.json.get("user") == "nobody":
            return []
        return [b for b in candidates if b.name != "b0"]

    @hookimpl
    async def request_complete(call):
        await asyncio.sleep(0)
        seen.append((call.status, call.backend.name if call.backend else None, len(call.attempts), call.error))

    @hookimpl
    def request_complete(call):
        raise RuntimeError("a broken observer")
"""


async def test_hooks_short_circuit_filter_observe(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    # two request_complete functions in one module: the second replaces the first, so split them
    source = OBSERVER.replace(
        """    @hookimpl
    def request_complete(call):
        raise RuntimeError("a broken observer")
""",
        "",
    )
    observer = write_plugin(tmp_path, source, "observer.py")
    broken = write_plugin(
        tmp_path,
        """
        from gateway import hookimpl
        @hookimpl
        def request_complete(call):
            raise RuntimeError("a broken observer")
    """,
        "broken.py",
    )
    b0, b1 = await start_backend(), await start_backend()
    gateway = await start_gateway(b0, b1, plugins={broken: None, observer: None})
    module = gateway.state.plugins.pm.get_plugin(observer)

    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            status, body, headers = await _post(gateway.url)
            assert status == 200 and headers["X-Multiverse-Backend"] == "b1"  # b0 filtered out
        status, body, _ = await _post(gateway.url, {**CHAT, "user": "cached"})
        assert (status, body) == (200, {"from": "plugin"})
        status, body, _ = await _post(gateway.url, {**CHAT, "user": "nobody"})
        assert status == 503 and "no backend may serve model 'echo'" in body["error"]["message"]
        status, _, _ = await _post(gateway.url, {**CHAT, "model": "alias", "user": "rename"})
        assert status == 200
    assert b0.seen == [] and len(b1.seen) == 4
    assert b'"user":"renamed"' in b1.seen[-1].body and b'"model":"echo"' in b1.seen[-1].body
    assert module.seen == [
        (200, "b1", 1, None), (200, "b1", 1, None), (200, "b1", 1, None),
        (200, None, 0, None),
        (503, None, 0, "no backend may serve model 'echo' for this request right now; try again later"),
        (200, "b1", 1, None),
    ]  # fmt: skip
    failures = [e for e in logs if e["event"] == "request_complete_failed"]
    assert len(failures) == 6 and all(e["plugin"] == broken for e in failures)


async def test_startup_and_shutdown_are_awaited(tmp_path: Path, aiohttp_server: Any, gateway_config: Any) -> None:
    path = write_plugin(
        tmp_path,
        """
        import asyncio
        from gateway import hookimpl
        events = []
        @hookimpl
        async def startup(gateway):
            await asyncio.sleep(0)
            events.append(("startup", gateway.http is not None))
        @hookimpl
        async def shutdown(gateway):
            await asyncio.sleep(0)
            events.append(("shutdown", gateway.registry is not None))
    """,
        "lifecycle.py",
    )
    app = create_app(gateway_config(plugins={path: None}))
    server = await aiohttp_server(app)
    module = app[GATEWAY].plugins.pm.get_plugin(path)
    assert module.events == [("startup", True)]
    await server.close()
    assert module.events == [("startup", True), ("shutdown", True)]


# -- the contract is documented and tested -------------------------------------------------


def _hook_names() -> list[str]:
    return [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "multiverse_spec")]


def test_every_hook_is_documented_in_plugins_md() -> None:
    docs = (ROOT / "docs/plugins.md").read_text()
    missing = [name for name in _hook_names() if not re.search(rf"^### `{name}", docs, re.MULTILINE)]
    assert not missing, f"hooks missing a '### `name`' section in docs/plugins.md: {missing}"


def test_every_hook_is_implemented_by_a_tested_plugin() -> None:
    sources = "".join(p.read_text() for p in [*(ROOT / "tests").glob("test_*.py"), *(ROOT / "plugins").rglob("*.py")])
    untested = [name for name in _hook_names() if not re.search(rf"def {name}\(", sources)]
    assert not untested, f"hooks no plugin or test implements: {untested}"


def test_awaitable_answers_as_inspect_does_for_every_kind_of_result() -> None:
    """The hook callers' quick check: a coroutine, an object with ``__await__`` and a generator-based coroutine
    are awaited; anything else is not, however often its type was seen before."""

    class Later:
        def __await__(self) -> Any:
            return iter(())

    async def coroutine() -> None:
        return None

    @types.coroutine
    def old_style() -> Any:
        yield

    def plain() -> Any:
        yield

    for _ in range(2):  # the second time, the types are known
        assert awaitable(Later()) and awaitable(old_style())
        assert not awaitable(plain()) and not awaitable("text") and not awaitable({"a": 1}) and not awaitable(3)
        pending = coroutine()
        assert awaitable(pending)
        pending.close()


async def test_first_answers_synchronously_until_an_implementation_is_async() -> None:
    """``Plugins.first`` (the request path's ``authenticate`` and ``answer_request``): a tuple at once while the
    implementations are synchronous; once one answers with a coroutine, that is awaited and the later ones
    still run in order if it answered None."""
    calls: list[str] = []

    def nothing(name: str) -> Any:
        calls.append(name)

    async def later(name: str, answer: Any) -> Any:
        calls.append(name)
        return answer

    sync_first = [("a", lambda x: nothing("a")), ("b", lambda x: f"b:{x}"), ("c", lambda x: nothing("c"))]
    assert Plugins.first(sync_first, 1) == ("b", "b:1") and calls == ["a"]
    assert Plugins.first([("a", lambda x: nothing("a"))], 1) is None
    calls.clear()
    mixed = [("a", lambda x: nothing("a")), ("b", lambda x: later("b", None)), ("c", lambda x: later("c", x * 2))]
    pending = Plugins.first(mixed, 21)
    assert not isinstance(pending, tuple) and awaitable(pending)
    assert await pending == ("c", 42) and calls == ["a", "b", "c"]
    assert await Plugins.call_first(mixed, 1) == ("c", 2)
    assert await Plugins.call_first([("b", lambda x: later("b", None))], 1) is None


async def test_first_goes_on_after_the_implementation_that_answered_later_even_in_a_list_with_repeats() -> None:
    """The continuation starts after the implementation whose awaitable answered None, by position: a list
    that holds the same (plugin, function) twice calls each entry once, in order."""
    calls: list[int] = []
    answers = iter([None, "later None", "third"])

    async def later(answer: Any) -> Any:
        return answer

    def counted(x: int) -> Any:
        calls.append(x)
        answer = next(answers)
        return answer if answer is None else later(None if answer == "later None" else answer)

    other = ("b", lambda x: calls.append(-x))
    assert await Plugins.call_first([("a", counted), other, ("a", counted)], 5) is None
    assert calls == [5, -5, 5]


async def test_a_plugin_whose_shutdown_never_ends_does_not_hold_the_gateways_stop(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    plugins = {"tests.stuck_shutdown_plugin": {}, "usage": {}}
    gateway = await start_gateway(await start_backend(), plugins=plugins, server={"shutdown_timeout": 0.3})
    stuck = gateway.state.plugins.pm.get_plugin("tests.stuck_shutdown_plugin")
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(gateway.server.close(), timeout=10)
    assert stuck.stuck
    [event] = [e for e in logs if e["event"] == "shutdown_failed"]
    assert event["plugin"] == "tests.stuck_shutdown_plugin" and "0.3 s" in event["reason"]

"""``multiverse status | models | servers | requests | health`` against a running gateway, as a person runs them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.cli_client import ago, duration
from tests.conftest import ADMIN_KEY, RunningGateway, StartBackend, StartGateway, closed_port_url


class Ran:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


async def cli(gateway: RunningGateway | str, *argv: str, key: str = ADMIN_KEY, cwd: Path | None = None) -> Ran:
    """``python -m gateway ARGV`` in a subprocess, with MULTIVERSE_URL and MULTIVERSE_KEY set; the gateway's
    loop keeps serving meanwhile."""
    url = gateway if isinstance(gateway, str) else gateway.url
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIVERSE_")}
    env |= {"MULTIVERSE_URL": url, "MULTIVERSE_KEY": key}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *argv, env=env, cwd=cwd or Path(__file__).parent,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def test_health_status_and_models_say_what_is_down(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    good = await start_backend(name="good")
    gateway = await start_gateway(
        good,
        backends=[{"name": "good", "url": good.url, "models": ["echo"]},
                  {"name": "gone", "url": closed_port_url(), "models": ["echo"]}],
        plugins={"health": {"interval": 3600, "unhealthy_after": 1}},
    )  # fmt: skip
    probed = await cli(gateway, "health")
    assert probed.code == 3, probed.err
    assert [line.split()[:2] for line in probed.out.splitlines()] == [
        ["NAME", "PROBE"],
        ["good", "healthy"],
        ["gone", "unhealthy"],
    ]
    assert "GET /v1/models failed" in probed.out
    only_good = await cli(gateway, "health", "good", "--json")
    assert only_good.code == 0 and [b["name"] for b in only_good.json()["backends"]] == ["good"]
    unknown = await cli(gateway, "health", "nosuch")
    assert unknown.code == 2 and "nosuch" in unknown.err and "good" in unknown.err
    status = await cli(gateway, "status")
    assert status.code == 3 and "gone  unhealthy  " in status.out and "1 healthy, 1 unhealthy" in status.out
    assert " ago " in status.out or "just now" in status.out  # since when, for people
    assert ADMIN_KEY not in status.out + status.err
    models = await cli(gateway, "models", "--json")
    assert models.code == 0
    assert models.json() == {
        "models": [{"model": "echo", "backends": [{"name": "good", "status": "healthy"},
                                                  {"name": "gone", "status": "unhealthy"}]}]
    }  # fmt: skip
    assert "1 of 2" in (await cli(gateway, "models")).out


async def test_servers_register_update_remove(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    lab = await start_backend()
    gateway = await start_gateway()
    registered = await cli(gateway, "servers", "register", lab.url, "--model", "echo", "--name", "lab-7")
    assert registered.code == 0 and "registered" in registered.out and "lab-7" in registered.out, registered.err
    updated = await cli(gateway, "servers", "update", "lab-7", "--weight", "2")
    assert updated.code == 0 and "weight" in updated.out, updated.err
    listed = await cli(gateway, "servers", "list", "--json")
    [server] = listed.json()["servers"]
    assert (server["name"], server["weight"]) == ("lab-7", 2.0)
    table = (await cli(gateway, "servers", "list")).out
    assert table.split()[:3] == ["ID", "NAME", "STATUS"] and "lab-7" in table
    assert (await cli(gateway, "servers", "remove", "lab-7")).code == 0
    again = await cli(gateway, "servers", "remove", "lab-7")
    assert again.code == 2 and "no backend named" in again.err
    nothing = await cli(gateway, "servers", "update", server["registration_id"])
    assert nothing.code == 2


async def test_requests_and_the_story_of_one(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    broken, good = await start_backend(mode="error", error_status=503), await start_backend()
    gateway = await start_gateway(broken, good, plugins={"requestlog": {}})
    reply = await gateway.post(
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": "user", "content": "hi there"}]},
        headers={"X-Request-ID": "told-1"},
    )
    assert reply.status == 200
    listed = await cli(gateway, "requests", "--since", "1h", "--status", "2xx")
    assert listed.code == 0, listed.err
    header, row = listed.out.splitlines()
    assert header.split()[:3] == ["WHEN", "REQUEST", "ID"] and "told-1" in row and "b0 http_error > b1 ok" in row
    assert "just now" in row or " s ago" in row
    story = await cli(gateway, "requests", "show", "told-1")
    assert story.code == 0, story.err
    lines = story.out.splitlines()
    assert lines[0].startswith("request told-1: ")
    [first] = [line for line in lines if "attempt 1" in line]
    assert "b0" in first and "http_error" in first and "HTTP 503" in first and "tried the next" in first
    [second] = [line for line in lines if "attempt 2" in line]
    assert "b1" in second and "answered 200" in second
    assert any("ok: answered by b1 (echo)" in line for line in lines)
    as_json = await cli(gateway, "requests", "show", "told-1", "--json")
    assert [a["outcome"] for a in as_json.json()["attempts"]] == ["http_error", "ok"]
    assert (await cli(gateway, "requests", "--status", "5xx", "--json")).json()["count"] == 0
    missing = await cli(gateway, "requests", "show", "never-sent")
    assert missing.code == 1 and "never-sent" in missing.err
    bad = await cli(gateway, "requests", "--since", "soon")
    assert bad.code == 2 and "1h" in bad.err


async def test_errors_are_one_line_with_a_meaningful_exit_code(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    nowhere = closed_port_url()
    down = await cli(nowhere, "status")
    assert down.code == 1 and down.out == ""
    [line] = down.err.splitlines()
    assert nowhere in line and "multiverse serve" in line
    gateway = await start_gateway(await start_backend())
    refused = await cli(gateway, "status", key="wrong-key-0123456789")
    assert refused.code == 2 and "admin key is not valid" in refused.err
    assert "wrong-key" not in refused.err
    no_log = await cli(gateway, "requests")
    assert no_log.code == 1 and "enabled" in no_log.err  # the requestlog plugin is not enabled here
    no_probes = await cli(gateway, "health")
    assert no_probes.code == 1 and "health plugin" in no_probes.err
    usage_error = await cli(gateway, "requests", "--limit", "many")
    assert usage_error.code == 2


COMMANDS = [["status"], ["models"], ["health"], ["requests"], ["requests", "show"], ["servers"], ["usage"], ["keys"]]
COMMANDS += [["servers", action] for action in ("list", "register", "update", "remove", "approve")]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_command_s_help_has_an_example(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "gateway.yaml").write_text("plugins: {auth: {}, usage: {}}\n")  # keys and usage are theirs
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MULTIVERSE_CONFIG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and "multiverse " + argv[0] in text.split("example")[1]
    if argv[0] not in ("keys", "usage", "servers") or len(argv) > 1:
        assert "--json" in text and "--url" in text and "$MULTIVERSE_URL" in text


def test_human_times() -> None:
    now = time.time()
    assert [ago(now - s, now) for s in (0.5, 42, 180, 5 * 3600, 2 * 86400)] == [
        "just now", "42 s ago", "3 min ago", "5 h ago", "2 d ago"
    ]  # fmt: skip
    assert ago(None) == "-" and ago(now + 60, now) == "in the future"
    assert [duration(ms) for ms in (12.4, 1234, 180_000, None)] == ["12 ms", "1.2 s", "3 min", "-"]

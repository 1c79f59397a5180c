"""Issue 9: `multiverse check-backend` against fake servers, and `POST /admin/register?check=true`."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.agent_process import ROOT
from tests.conftest import StartBackend, StartGateway
from tests.test_auth import call


async def check_backend(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "check-backend", *args, "--timeout", "10",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_a_conformant_server_passes_with_a_table_and_json(start_backend: StartBackend) -> None:
    backend = await start_backend(models=["tiny"], stream_usage=False)
    code, table = await check_backend(backend.url)
    assert code == 0, table
    assert "OK: ready to register" in table and "FAIL" not in table
    assert "WARN  stream usage" in table and "fix:" in table  # works, but the student learns what to improve
    code, text = await check_backend(backend.url + "/v1", "--model", "tiny", "--json")
    report = json.loads(text)
    checks = {c["check"]: c for c in report["checks"]}
    assert code == 0 and report["ok"] and checks["url"]["status"] == "warn" and report["url"] == backend.url
    for name in ("models", "chat json", "chat stream", "completions json", "completions stream", "usage"):
        assert checks[name]["status"] == "pass", checks[name]
    assert report["ttft_ms"] is not None


async def test_common_mistakes_fail_with_a_fix_each(start_backend: StartBackend) -> None:
    backend = await start_backend(models=["tiny"])
    code, table = await check_backend(backend.url, "--model", "llama-3")
    assert code == 1 and "FAIL  model name" in table and "fix: register the name /v1/models lists" in table
    broken = await start_backend(models=["tiny"], mode="garbage")
    code, table = await check_backend(broken.url)
    assert code == 1 and "FAIL  chat json" in table and "1 check(s) failed" not in table
    code, table = await check_backend("http://abc.trycloudflare.com")
    assert code == 1 and "FAIL  https" in table and "use the https:// URL the tunnel printed" in table


async def test_register_with_check_refuses_a_server_that_cannot_speak_the_protocol(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway()
    broken = await start_backend(models=["tiny"], mode="garbage")
    status, refused = await call("POST", gateway.url + "/admin/register?check=true", {"endpoint_url": broken.url})
    assert status == 400 and refused["error"]["code"] == "backend_not_conformant"
    assert "chat json: not an OpenAI 'chat.completion' object" in refused["error"]["message"]
    assert "fix:" in refused["error"]["message"] and gateway.state.registry.backends == {}
    good = await start_backend(models=["tiny"])
    status, answer = await call("POST", gateway.url + "/admin/register?check=true", {"endpoint_url": good.url})
    assert status == 201 and answer["models"] == ["tiny"]

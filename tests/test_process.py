"""The real `multiverse` processes: quick start, generated admin key, crash safety, redaction."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 5
) -> tuple[int, Any]:
    """One plain HTTP request with the standard library; returns status and parsed JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.log = cwd / f"proc-{time.monotonic_ns()}.log"
        self.handle = self.log.open("w")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIVERSE_")} | (env or {})
        self.popen = subprocess.Popen([sys.executable, "-m", "gateway", *args], cwd=cwd, stdout=self.handle,
                                      stderr=subprocess.STDOUT, env=full_env)  # fmt: skip

    def wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited: {self.output()}")
            try:
                if http("GET", url, timeout=1)[0] < 500:
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"not ready: {self.output()}")

    def output(self) -> str:
        self.handle.flush()
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(10)
        self.handle.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop(signal.SIGKILL)


def start_gateway(
    procs: list[Proc],
    tmp_path: Path,
    port: int,
    admin: str = "",
    env: dict[str, str] | None = None,
    server: str = "",
) -> Proc:
    config = tmp_path / "gateway.yaml"
    admin = "admin: {allow_private_backends: true" + (f", {admin}" if admin else "") + "}\n"
    config.write_text(f"server: {{port: {port}{server}}}\nstorage: {{sqlite: ./var/gw.db}}\n{admin}")
    proc = Proc(["serve", "--config", str(config)], tmp_path, env)
    procs.append(proc)
    proc.wait_ready(f"http://127.0.0.1:{port}/health")
    return proc


def test_quick_start_with_a_generated_admin_key(procs: list[Proc], tmp_path: Path) -> None:
    backend_port, port = free_port(), free_port()
    demo = Proc(["demo-backend", "--port", str(backend_port), "--model", "echo", "--delay", "0"], tmp_path)
    procs.append(demo)
    demo.wait_ready(f"http://127.0.0.1:{backend_port}/health")
    gateway = start_gateway(procs, tmp_path, port)

    key_file = tmp_path / "var" / "admin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert len(key) >= 32
    generated = [json.loads(line) for line in gateway.output().splitlines() if "admin_key_generated" in line]
    assert len(generated) == 1 and generated[0]["path"] == str(key_file)
    assert "X-API-Key" in generated[0]["how_to_use"]

    base = f"http://127.0.0.1:{port}"
    registration = {"endpoint_url": f"http://127.0.0.1:{backend_port}", "owner_name": "Ada"}
    status, created = http("POST", f"{base}/admin/register", registration, {"X-API-Key": key})
    assert status == 201, created
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-student-secret-value", max_retries=0)
    answer = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hello gateway"}])
    assert answer.choices[0].message.content == "hello gateway"

    log = gateway.output()
    assert key not in log and "sk-student-secret-value" not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    request_line = next(line for line in lines if line.get("event") == "request")
    assert request_line["model"] == "echo" and request_line["status"] == 200 and request_line["attempts"] == 1
    assert request_line["backend"] == created["name"] == f"backend-{created['registration_id'][:8]}"
    assert request_line["latency_ms"] > 0
    started = json.loads(next(line for line in log.splitlines() if "gateway_started" in line))
    assert started["event_loop"] == "uvloop"  # a dependency: the quick start runs on it

    gateway.stop()  # a restart keeps the key and the registration
    again = start_gateway(procs, tmp_path, port)
    assert "admin_key_generated" not in again.output()
    _, listed = http("GET", f"{base}/admin/servers", headers={"Authorization": f"Bearer {key}"})
    assert [s["owner_name"] for s in listed["servers"]] == ["Ada"]


def test_server_uvloop_false_runs_on_asyncios_loop(procs: list[Proc], tmp_path: Path) -> None:
    gateway = start_gateway(procs, tmp_path, free_port(), server=", uvloop: false")
    started = json.loads(next(line for line in gateway.output().splitlines() if "gateway_started" in line))
    assert started["event_loop"] == "asyncio"


def test_kill_9_during_registrations_loses_none_acknowledged(procs: list[Proc], tmp_path: Path) -> None:
    port = free_port()
    key = "k" * 24
    gateway = start_gateway(
        procs, tmp_path, port, env={"MULTIVERSE_ADMIN_KEY": key}, admin='api_key: "${MULTIVERSE_ADMIN_KEY}"'
    )
    base, acknowledged = f"http://127.0.0.1:{port}", []
    for i in range(60):
        body = {"endpoint_url": f"http://127.0.0.1:{20000 + i}", "model_name": "m"}  # never contacted
        if i == 40:
            gateway.popen.send_signal(signal.SIGKILL)
        try:
            status, created = http("POST", f"{base}/admin/register", body, {"X-API-Key": key}, timeout=2)
        except OSError:
            break
        assert status == 201
        acknowledged.append(created["registration_id"])
    gateway.popen.wait(10)
    assert len(acknowledged) == 40
    start_gateway(procs, tmp_path, port, env={"MULTIVERSE_ADMIN_KEY": key}, admin='api_key: "${MULTIVERSE_ADMIN_KEY}"')
    _, listed = http("GET", f"{base}/admin/servers", headers={"X-API-Key": key})
    assert {s["registration_id"] for s in listed["servers"]} == set(acknowledged)


def test_a_short_admin_key_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("admin: {api_key: short}\n")
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "gateway.yaml")],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "admin.api_key: the admin key is 5 characters; it must be at least 16" in result.stderr
    assert "Traceback" not in result.stderr

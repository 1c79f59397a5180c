"""`multiverse serve` as a process: a port in use, the start-up line, and a graceful drain on signals."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_process import Proc, free_port


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop(signal.SIGKILL)


def _config(tmp_path: Path, port: int, backend_port: int | None = None, extra: str = "") -> Path:
    backends = (
        f"backends: [{{name: demo, url: 'http://127.0.0.1:{backend_port}', models: [echo]}}]\n" if backend_port else ""
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"server: {{port: {port}{extra}}}\nstorage: {{sqlite: ./var/gw.db}}\n"
        f"admin: {{api_key: '{'k' * 24}'}}\n{backends}"
    )
    return path


def _demo(procs: list[Proc], tmp_path: Path, delay: float) -> int:
    port = free_port()
    demo = Proc(["demo-backend", "--port", str(port), "--model", "echo", "--delay", str(delay)], tmp_path)
    procs.append(demo)
    demo.wait_ready(f"http://127.0.0.1:{port}/health")
    return port


def _wait_for(proc: Proc, text: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.output():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in output: {proc.output()}")
        time.sleep(0.02)


def _open_stream(port: int, words: int) -> http.client.HTTPResponse:
    """Start a streamed chat completion and read its first event."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": " ".join(["w"] * words)}]}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return response


def test_a_port_in_use_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(_config(tmp_path, port))],
            capture_output=True, text=True, timeout=30, cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"multiverse: port {port} is already in use on 127.0.0.1 (another gateway?); "
        "pick another with --port or server.port in gateway.yaml"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "var").exists()  # nothing started: no database was created


def test_bound_to_all_addresses_it_lists_usable_urls_and_warns(procs: list[Proc], tmp_path: Path) -> None:
    port = free_port()
    proc = Proc(["serve", "--config", str(_config(tmp_path, port)), "--host", "0.0.0.0"], tmp_path)
    procs.append(proc)
    proc.wait_ready(f"http://127.0.0.1:{port}/health")
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    started = next(line for line in lines if line["event"] == "gateway_started")
    urls = started["openai_base_urls"]
    assert urls[0] == f"http://127.0.0.1:{port}/v1"
    assert all(u.endswith(f":{port}/v1") and "0.0.0.0" not in u for u in urls)
    warning = next(line for line in lines if line["event"] == "gateway_reachable_from_network")
    assert warning["level"] == "warning"
    assert "anyone who can reach this port can use the models" in warning["message"]


def test_on_loopback_there_is_no_network_warning(procs: list[Proc], tmp_path: Path) -> None:
    port = free_port()
    proc = Proc(["serve", "--config", str(_config(tmp_path, port))], tmp_path)
    procs.append(proc)
    proc.wait_ready(f"http://127.0.0.1:{port}/health")
    assert f'"openai_base_urls":["http://127.0.0.1:{port}/v1"]' in proc.output()
    assert "gateway_reachable_from_network" not in proc.output()


def test_with_client_authentication_there_is_no_network_warning(procs: list[Proc], tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "who.py").write_text(
        "from gateway import hookimpl\n\n@hookimpl\ndef authenticate(request):\n    return None\n"
    )
    config = _config(tmp_path, port)
    config.write_text(config.read_text() + "plugins: {./who.py: {}}\n")
    proc = Proc(["serve", "--config", str(config), "--host", "0.0.0.0"], tmp_path)
    procs.append(proc)
    proc.wait_ready(f"http://127.0.0.1:{port}/health")
    assert "gateway_started" in proc.output() and "gateway_reachable_from_network" not in proc.output()


def test_sigterm_lets_a_stream_in_flight_finish(procs: list[Proc], tmp_path: Path) -> None:
    backend_port, port = _demo(procs, tmp_path, delay=0.05), free_port()
    proc = Proc(["serve", "--config", str(_config(tmp_path, port, backend_port))], tmp_path)
    procs.append(proc)
    proc.wait_ready(f"http://127.0.0.1:{port}/health")
    stream = _open_stream(port, words=12)  # about 0.6 s of stream left
    proc.popen.send_signal(signal.SIGTERM)
    _wait_for(proc, "draining 1 request (again to force)")
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    rest = stream.read().decode()
    assert rest.rstrip().endswith("data: [DONE]") and "event: error" not in rest
    assert proc.popen.wait(10) == 0
    assert "Traceback" not in proc.output() and "gateway_stopped" in proc.output()


def test_a_second_signal_ends_open_streams_with_an_error_event(procs: list[Proc], tmp_path: Path) -> None:
    backend_port, port = _demo(procs, tmp_path, delay=0.1), free_port()
    proc = Proc(["serve", "--config", str(_config(tmp_path, port, backend_port))], tmp_path)
    procs.append(proc)
    proc.wait_ready(f"http://127.0.0.1:{port}/health")
    stream = _open_stream(port, words=100)  # 10 s: only a forced stop ends it soon
    started = time.monotonic()
    proc.popen.send_signal(signal.SIGINT)
    _wait_for(proc, "draining 1 request (again to force)")
    proc.popen.send_signal(signal.SIGTERM)
    rest = stream.read().decode()
    assert time.monotonic() - started < 5
    assert "data: [DONE]" not in rest
    event, data = rest.splitlines()[-3:-1]  # the last event, then its blank line
    assert event == "event: error"
    error = json.loads(data.removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "shutting down" in error["message"]
    assert proc.popen.wait(10) == 0
    output = proc.output()
    assert "shutdown_forced" in output
    assert "Traceback" not in output and "InvalidStateError" not in output


def test_shutdown_timeout_bounds_the_drain(procs: list[Proc], tmp_path: Path) -> None:
    backend_port, port = _demo(procs, tmp_path, delay=0.1), free_port()
    config = _config(tmp_path, port, backend_port, extra=", shutdown_timeout: 0.3")
    proc = Proc(["serve", "--config", str(config)], tmp_path)
    procs.append(proc)
    proc.wait_ready(f"http://127.0.0.1:{port}/health")
    stream = _open_stream(port, words=100)
    proc.popen.send_signal(signal.SIGTERM)
    assert "event: error" in stream.read().decode()
    assert proc.popen.wait(10) == 0
    assert "Traceback" not in proc.output()

"""``server.workers``: real processes sharing one port, one database and one drain."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import openai

from tests.test_process import Proc, free_port, http, procs  # noqa: F401  (procs is a fixture)


def _workers_of(parent: Proc) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent.popen.pid)], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_two_workers_share_the_port_the_registrations_and_the_drain(procs: list[Proc], tmp_path: Path) -> None:  # noqa: F811
    backend_port, port = free_port(), free_port()
    demo = Proc(["demo-backend", "--port", str(backend_port), "--model", "echo", "--delay", "0.05"], tmp_path)
    procs.append(demo)
    demo.wait_ready(f"http://127.0.0.1:{backend_port}/health")
    key = "workers-admin-key-0123456789"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"server: {{port: {port}, workers: 2}}\nstorage: {{sqlite: ./var/gw.db}}\n"
        f"admin: {{allow_private_backends: true, api_key: {key}}}\n"
    )
    gateway = Proc(["serve", "--config", str(config)], tmp_path)
    procs.append(gateway)
    gateway.wait_ready(f"http://127.0.0.1:{port}/health")
    deadline = time.monotonic() + 15  # the other worker may still be starting
    while gateway.output().count('"gateway_started"') < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway.output().count('"gateway_started"') == 2, gateway.output()
    assert len(_workers_of(gateway)) == 2

    base = f"http://127.0.0.1:{port}"
    registration = {"endpoint_url": f"http://127.0.0.1:{backend_port}"}
    status, created = http("POST", f"{base}/admin/register", registration, {"X-API-Key": key})
    assert status == 201, created
    time.sleep(1.0)  # every worker reloads the registry within 0.5 s
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    # each urllib request is a new connection: the kernel spreads them over both workers
    answers = [http("POST", f"{base}/v1/chat/completions", chat)[0] for _ in range(24)]
    assert answers == [200] * 24

    second_gateway = Proc(["serve", "--config", str(config)], tmp_path)  # cannot join the first one's port
    assert second_gateway.popen.wait(20) == 2
    assert "already in use" in second_gateway.output()

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    words = " ".join(f"w{i}" for i in range(20))  # 20 tokens, 50 ms apart: a second of stream
    streamed: list[str] = []

    def stream() -> None:
        chunks = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": words}], stream=True
        )
        streamed.extend(c.choices[0].delta.content or "" for c in chunks if c.choices)

    reader = threading.Thread(target=stream)
    reader.start()
    time.sleep(0.3)
    gateway.popen.send_signal(signal.SIGTERM)
    reader.join(10)
    assert "".join(streamed).split() == words.split()  # the stream in flight finished
    assert gateway.popen.wait(10) == 0
    assert gateway.output().count('"gateway_stopped"') == 2

"""Several gateway processes behind one port: with PROMETHEUS_MULTIPROC_DIR, any one's scrape adds all of them up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from plugins._metric_set import MetricSet

ROOT = Path(__file__).resolve().parent.parent

# One gateway process: the metrics plugin records ``requests`` real Calls and one refresh of the gauges.
GATEWAY_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from aiohttp.test_utils import make_mocked_request
    from gateway.app import create_app
    from gateway.call import Call
    from gateway.config import parse
    from gateway.state import GATEWAY

    async def main(folder: str, requests: int) -> None:
        config = parse({
            "storage": {"sqlite": f"{folder}/gateway.db"},
            "admin": {"api_key": "test-admin-key-0123456789"},
            "backends": [{"name": "gpu", "url": "http://127.0.0.1:9", "models": ["echo"]}],
            "plugins": {"metrics": {}},
        }, base_dir=Path(folder))
        gateway = create_app(config)[GATEWAY]
        await gateway.registry.open()
        plugin = gateway.plugins.pm.get_plugin("metrics")
        plugin.startup(gateway)
        backend = gateway.registry.backends["config:gpu"]
        request = make_mocked_request("POST", "/v1/chat/completions")
        for _ in range(requests):
            call = Call(gateway, request, "r", "chat/completions", b"{}", {"model": "echo"})
            call.status, call.backend, call.route = 200, backend, "round_robin"
            call.usage = {"prompt_tokens": 10, "completion_tokens": 4}
            plugin.request_complete(call)
        backend.in_flight = requests
        await plugin.refresh()
        await gateway.registry.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def test_two_gateway_processes_sharing_a_multiproc_dir_are_added_up(tmp_path: Path) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared), "PYTHONPATH": str(ROOT)}
    for requests, folder in ((2, "one"), (3, "two")):
        (tmp_path / folder).mkdir()
        done = subprocess.run(
            [sys.executable, "-c", GATEWAY_PROCESS, str(tmp_path / folder), str(requests)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    assert len(list(shared.glob("counter_*.db"))) == 2, "one file per process"

    text = MetricSet(str(shared)).exposition().decode()  # what GET /metrics of either process answers
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["multiverse_requests"].samples if s.name == "multiverse_requests_total"]
    assert [(s.labels["model"], s.labels["backend"], s.value) for s in requests] == [("echo", "gpu", 5.0)]
    tokens = {s.labels["type"]: s.value for s in families["multiverse_tokens"].samples if s.name.endswith("_total")}
    assert tokens == {"input": 50.0, "output": 20.0}
    in_flight = [s.value for s in families["multiverse_backend_in_flight"].samples]
    assert in_flight == [5.0], "in flight is summed over the processes"
    up = [s.value for s in families["multiverse_backend_up"].samples]
    assert up == [1.0], "a backend's state is the most recent any process saw, not a sum"


def test_a_multiproc_dir_that_does_not_exist_is_a_start_up_error(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing"), "PYTHONPATH": str(ROOT)}
    code = "from plugins.metrics import Plugin; Plugin()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "is not a folder; create it (empty) before starting the gateways" in done.stderr


def test_the_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    import json
    import re

    assert MetricSet().registry is not None
    families = {metric.name for metric in MetricSet().registry.collect()}
    dashboard = json.loads((ROOT / "config/grafana/multiverse.json").read_text())
    used = {
        re.sub(r"_(bucket|sum|count|total)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(?:multiverse|gen_ai)_[a-z_]+", target["expr"])
    }
    used -= {"gen_ai_request_model", "gen_ai_token_type", "gen_ai_operation_name"}  # labels, not metrics
    assert used and used <= families, used - families
    assert len(used) >= 15

"""The metrics plugin: real traffic through a real gateway, then GET /metrics parsed as Prometheus parses it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN, RunningGateway, StartBackend, StartGateway, eventually

KEYS = "tests.keys_plugin"


async def scrape(gateway: RunningGateway, headers: dict[str, str] | None = None) -> dict[str, Any]:
    reply = await gateway.get("/metrics", headers=headers)
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(reply.body.decode())}


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    """The sum of the samples named ``sample_name`` whose labels include ``labels``."""
    family_name = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    family_name = family_name.removesuffix("_bucket")
    samples = [
        s
        for s in families[family_name].samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert samples, f"no sample {sample_name} with {labels}"
    return float(sum(s.value for s in samples))


def label_values(families: dict[str, Any], family: str, label: str) -> set[str]:
    return {s.labels[label] for s in families[family].samples if label in s.labels}


async def test_failover_cache_tokens_timings_and_bounded_labels(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    broken = await start_backend(name="broken", mode="error")
    good = await start_backend(name="good", chunks=5)
    gateway = await start_gateway(broken, good, plugins={"metrics": {}, "cache": {}, "usage": {}})
    for _ in range(2):  # round robin: one of the two starts at the broken backend and fails over
        assert (await gateway.chat("hello there")).backend == "good"
    for _ in range(2):  # a deterministic request: a miss, then a hit
        assert (await gateway.chat("cached", temperature=0)).status == 200
    assert (await gateway.chat("stream me", stream=True)).status == 200
    for i in range(100):  # a hundred made-up model names are one label value
        assert (await gateway.chat("x", model=f"bogus-{i}")).status >= 400

    families = await scrape(gateway)
    assert value(families, "multiverse_requests_total", model="echo", backend="good", status="200") == 4
    assert value(families, "multiverse_requests_total", model="echo", backend="none", status="200") == 1  # the hit
    assert value(families, "multiverse_requests_total", route="round_robin", key="anonymous") >= 3
    assert label_values(families, "multiverse_requests", "model") == {"echo", "other"}
    assert value(families, "multiverse_requests_total", model="other") == 100
    assert value(families, "multiverse_failovers_total", model="echo") == len(broken.seen) >= 1
    assert value(families, "multiverse_cache_requests_total", result="hit") == 1
    assert value(families, "multiverse_cache_requests_total", result="miss") == 1
    assert value(families, "multiverse_cache_requests_total", result="bypass") >= 3
    chat = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "echo"}
    assert value(families, "gen_ai_server_request_duration_seconds_count", **chat) == 5
    assert value(families, "gen_ai_server_time_to_first_token_seconds_count", **chat) == 1
    assert value(families, "gen_ai_server_time_per_output_token_seconds_count", **chat) >= 3
    assert 0 < value(families, "gen_ai_server_time_per_output_token_seconds_sum", **chat) < 5
    assert value(families, "gen_ai_client_token_usage_count", gen_ai_token_type="input", **chat) == 5
    inputs = {"gen_ai_token_type": "input", **chat}  # prompts of 2, 2, 1, 1 (the hit) and 2 words: le is inclusive
    assert value(families, "gen_ai_client_token_usage_bucket", le="1.0", **inputs) == 2
    assert value(families, "gen_ai_client_token_usage_bucket", le="4.0", **inputs) == 5
    assert value(families, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", **chat) >= 5
    assert value(families, "multiverse_tokens_total", model="echo", key="anonymous", type="output") >= 5
    overhead = value(families, "multiverse_gateway_overhead_seconds_count")
    assert overhead == 4  # the relayed calls (the cache hit never reached a backend)
    assert 0 < value(families, "multiverse_gateway_overhead_seconds_sum") < 4 * 0.5
    assert value(families, "multiverse_backend_up", backend="broken") == 1  # no health plugin: not known down
    assert value(families, "multiverse_backend_in_flight", backend="good") == 0


async def test_a_stream_resumed_after_a_mid_stream_failure(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    dying = await start_backend(mode="die_after", chunks=6, die_after=2)
    healthy = await start_backend(chunks=6)
    gateway = await start_gateway(dying, healthy, plugins={"metrics": {}}, routing={"resume_streams": True})
    reply = await gateway.chat("go", stream=True)
    assert reply.status == 200 and b"w5" in reply.body
    families = await scrape(gateway)
    assert value(families, "multiverse_resumed_streams_total", model="echo") == 1
    assert [s.name for s in families["multiverse_failovers"].samples] == [], "a resumption is not a failover"
    assert value(families, "multiverse_requests_total", backend="b1", status="200") == 1


async def test_rate_limit_rejections_queue_length_and_queue_wait(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    slow = await start_backend(latency=0.4)
    backends = [{"name": "slow", "url": slow.url, "models": ["echo"], "max_concurrency": 1}]
    plugins = {KEYS: None, "metrics": {"require_key": False}, "ratelimit": {"max_queue_wait": 10}}
    gateway = await start_gateway(backends=backends, plugins=plugins)
    headers = {"Authorization": "Bearer alice,rpm=3"}
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    first = asyncio.create_task(gateway.post("/v1/chat/completions", body, headers))
    await eventually(lambda: slow.seen != [])
    second = asyncio.create_task(gateway.post("/v1/chat/completions", body, headers))
    ratelimit = gateway.state.plugins.pm.get_plugin("ratelimit")
    await eventually(lambda: ratelimit.queued() == {"echo": 1})
    families = await scrape(gateway)
    assert value(families, "multiverse_backend_queue_length", backend="slow") == 1
    assert value(families, "multiverse_backend_in_flight", backend="slow") == 1
    assert (await first).status == (await second).status == 200
    assert (await gateway.post("/v1/chat/completions", body, headers)).status == 200
    refused = await gateway.post("/v1/chat/completions", body, headers)  # the fourth in a minute, rpm=3
    assert refused.status == 429
    families = await scrape(gateway)
    assert value(families, "multiverse_rejections_total", reason="rate_limit_exceeded", key="alice") == 1
    assert value(families, "multiverse_requests_total", status="429", key="alice", backend="none") == 1
    assert value(families, "multiverse_queue_wait_seconds_count", model="echo") == 1
    assert value(families, "multiverse_queue_wait_seconds_sum", model="echo") > 0.1


async def test_a_backend_going_down_its_probe_time_and_an_open_circuit(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    down = await start_backend(name="down")
    broken = await start_backend(name="broken", mode="error")
    good = await start_backend(name="good")
    plugins = {
        "metrics": {"refresh_interval": 0.1},
        "health": {"interval": 0.1, "unhealthy_after": 1},
        "circuit_breaker": {"consecutive_failures": 1},
    }
    gateway = await start_gateway(down, broken, good, plugins=plugins)
    registry = gateway.state.registry
    await eventually(lambda: all(b.status == "healthy" for b in registry.backends.values()))
    down.models_status = 503
    await eventually(lambda: registry.backends["config:down"].status == "unhealthy")
    for _ in range(2):  # one of them tries the broken backend first: its circuit opens
        assert (await gateway.chat("hi")).backend == "good"
    families = await scrape(gateway)
    assert value(families, "multiverse_backend_up", backend="down") == 0
    assert value(families, "multiverse_backend_status", backend="down", status="unhealthy") == 1
    assert value(families, "multiverse_backend_status", backend="down", status="healthy") == 0
    assert value(families, "multiverse_backend_up", backend="good") == 1
    assert 0 < value(families, "multiverse_health_probe_duration_seconds", backend="good") < 5
    assert value(families, "multiverse_backend_circuit_state", backend="broken", endpoint="chat/completions") == 2


async def test_metrics_are_open_by_default_and_can_demand_the_admin_key(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    open_gateway = await start_gateway(backend, plugins={"metrics": {}})
    assert "multiverse_requests" in await scrape(open_gateway)
    closed = await start_gateway(backend, plugins={"metrics": {"require_key": True}})
    async with aiohttp.ClientSession() as session, session.get(closed.url + "/metrics") as response:
        assert response.status == 401
        error = (await response.json())["error"]
        assert error["code"] == "invalid_admin_key" and "X-API-Key" in error["message"]
    assert "multiverse_backend_up" in await scrape(closed, headers=ADMIN)
    with_keys = await start_gateway(backend, plugins={"auth": {}, "metrics": {}})  # key names in labels: closed
    async with aiohttp.ClientSession() as session, session.get(with_keys.url + "/metrics") as response:
        assert response.status == 401
    assert "multiverse_backend_up" in await scrape(with_keys, headers=ADMIN)


async def test_a_model_registered_through_another_gateway_gets_its_own_label(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    """Workers share one database: a registration made through one reaches the other by reload, which
    announces nothing; its metrics still learn the model (at the next refresh), not count it as 'other'."""
    backend = await start_backend(models=["late-model"])
    plugins = {"metrics": {"refresh_interval": 0.2}}
    first, second = await start_gateway(backends=[], plugins=plugins), await start_gateway(backends=[], plugins=plugins)
    reply = await first.post("/admin/register", {"endpoint_url": backend.url}, headers=ADMIN)
    assert reply.status == 201
    await eventually(lambda: bool(second.state.registry.for_model("late-model")), timeout=2)
    metrics = second.state.plugins.pm.get_plugin("metrics")
    await eventually(lambda: "late-model" in metrics.models, timeout=2)
    assert (await second.chat("hi", model="late-model")).status == 200
    families = await scrape(second)
    assert value(families, "multiverse_requests_total", model="late-model", status="200") == 1
    assert "other" not in label_values(families, "multiverse_requests", "model")

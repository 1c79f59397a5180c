"""gateway.yaml: every problem reported by its path with a hint; env interpolation; the schema."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load, parse
from gateway.plugins import config_schema

ROOT = Path(__file__).resolve().parent.parent


def _problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    return caught.value.problems


def test_every_problem_is_listed_with_its_path() -> None:
    problems = _problems({
        "server": {"prot": 80},
        "routing": {"max_attempts": "three", "stall_timeout": 0},
        "backends": [{"name": "a", "url": "ftp://x", "models": []}, {"name": "a", "url": "http://h", "models": ["m"]}],
        "logging": {"level": "verbose"},
        "admin": {"api_key": "too-short"},
    })  # fmt: skip
    assert problems == [
        "server.prot: unknown key; did you mean 'port'?",
        "routing.max_attempts: expected integer, got str 'three'",
        "routing.stall_timeout: must be greater than 0, got 0.0",
        "backends[0].url: must be an http:// or https:// URL with a host, got 'ftp://x'",
        "backends[0].models: must list at least one model name",
        "logging.level: must be one of 'debug', 'info', 'warning', 'error', got 'verbose'",
        "admin.api_key: the admin key is 9 characters; it must be at least 16"
        " (or leave it unset and the gateway generates one)",
    ]


def test_unknown_top_level_key_suggests_the_right_one() -> None:
    assert _problems({"routeing": {}}) == ["routeing: unknown key; did you mean 'routing'?"]
    assert _problems({"zzz": 1})[0].startswith("zzz: unknown key; known keys: server, storage, admin")


def test_duplicate_backend_names_are_refused() -> None:
    backend = {"name": "gpu", "url": "http://h:1", "models": ["m"]}
    assert _problems({"backends": [backend, backend]}) == [
        "backends[1].name: 'gpu' is used twice; names must be unique"
    ]


def test_environment_variables_are_interpolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MV_KEY", "k" * 20)
    monkeypatch.setenv("MV_PORT_HOST", "gpu7")
    monkeypatch.delenv("MV_UNSET", raising=False)
    config = parse({
        "admin": {"api_key": "${MV_KEY}"},
        "backends": [{"name": "x", "url": "http://${MV_PORT_HOST}:${MV_UNSET:-8801}", "models": ["m"]}],
    })  # fmt: skip
    assert config.admin.api_key == "k" * 20
    assert config.backends[0].url == "http://gpu7:8801"
    assert parse({"admin": {"api_key": "${MV_UNSET}"}}).admin.api_key is None


def test_yaml_syntax_errors_give_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: [8000\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert "not valid YAML at line 3" in caught.value.problems[0]


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "gateway.yaml"
    path.parent.mkdir()
    path.write_text("storage: {sqlite: ./data/gw.db}\n")
    config = load(path)
    assert config.database_path == tmp_path / "sub" / "data" / "gw.db"
    assert config.admin_key_path == tmp_path / "sub" / "data" / "admin.key"


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_check_config_lists_problems_and_exits_non_zero(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("routing: {strategy: fastest}\nplugins: {helth: {}}\n")
    result = _cli("check-config", str(path))
    assert result.returncode == 2
    assert "plugins.helth: no plugin named 'helth'; did you mean 'health'?" in result.stderr


@pytest.mark.parametrize(
    "path", ["gateway.yaml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "config").glob("*.yaml"))]
)
def test_shipped_configs_are_valid(path: str) -> None:
    result = _cli("check-config", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: OK"


def test_schema_file_matches_the_config_model() -> None:
    committed = json.loads((ROOT / "config/gateway.schema.json").read_text())
    assert committed == config_schema(), "config/gateway.schema.json is stale: run `make schema`"
    assert committed["properties"]["routing"]["properties"]["max_attempts"]["default"] == 3
    health = committed["properties"]["plugins"]["properties"]["health"]["anyOf"][0]
    assert health["properties"]["unhealthy_after"]["default"] == 3


def test_plugins_command_lists_plugins_as_json() -> None:
    result = _cli("plugins", "--config", "gateway.yaml", "--json")
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert listed["round_robin"] == {
        "name": "round_robin",
        "source": "built-in",
        "enabled": True,
        "hooks": ["register_strategies"],
        "strategies": ["round_robin"],
        "options": None,
    }
    assert listed["health"]["enabled"] and listed["health"]["hooks"] == ["register_routes", "startup"]


def test_infinite_timeouts_are_refused() -> None:
    problems = _problems({"routing": {"ttft_timeout": float("inf"), "stall_timeout": float("nan")}})
    assert "routing.ttft_timeout: must be a finite number, got inf" in problems
    assert "routing.stall_timeout: must be a finite number, got nan" in problems


def test_plugins_command_shows_strategies_and_effective_options(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(
        "storage: {sqlite: ./gateway.db}\n"
        "routing: {strategy: rendezvous}\n"
        "plugins:\n  health: {interval: 2.5}\n  ./my_strategy.py: {}\n"
    )
    shutil.copy(ROOT / "docs/examples/my_strategy.py", tmp_path)
    result = _cli("plugins", "--config", str(tmp_path / "gateway.yaml"))
    assert result.returncode == 0, result.stderr
    blocks = {
        block.split()[0]: [line.strip() for line in block.split("\n")]
        for block in re.split(r"\n(?=\S)", result.stdout.strip())
    }
    mine = blocks["./my_strategy.py"]
    assert mine[0].split()[1:3] == ["enabled", "file"]
    assert mine[1:] == ["hooks: register_strategies", "strategies: rendezvous"]
    health = blocks["health"]
    assert health[2].startswith("options: interval=2.5, timeout=5.0,") and 'path="/v1/models"' in health[2]
    least_latency = blocks["least_latency"]
    assert least_latency[0].split()[1] == "disabled"
    assert least_latency[2:] == ["strategies: least_latency", "defaults: alpha=0.3, explore=0.05, failure_penalty=10.0"]

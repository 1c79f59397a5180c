"""The ``gateway.yaml`` model: typed, validated, with ``${ENV_VAR}`` interpolation."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.endpoints import endpoints_problem
from gateway.netguard import url_problem
from gateway.validate import ValidationError, build, json_schema, positive

DEFAULT_PLUGINS = ("round_robin", "responses")
"""Plugins that run whether or not ``plugins:`` names them."""

MIN_ADMIN_KEY_LENGTH = 16


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"must be a port number 0-65535, got {value}"


def _workers(value: int | str) -> str | None:
    if value == "auto" or (isinstance(value, int) and value >= 1):
        return None
    return f"must be a number of processes (1 or more) or 'auto' (one per core), got {value!r}"


def _http_url(value: str) -> str | None:
    """The checks every backend URL passes, registered or configured (see netguard.normalise_url)."""
    return url_problem(value)


def _api_path(value: str) -> str | None:
    if value == "" or (value.startswith("/") and not value.endswith("/") and "?" not in value):
        return None
    return f"must be empty or a path such as /v1 (a leading /, no trailing /), got {value!r}"


def _admin_key(value: str | None) -> str | None:
    if value is not None and len(value) < MIN_ADMIN_KEY_LENGTH:
        return (
            f"the admin key is {len(value)} characters; it must be at least "
            f"{MIN_ADMIN_KEY_LENGTH} (or leave it unset and the gateway generates one)"
        )
    return None


def _models(value: list[str]) -> str | None:
    return None if value and all(value) else "must list at least one model name"


@dataclass(frozen=True)
class ServerConfig:
    """Where the gateway listens."""

    host: str = field(default="127.0.0.1", metadata={"doc": "address to bind"})
    port: int = field(default=8000, metadata={"doc": "TCP port", "check": _port})
    max_body_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata={"doc": "largest request body accepted (413 beyond)", "check": positive},
    )
    max_upload_bytes: int = field(
        default=25 * 1024 * 1024,
        metadata={"doc": "largest multipart upload (audio transcriptions, translations) accepted", "check": positive},
    )
    shutdown_timeout: float = field(
        default=30.0,
        metadata={
            "doc": "seconds requests in flight may take to finish after SIGTERM or Ctrl-C (and each plugin's shutdown)",
            "check": positive,
        },
    )
    keepalive_timeout: float = field(
        default=30.0, metadata={"doc": "seconds an idle keep-alive connection stays open", "check": positive}
    )
    header_timeout: float = field(
        default=10.0,
        metadata={"doc": "seconds a client may take to send a request's headers (408 beyond)", "check": positive},
    )
    workers: int | str = field(
        default=1,
        metadata={"doc": "processes serving the port (SO_REUSEPORT); 'auto': one per core", "check": _workers},
    )
    uvloop: bool = field(
        default=True,
        metadata={"doc": "run on uvloop where it is installed (about 10 % less CPU a request); false: asyncio's loop"},
    )


@dataclass(frozen=True)
class StorageConfig:
    """The embedded registry database."""

    sqlite: str = field(
        default="./var/gateway.db",
        metadata={"doc": "SQLite file, relative to this config file; the admin key file sits beside it"},
    )


def _redis_url(value: str | None) -> str | None:
    if value is None or value.startswith(("redis://", "rediss://", "unix://")):
        return None
    return f"must be a Redis URL such as redis://localhost:6379/0 (or rediss://, unix://), got {value!r}"


@dataclass(frozen=True)
class StateConfig:
    """State several gateways must agree on: rate-limit buckets, concurrency, spend, the cache."""

    redis: str | None = field(
        default=None,
        metadata={
            "doc": "redis://host:port/db: gateways sharing it enforce one limit and one budget; unset: this process",
            "check": _redis_url,
        },
    )


@dataclass(frozen=True)
class AdminConfig:
    """The admin API."""

    api_key: str | None = field(
        default=None,
        metadata={
            "doc": "admin key, at least 16 characters; unset: generated on first start",
            "check": _admin_key,
        },
    )
    allow_private_backends: bool = field(
        default=False,
        metadata={"doc": "let registrations point at loopback, private-network and link-local addresses"},
    )
    max_backends: int = field(
        default=500, metadata={"doc": "most backends that may be registered at once", "check": positive}
    )
    registrations_per_minute: int = field(
        default=60, metadata={"doc": "registrations and updates one key may make per minute", "check": positive}
    )
    protected_models: list[str] = field(
        default_factory=list,
        metadata={
            "doc": "models only backends the admin registered or approved may serve "
            "(every model of a backend in this file is protected too)"
        },
    )
    approve_registrations: bool = field(
        default=False,
        metadata={"doc": "a host key's new backend waits as 'pending' (no traffic) until an admin approves it"},
    )


@dataclass(frozen=True)
class BackendConfig:
    """A backend known from the config file (read-only through the admin API)."""

    name: str = field(metadata={"doc": "a unique name for logs and /admin/servers"})
    url: str = field(metadata={"doc": "base URL of an OpenAI-compatible server", "check": _http_url})
    models: list[str] = field(metadata={"doc": "models this backend serves", "check": _models})
    api_key: str | None = field(
        default=None,
        metadata={"doc": "sent to this backend as a bearer token; write ${ENV_VAR} to keep it out of this file"},
    )
    api_path: str = field(
        default="/v1",
        metadata={"doc": "what comes between url and the endpoint (chat/completions); '' for a base URL that "
                  "already ends in its version, as Gemini's .../v1beta/openai does", "check": _api_path},
    )  # fmt: skip
    endpoints: list[str] | None = field(
        default=None,
        metadata={"doc": "the /v1/ endpoints it serves (messages: Anthropic's); unset: every OpenAI one",
                  "check": endpoints_problem},
    )  # fmt: skip
    aliases: dict[str, str] = field(
        default_factory=dict,
        metadata={"doc": "the class's model name -> this backend's own name for it (requests and answers renamed)"},
    )
    max_concurrency: int | None = field(
        default=None,
        metadata={
            "doc": "requests it works on at once (llama.cpp's server: 1); fair sharing queues the rest",
            "check": positive,
        },
    )
    weight: float = field(
        default=1.0, metadata={"doc": "share of traffic under the weighted strategy", "check": positive}
    )
    connect_timeout: float | None = field(
        default=None, metadata={"doc": "overrides routing.connect_timeout", "check": positive}
    )
    ttft_timeout: float | None = field(
        default=None, metadata={"doc": "overrides routing.ttft_timeout", "check": positive}
    )
    stall_timeout: float | None = field(
        default=None, metadata={"doc": "overrides routing.stall_timeout", "check": positive}
    )


def _capabilities(value: dict[str, float]) -> str | None:
    bad = [k for k, v in value.items() if not 0 <= v <= 1]
    return f"scores must be between 0 and 1; check {', '.join(bad)}" if bad else None


@dataclass(frozen=True)
class ModelProfile:
    """What a model is good at and what it costs: for task-aware routing and the usage plugin's spend."""

    capabilities: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "doc": "task type -> how good the model is at it, 0 to 1 (code, math, reasoning, ...)",
            "check": _capabilities,
        },
    )
    tier: Literal["small", "medium", "large"] | None = field(default=None, metadata={"doc": "rough size class"})
    cost_per_1k_prompt_tokens: float = field(
        default=0.0, metadata={"doc": "price of 1000 prompt tokens (any unit; keys' budgets use the same)"}
    )
    cost_per_1k_completion_tokens: float = field(default=0.0, metadata={"doc": "price of 1000 completion tokens"})
    aliases: dict[str, str] = field(
        default_factory=dict,
        metadata={"doc": "backend name -> that backend's own name for this model (in the models: section)"},
    )
    cost_per_second: float = field(
        default=0.0,
        metadata={"doc": "price of one second of backend time, for self-hosted models (GPU time, not tokens)"},
    )


@dataclass(frozen=True)
class RoutingConfig:
    """How a backend is chosen and how long the gateway waits for it."""

    strategy: str = field(default="round_robin", metadata={"doc": "a strategy registered by a plugin"})
    max_attempts: int = field(
        default=3, metadata={"doc": "backends tried per model before giving up", "check": positive}
    )
    connect_timeout: float = field(
        default=5.0, metadata={"doc": "seconds to open a connection to a backend", "check": positive}
    )
    ttft_timeout: float = field(
        default=120.0,
        metadata={"doc": "seconds from sending a request to a backend to its first byte", "check": positive},
    )
    stall_timeout: float = field(
        default=60.0,
        metadata={"doc": "seconds of silence allowed between two chunks once a backend answers", "check": positive},
    )
    deadline: float = field(
        default=300.0,
        metadata={
            "doc": "seconds within which some backend must start answering, all tries included",
            "check": positive,
        },
    )
    max_response_bytes: int = field(
        default=32 * 1024 * 1024,
        metadata={
            "doc": "largest non-streamed answer taken from a backend (502 beyond, the backend blamed)",
            "check": positive,
        },
    )
    resume_streams: bool = field(
        default=False,
        metadata={"doc": "continue a stream that breaks mid-way on another backend, from the text so far"},
    )
    fallbacks: dict[str, list[str]] = field(
        default_factory=dict,
        metadata={"doc": "model -> models to try, in order, when no backend of it can serve"},
    )
    groups: dict[str, list[str]] = field(
        default_factory=dict,
        metadata={"doc": "name -> models: a request for the name is served by any model of the group"},
    )


@dataclass(frozen=True)
class LoggingConfig:
    """Structured logs."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = field(
        default="auto", metadata={"doc": "auto: console on a terminal, JSON otherwise"}
    )


@dataclass(frozen=True)
class GatewayConfig:
    """Multiverse Gateway configuration (gateway.yaml)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    state: StateConfig = field(default_factory=StateConfig)
    backends: list[BackendConfig] = field(default_factory=list)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    models: dict[str, ModelProfile] = field(
        default_factory=dict, metadata={"doc": "model name -> capabilities, tier and cost, for task-aware routing"}
    )
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plugins: dict[str, dict[str, Any] | None] = field(
        default_factory=dict,
        metadata={"doc": "plugins to enable, by name, file path or module, each with its options"},
    )
    base_dir: Path = field(default=Path("."), init=False, compare=False)

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.base_dir / candidate

    @property
    def database_path(self) -> Path:
        return self.resolve(self.storage.sqlite)

    @property
    def protected_models(self) -> frozenset[str]:
        """admin.protected_models and every model of a backend in this file."""
        return frozenset(self.admin.protected_models).union(*(b.models for b in self.backends))

    @property
    def admin_key_path(self) -> Path:
        return self.database_path.parent / "admin.key"


class ConfigError(ValidationError):
    """The config file has problems; each is a line ``yaml.path: problem (hint)``."""


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of parsed YAML.

    A value that is exactly ``${VAR}`` with VAR unset becomes null, so an optional
    setting can name a variable that is not always set.
    """
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _ENV.fullmatch(value)
    if whole and whole.group(2) is None and whole.group(1) not in os.environ:
        return None
    return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)


def parse(data: Any, base_dir: Path = Path(".")) -> GatewayConfig:
    """Validate already-parsed YAML; raise ConfigError listing every problem."""
    try:
        config = build(GatewayConfig, interpolate(data))
    except ValidationError as exc:
        raise ConfigError(exc.problems) from None
    problems = _cross_checks(config)
    if problems:
        raise ConfigError(problems)
    object.__setattr__(config, "base_dir", base_dir)
    return config


def _cross_checks(config: GatewayConfig) -> list[str]:
    problems = []
    for name, members in config.routing.groups.items():
        if not members:
            problems.append(f"routing.groups.{name}: list at least one model")
        if name in members:
            problems.append(f"routing.groups.{name}: a group cannot contain itself")
    seen: set[str] = set()
    for i, backend in enumerate(config.backends):
        if backend.name in seen:
            problems.append(f"backends[{i}].name: '{backend.name}' is used twice; names must be unique")
        seen.add(backend.name)
    return problems


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice in one mapping; keep one", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load(path: str | Path) -> GatewayConfig:
    """Read and validate a config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file ({exc.strerror})"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: not valid YAML at {where}: {reason}"]) from None
    return parse(data, base_dir=path.resolve().parent)


def schema() -> dict[str, Any]:
    """The JSON Schema of gateway.yaml, for editors."""
    out = json_schema(GatewayConfig)
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["title"] = "Multiverse Gateway configuration"
    return out

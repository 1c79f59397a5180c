"""task_aware: read the prompt, pick the model best at that task.

Model selection modes, all OpenAI-compatible:
- manual: ``model: "gemma-3-270m"`` is left alone (the prompt is still analysed and
  its task type logged);
- auto: ``model: "auto"`` (``auto_model`` option) ranks every model that has a healthy
  backend and sends the request to the best, the next ones as fallbacks;
- hybrid: ``model: "auto:gemma-3-270m"``, or ``extra_body={"multiverse": {"prefer":
  "gemma-3-270m", "fallback": "auto"}}``: that model first, auto's ranking after it.

A model's score for a prompt: its capability for the task type (``models:`` in
gateway.yaml, else its registration's ``profile``, else ``default_capability``), plus
how well its tier fits the prompt's complexity, minus its cost. The strategy it
offers, ``task_aware``, orders one model's backends by fewest requests in flight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway import hookimpl
from gateway.errors import GatewayError
from gateway.scoring import ScoredStrategy
from gateway.validate import share
from plugins.prompt_analysis import analyse

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.state import Gateway

ANALYSED = frozenset({"chat/completions", "completions"})
# How well a model tier fits a prompt's complexity.
TIER_FIT = {
    "simple": {"small": 0.2, "medium": 0.1, "large": 0.0},
    "moderate": {"small": 0.0, "medium": 0.2, "large": 0.1},
    "complex": {"small": -0.2, "medium": 0.1, "large": 0.2},
}


@dataclass(frozen=True)
class Options:
    auto_model: str = field(default="auto", metadata={"doc": "the model name that asks for automatic selection"})
    default_capability: float = field(
        default=0.5, metadata={"doc": "capability of a model that declares none", "check": share}
    )
    min_capability: float = field(
        default=0.0, metadata={"doc": "models below this for the task are not chosen", "check": share}
    )
    tier_weight: float = field(default=1.0, metadata={"doc": "how much the tier's fit to complexity counts"})
    cost_weight: float = field(default=0.1, metadata={"doc": "how much cost per 1k tokens counts against a model"})
    max_fallbacks: int = field(default=3, metadata={"doc": "next-best models tried if the best cannot serve"})


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()

    @hookimpl
    def register_strategies(self) -> dict[str, ScoredStrategy]:
        return {"task_aware": ScoredStrategy(lambda backend, call: -backend.in_flight)}

    @hookimpl
    def before_request(self, call: Call) -> None:
        if call.endpoint not in ANALYSED:
            return
        analysis = analyse(call.prompt)
        call.tags["task_type"] = analysis.task_type
        call.tags["complexity"] = analysis.complexity
        if call.dry_run:
            call.explain["analysis"] = analysis.as_dict()
        prefer, wants_auto = self._mode(call)
        if prefer is None and not wants_auto:
            return
        ranking = self.rank(call.gateway, analysis.task_type, analysis.complexity) if wants_auto else []
        if call.dry_run:
            call.explain["model_ranking"] = ranking
        ranked = [r["model"] for r in ranking if r["eligible"]]
        chain = list(dict.fromkeys(([prefer] if prefer else []) + ranked))  # no model twice, order kept
        if not chain:
            raise GatewayError(
                503,
                f"no model can take a '{analysis.task_type}' request right now (none with a healthy backend"
                f" reaches min_capability {self.options.min_capability:g}); name a model instead of 'auto'",
                code="no_model_available",
            )
        body = {k: v for k, v in call.json.items() if k != "multiverse"}
        call.replace_json({**body, "model": chain[0]})
        call.fallbacks = chain[1 : 1 + self.options.max_fallbacks]
        call.tags["selected_model"] = chain[0]

    def _mode(self, call: Call) -> tuple[str | None, bool]:
        """(preferred model, whether auto selection applies) from the model name or extra_body."""
        auto = self.options.auto_model
        extra = call.json.get("multiverse")
        if isinstance(extra, dict) and isinstance(extra.get("prefer"), str):
            fallback = extra.get("fallback", auto)
            return extra["prefer"], fallback == auto
        if call.model == auto:
            return None, True
        if call.model.startswith(auto + ":"):
            return call.model[len(auto) + 1 :], True
        return None, False

    def rank(self, gateway: Gateway, task: str, complexity: str) -> list[dict[str, Any]]:
        """Every model with a routable backend, best first, with how its score was made."""
        options = self.options
        rows = []
        for model in gateway.registry.models():
            profile = self._profile(gateway, model)
            capability = float(profile.get("capabilities", {}).get(task, options.default_capability))
            fit = TIER_FIT[complexity].get(profile.get("tier") or "", 0.0) * options.tier_weight
            cost = profile.get("cost_per_1k_prompt_tokens", 0.0) + profile.get("cost_per_1k_completion_tokens", 0.0)
            score = capability + fit - cost * options.cost_weight
            rows.append({
                "model": model, "score": round(score, 4), "capability": capability, "tier_fit": round(fit, 4),
                "cost": cost, "eligible": capability >= options.min_capability,
            })  # fmt: skip
        return sorted(rows, key=lambda r: (-r["score"], r["model"]))

    def _profile(self, gateway: Gateway, model: str) -> dict[str, Any]:
        declared = gateway.config.models.get(model)
        if declared is not None:  # the instructor's word wins over a registration's
            return dataclasses.asdict(declared)
        for backend in gateway.registry.for_model(model):
            if backend.profile:
                return backend.profile
        return {}

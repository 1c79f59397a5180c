"""What ``multiverse check-backend`` found: one ``Finding`` per check, as a table or as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Report:
    url: str
    model: str | None
    findings: list[Finding]
    ttft_ms: float | None = None
    tokens_per_second: float | None = None

    @property
    def ok(self) -> bool:
        return all(f.status != FAIL for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "ok": self.ok,
            "ttft_ms": self.ttft_ms,
            "tokens_per_second": self.tokens_per_second,
            "checks": [asdict(f) for f in self.findings],
        }

    def table(self) -> str:
        width = max(len(f.check) for f in self.findings)
        lines = [f"{self.url}  model: {self.model or '?'}"]
        for f in self.findings:
            lines.append(f"  {f.status.upper():<4}  {f.check:<{width}}  {f.detail}")
            if f.fix and f.status != PASS:
                lines.append(f"  {'':<4}  {'':<{width}}  fix: {f.fix}")
        failed = sum(f.status == FAIL for f in self.findings)
        lines.append("OK: ready to register" if self.ok else f"{failed} check(s) failed")
        return "\n".join(lines)

"""``multiverse check-backend``: does a server speak the OpenAI protocol as the gateway needs it?

Each check is a ``Finding``: pass, warn (works, but worth fixing) or fail, with a one-line fix.
``quick`` runs the subset ``POST /admin/register?check=true`` uses. Requests carry ``max_tokens``
(a llama.cpp server without it generates until its context is full) and no ``X-Request-ID``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from gateway.checker_report import FAIL, PASS, WARN, Finding, Report
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.state import Gateway

LIMIT = 4 * 1024 * 1024
TUNNELS = ("trycloudflare.com", "ngrok", "loca.lt", "serveo.net", "localhost.run", "pinggy")


class Checker:
    def __init__(
        self, session: aiohttp.ClientSession, url: str, model: str | None, key: str | None, timeout: float = 60.0
    ) -> None:
        self.session, self.model, self.timeout = session, model, timeout
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.findings: list[Finding] = []
        self.url = url.strip().rstrip("/")
        self.report = Report(self.url, model, self.findings)

    def add(self, check: str, status: str, detail: str, fix: str = "") -> None:
        self.findings.append(Finding(check, status, detail, fix))

    async def run(self, quick: bool = False) -> Report:
        self._url_shape()
        if await self._models():
            await self._chat(stream=False)
            await self._chat(stream=True)
            if not quick:
                await self._completions(stream=False)
                await self._completions(stream=True)
                await self._stream_usage()
                await self._bad_request()
        self.report.model = self.model
        return self.report

    def _url_shape(self) -> None:
        parts = urlsplit(self.url)
        if parts.path.rstrip("/").endswith("/v1"):
            self.url = self.url[: -len("/v1")]
            self.report.url = self.url
            self.add(
                "url", WARN, "the URL ends with /v1; the gateway adds /v1 itself", "register the base URL: " + self.url
            )
        elif parts.scheme not in ("http", "https") or not parts.hostname:
            self.add("url", FAIL, f"not an http(s) URL: {self.url}", "give it as http://HOST:PORT or https://HOST")
        else:
            self.add("url", PASS, "base URL without /v1")
        if parts.scheme == "http" and any(t in (parts.hostname or "") for t in TUNNELS):
            self.add(
                "https",
                FAIL,
                "a tunnel's URL with http://: tunnels answer it with a redirect or refuse it",
                "use the https:// URL the tunnel printed",
            )

    async def _call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, str, bytes, float, list[float]]:
        """status, content type, body, seconds to the first byte, arrival time of each body piece."""
        started = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        headers = {**self.headers, "Accept-Encoding": "identity"}
        if raw is not None:
            headers["Content-Type"] = "application/json"
        async with self.session.request(
            method, self.url + path, json=body, data=raw, headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            first, arrivals, data = 0.0, [], b""
            async for piece in response.content.iter_any():
                arrivals.append(time.perf_counter() - started)
                first = first or arrivals[-1]
                data += piece
                if len(data) > LIMIT:
                    break
            return response.status, response.content_type, data, first, arrivals

    async def _models(self) -> bool:
        try:
            status, _, data, _, _ = await self._call("GET", "/v1/models")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.add(
                "models",
                FAIL,
                f"GET /v1/models failed: {type(exc).__name__}: {exc}",
                "start the server, and check host, port and scheme (a tunnel needs https)",
            )
            return False
        if status in (301, 302, 307, 308):
            self.add(
                "models",
                FAIL,
                f"GET /v1/models answered a redirect (HTTP {status})",
                "use the final URL (often https://) as the backend's URL",
            )
            return False
        if status != 200:
            fix = (
                "send --key with the server's API key"
                if status in (401, 403)
                else "the URL must be the server's base URL"
            )
            self.add("models", FAIL, f"GET /v1/models answered HTTP {status}", fix)
            return False
        try:
            listed = [m["id"] for m in json.loads(data)["data"] if isinstance(m.get("id"), str)]
        except (ValueError, KeyError, TypeError, AttributeError):
            self.add(
                "models",
                FAIL,
                'GET /v1/models is not {"object": "list", "data": [{"id": ...}]}',
                "serve OpenAI's model list at /v1/models",
            )
            return False
        if not listed:
            self.add("models", FAIL, "GET /v1/models lists no model", "load a model in the server")
            return False
        self.add("models", PASS, f"lists {', '.join(listed[:5])}")
        if self.model is None:
            self.model = listed[0]
        elif self.model not in listed:
            self.add(
                "model name",
                FAIL,
                f"'{self.model}' is not what /v1/models lists ({', '.join(listed[:5])})",
                "register the name /v1/models lists (llama.cpp: --model_alias NAME)",
            )
        return True

    def _body(self, chat: bool, stream: bool, **extra: Any) -> dict[str, Any]:
        prompt: dict[str, Any] = (
            {"messages": [{"role": "user", "content": "Say hello."}]} if chat else {"prompt": "Once upon a time"}
        )
        return {"model": self.model, **prompt, "max_tokens": 16, "stream": stream, **extra}

    async def _chat(self, stream: bool) -> None:
        await self._endpoint("chat", "/v1/chat/completions", "chat.completion", stream)

    async def _completions(self, stream: bool) -> None:
        await self._endpoint("completions", "/v1/completions", "text_completion", stream)

    async def _endpoint(self, name: str, path: str, kind: str, stream: bool) -> None:
        check = f"{name} {'stream' if stream else 'json'}"
        try:
            status, ctype, data, first, arrivals = await self._call("POST", path, self._body(name == "chat", stream))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.add(check, FAIL, f"POST {path} failed: {type(exc).__name__}", "check the server's log")
            return
        if status != 200:
            self.add(
                check,
                FAIL,
                f"POST {path} answered HTTP {status}: {data[:120]!r}",
                f"the server must serve {path} for model '{self.model}'",
            )
            return
        if not stream:
            self._json_answer(check, data, kind)
            return
        events = self._sse(check, ctype, data, kind + ("" if kind == "text_completion" else ".chunk"))
        if events is not None and name == "chat":
            pieces = max(1, events - 1)
            spread = arrivals[-1] - first if len(arrivals) > 1 else 0.0
            self.report.ttft_ms = round(first * 1000, 1)
            self.report.tokens_per_second = round(pieces / spread, 1) if spread > 0 else None
            self.add(
                "speed",
                PASS,
                f"first byte after {first * 1000:.0f} ms; about {self.report.tokens_per_second or '?'} chunks/s",
            )

    def _json_answer(self, check: str, data: bytes, kind: str) -> None:
        try:
            answer = json.loads(data)
            ok = answer.get("object") == kind and isinstance(answer.get("choices"), list) and answer["choices"]
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            self.add(check, FAIL, f"not an OpenAI '{kind}' object: {data[:120]!r}", "answer in OpenAI's JSON shape")
            return
        self.add(check, PASS, f"'{kind}' with {len(answer['choices'])} choice(s)")
        if check == "chat json":
            usage = answer.get("usage")
            if isinstance(usage, dict) and "total_tokens" in usage:
                self.add("usage", PASS, f"reported ({usage.get('total_tokens')} tokens)")
            else:
                self.add("usage", WARN, "no 'usage' in answers", "report usage so the gateway counts tokens exactly")

    def _sse(self, check: str, ctype: str, data: bytes, kind: str) -> int | None:
        """The count of data events if the stream is well framed; a finding either way."""
        if ctype != "text/event-stream":
            self.add(check, FAIL, f"answered '{ctype}', not text/event-stream", "send SSE when the request says stream")
            return None
        events, done, wrong = 0, False, []
        for block in data.replace(b"\r\n", b"\n").split(b"\n\n"):
            for line in block.split(b"\n"):
                if not line or line.startswith(b":"):
                    continue  # keep-alive comments are fine
                if not line.startswith(b"data:"):
                    continue  # event:, id:, retry: fields are allowed
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                events += 1
                try:
                    if json.loads(payload).get("object") != kind:
                        wrong.append(payload[:60])
                except (ValueError, AttributeError):
                    wrong.append(payload[:60])
        if events == 0 or wrong:
            self.add(
                check,
                FAIL,
                f"{events} event(s); {len(wrong)} not '{kind}' chunks",
                "send 'data: {json}' lines, each an OpenAI chunk",
            )
            return None
        if not done:
            self.add(
                check, FAIL, f"{events} event(s) but no 'data: [DONE]' at the end", "end streams with data: [DONE]"
            )
            return None
        self.add(check, PASS, f"{events} '{kind}' event(s), then [DONE]")
        return events

    async def _stream_usage(self) -> None:
        body = self._body(True, True, stream_options={"include_usage": True})
        try:
            _, _, data, _, _ = await self._call("POST", "/v1/chat/completions", body)
        except (aiohttp.ClientError, TimeoutError):
            return
        found = b'"usage": {' in data or b'"usage":{' in data
        self.add(
            "stream usage",
            PASS if found else WARN,
            "usage in streams with stream_options.include_usage" if found else "no usage in streams",
            "" if found else "the gateway then estimates tokens by counting (see docs/backends.md)",
        )

    async def _bad_request(self) -> None:
        try:
            status, ctype, _, _, _ = await self._call("POST", "/v1/chat/completions", raw=b"{not json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.add("bad request", WARN, f"malformed JSON dropped the connection ({type(exc).__name__})")
            return
        if 400 <= status < 500:
            self.add("bad request", PASS, f"malformed JSON gets HTTP {status}")
        else:
            self.add(
                "bad request",
                WARN,
                f"malformed JSON gets HTTP {status} ({ctype})",
                "answer client mistakes with a 4xx; the gateway then does not blame the server",
            )


async def check(
    url: str,
    model: str | None = None,
    key: str | None = None,
    quick: bool = False,
    session: aiohttp.ClientSession | None = None,
    timeout: float = 60.0,
) -> Report:
    """Run the checks against ``url`` (with ``session``: the gateway's own, which refuses redirects)."""
    if session is not None:
        return await Checker(session, url, model, key, timeout).run(quick)
    async with aiohttp.ClientSession() as own:
        return await Checker(own, url, model, key, timeout).run(quick)


async def refuse_unless_conformant(gateway: Gateway, url: str, model: str, key: str | None) -> None:
    """``POST /admin/register?check=true``: 400 with the findings unless the quick checks pass."""
    report = await check(url, model, key, quick=True, session=gateway.http, timeout=gateway.config.routing.ttft_timeout)
    if not report.ok:
        failed = "; ".join(f"{f.check}: {f.detail} (fix: {f.fix})" for f in report.findings if f.status == FAIL)
        raise GatewayError(
            400,
            f"{url} does not speak the protocol as the gateway needs it: {failed}",
            code="backend_not_conformant",
            param="endpoint_url",
        )

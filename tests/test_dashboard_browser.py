"""The dashboard in a real headless browser: Debian's chromium driven by Playwright (``make chromium``).

Signs in through the form, watches a registered backend go down when its server is stopped,
checks the key never reaches a URL, and takes a screenshot: with ``MULTIVERSE_SCREENSHOT=1`` it
replaces the one the README shows (docs/img/dashboard.png), so a plain test run changes no file.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ADMIN, ADMIN_KEY, FakeBackend, RunningGateway, StartBackend, StartGateway

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "dashboard.png"

import playwright.async_api as playwright_api  # noqa: E402  (the test extra)


@pytest.fixture(autouse=True)
def _chromium() -> None:
    """Skipping is not passing: without the browser this test fails and says how to get it."""
    if not CHROMIUM.exists():
        pytest.fail("needs Debian's chromium at /usr/bin/chromium: `make test` installs it (or `make chromium`)")


async def _traffic(gateway: RunningGateway) -> None:
    """A classroom's worth of calls: several keys and models, a typo, a backend answering 502."""
    for i, name in enumerate(["ada", "ada", "grace", "alan", "ada", "grace", "ada", "linus"] * 2):
        model = "qwen2.5-0.5b" if i % 3 else "llama-3.2-1b"
        reply = await gateway.post(
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]},
            {"Authorization": f"Bearer {name}"},
        )
        assert reply.status == 200, reply.body
    assert (await gateway.chat("hi", model="llama-3", user="typo")).status == 404
    assert (await gateway.chat("hi", model="phi-3-mini")).status == 502


async def test_the_dashboard_in_a_browser_shows_a_backend_going_down(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    lab = await start_backend(name="lab-gpu-1", models=["llama-3.2-1b", "qwen2.5-0.5b"])
    pi = await start_backend(name="grace-pi", models=["phi-3-mini"], mode="error", error_status=502)
    gateway = await start_gateway(
        lab,
        pi,
        plugins={
            "tests.bearer_identity": {},
            "health": {"interval": 0.3, "timeout": 0.5, "unhealthy_after": 1},
            "circuit_breaker": {"consecutive_failures": 1},
            "dashboard": {"interval": 0.3},
        },
    )
    laptop = FakeBackend(name="ada-laptop", models=["qwen2.5-0.5b"])
    laptop_server = TestServer(laptop.app(), host="127.0.0.1")
    await laptop_server.start_server()
    registration = await gateway.post(
        "/admin/register",
        {"endpoint_url": str(laptop_server.make_url("")), "name": "ada-laptop", "owner_name": "Ada Lovelace"},
        ADMIN,
    )
    assert registration.status == 201, registration.body
    await _traffic(gateway)

    urls: list[str] = []
    problems: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
            page.on("request", lambda request: urls.append(request.url))
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            await page.goto(gateway.url + "/dashboard")
            expect = playwright_api.expect

            await page.fill("#key", "not-the-admin-key")
            await page.click("#login-form button[type=submit]")
            await expect(page.locator("#login-error")).to_contain_text("not valid")
            await expect(page.locator("#board")).to_be_hidden()
            problems.clear()  # the browser logs the refused request (401) as a console error

            await page.fill("#key", ADMIN_KEY)
            await page.click("#login-form button[type=submit]")
            await expect(page.locator("#connection")).to_contain_text("live")
            card = page.locator('[data-backend="ada-laptop"]')
            await expect(card).to_have_attribute("data-level", "healthy", timeout=5000)
            await expect(card).to_contain_text("● healthy")
            await expect(card).to_contain_text("Ada Lovelace")
            await expect(page.locator('[data-backend="grace-pi"]')).to_contain_text("▲ degraded")
            await expect(page.locator("#failures")).to_contain_text("phi-3-mini")
            await expect(page.locator("#top-keys")).to_contain_text("ada")

            await laptop_server.close()  # the student's laptop goes away
            stopped = time.monotonic()
            await expect(card).to_have_attribute("data-level", "down", timeout=5000)
            await expect(card).to_contain_text("■ down")
            assert time.monotonic() - stopped < 5
            assert (await gateway.chat("after", model="qwen2.5-0.5b")).status == 200  # served by lab-gpu-1
            await asyncio.sleep(0.8)  # the next snapshot shows that call
            shot = SCREENSHOT if os.environ.get("MULTIVERSE_SCREENSHOT") else tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000  # a real picture of the page

            await page.reload()  # the key is kept for the tab: no second sign-in
            await expect(page.locator("#connection")).to_contain_text("live")
            stored = await page.evaluate("sessionStorage.getItem('multiverse.dashboard.key')")
            assert stored == ADMIN_KEY
            assert await page.evaluate("localStorage.length") == 0
            assert ADMIN_KEY not in page.url and ADMIN_KEY not in await page.content()
        finally:
            await browser.close()
    assert urls and not [url for url in urls if ADMIN_KEY in url]
    assert not problems, problems
    assert SCREENSHOT.stat().st_size > 10_000

"""gateway.testing, the fixtures students test their plugins with: paths, config files, fake backends."""

from __future__ import annotations

import re
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from gateway.testing import ADMIN, MODES, FakeBackend
from tests.conftest import StartBackend, StartGateway, closed_port_url, eventually

LAST_NAME_FIRST = """
from gateway import hookimpl

@hookimpl
def register_strategies():
    return {"last_name_first": lambda candidates, call: sorted(candidates, key=lambda b: b.name, reverse=True)}
"""


def test_an_unknown_fake_backend_mode_is_refused_with_the_modes() -> None:
    with pytest.raises(ValueError, match="mode 'hnag' is unknown; the modes are ok, error, hang"):
        FakeBackend(mode="hnag")  # type: ignore[arg-type]


async def test_a_relative_plugin_path_resolves_next_to_the_test_file(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(name="solo"), plugins={"./observer_plugin.py": None})
    reply = await gateway.chat("hello there", user="ada")
    assert (reply.status, reply.backend) == (200, "solo")
    assert reply.json()["choices"][0]["message"]["content"] == "hello there"
    assert (
        gateway.state.plugins.sources["./observer_plugin.py"] == f"file {Path(__file__).parent / 'observer_plugin.py'}"
    )
    observer = gateway.state.plugins.pm.get_plugin("./observer_plugin.py")
    await eventually(lambda: len(observer.calls) == 1)
    assert observer.calls[0].json["user"] == "ada"


async def test_a_config_file_is_loaded_with_its_plugins_and_the_fakes_replace_its_backends(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    (tmp_path / "names.py").write_text(LAST_NAME_FIRST)
    (tmp_path / "gateway.yaml").write_text(
        textwrap.dedent(f"""
        storage: {{sqlite: /nonexistent/never-used.db}}
        admin: {{api_key: "${{NOT_SET_ANYWHERE}}"}}
        backends: [{{name: real-gpu, url: "{closed_port_url()}", models: [echo]}}]
        routing: {{strategy: last_name_first}}
        plugins: {{./names.py: {{}}}}
        """)
    )
    first, second = await start_backend(name="alpha"), await start_backend(name="zulu")
    gateway = await start_gateway(first, second, config_file="gateway.yaml", base_dir=tmp_path)
    assert [b.name for b in gateway.state.config.backends] == ["alpha", "zulu"]
    assert gateway.state.config.database_path.parent == tmp_path
    for _ in range(2):
        assert (await gateway.chat()).backend == "zulu"
    assert len(second.seen) == 2 and not first.seen
    servers = await gateway.get("/admin/servers", headers=ADMIN)  # the fixtures' admin key replaces the file's
    assert servers.status == 200


def test_the_docs_describe_every_fake_backend_mode_and_only_real_fields() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    section = docs[docs.index("### The fake backend and its failure modes") :]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`(\w+)[=`]", row.split("|")[1])}
    assert named <= {f.name for f in fields(FakeBackend)}, named
    assert {mode for mode in MODES if f'`mode="{mode}"`' in section} == set(MODES)

"""Tests for my_strategy.py, against a real gateway and fake backends on real ports.

Copy this file and conftest.py next to my_strategy.py and gateway.yaml, then run ``pytest``.
"""

import pytest

from gateway.testing import StartBackend, StartGateway

pytestmark = pytest.mark.asyncio  # not needed with asyncio_mode = auto in your pytest config

USERS = [f"student-{i}" for i in range(20)]


async def test_the_same_user_always_gets_the_same_backend(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backends = [await start_backend(name=f"gpu-{i}") for i in range(4)]
    gateway = await start_gateway(*backends, config_file="gateway.yaml")  # your gateway.yaml, with these backends
    for user in USERS[:5]:
        answered_by = {(await gateway.chat("hello", user=user)).backend for _ in range(3)}
        assert len(answered_by) == 1, f"{user} was sent to {answered_by}"


async def test_users_are_spread_over_the_backends(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backends = [await start_backend(name=f"gpu-{i}") for i in range(4)]
    gateway = await start_gateway(*backends, config_file="gateway.yaml")
    answered_by = {(await gateway.chat("hello", user=user)).backend for user in USERS}
    assert len(answered_by) >= 3


async def test_a_failing_backend_moves_only_its_own_users(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backends = [await start_backend(name=f"gpu-{i}") for i in range(3)]
    gateway = await start_gateway(  # the same, without a gateway.yaml: sections as keywords
        *backends, plugins={"./my_strategy.py": {}}, routing={"strategy": "rendezvous"}
    )
    before = {user: (await gateway.chat("hello", user=user)).backend for user in USERS}
    backends[0].mode = "error"  # gpu-0 now answers 500: the gateway fails over to the next choice
    after = {}
    for user in USERS:
        reply = await gateway.chat("hello", user=user)
        assert reply.status == 200
        after[user] = reply.backend
    assert "gpu-0" in before.values() and "gpu-0" not in after.values()
    assert all(after[user] == before[user] for user in USERS if before[user] != "gpu-0")

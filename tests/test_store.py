"""The in-process store: token buckets, counters and values with expiry."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.store import PRUNE_EVERY, PRUNE_MASK, MemoryStore


async def test_a_bucket_refills_at_its_rate_and_gives_back() -> None:
    store = MemoryStore()
    assert await store.take("k", 2, rate=10, capacity=2) == 0.0
    wait = await store.take("k", 1, rate=10, capacity=2)
    assert 0.05 < wait <= 0.1  # one token at 10 a second
    await asyncio.sleep(wait + 0.01)
    assert await store.take("k", 1, rate=10, capacity=2) == 0.0
    assert await store.take("k", -5, rate=10, capacity=2) == 0.0  # a refund never overfills
    assert 1.9 < await store.peek("k", rate=10, capacity=2) <= 2


async def test_counters_and_values_expire() -> None:
    store = MemoryStore()
    assert await store.add("c", 1.5) == 1.5 and await store.add("c", 1) == 2.5
    assert await store.add("t", 1, ttl=0.05) == 1
    await store.set("v", b"x", ttl=0.05)
    assert await store.get("v") == b"x"
    await asyncio.sleep(0.06)
    assert await store.get("v") is None and await store.add("t", 1) == 1
    await store.delete("c")
    assert await store.add("c", 0) == 0


async def test_refilled_buckets_and_expired_entries_are_forgotten() -> None:
    store = MemoryStore()
    for i in range(100):  # callers that come once: one bucket each
        await store.take(f"anon:{i}", 1, rate=1000, capacity=2)
    await store.add("kept", 1)
    await store.set("gone", b"x", ttl=0.01)
    await asyncio.sleep(0.02)  # every bucket is full again (2 tokens at 1,000 a second)
    await store.take("busy", 2, rate=0.001, capacity=2)  # still empty for a long time
    store.prune()
    assert set(store._buckets) == {"busy"} and set(store._counters) == {"kept"} and not store._values
    assert await store.take("busy", 1, rate=0.001, capacity=2) > 0  # its state survived


def test_buckets_of_callers_that_come_and_go_are_pruned_as_they_are_made() -> None:
    store = MemoryStore()
    store.take_now("steady", 2, rate=0.001, capacity=2)  # empty for a long time
    for i in range(3 * PRUNE_EVERY):  # one new bucket a caller, full again a nanosecond later
        store.take_now(f"anon:{i}", 1, rate=1e9, capacity=2)
        store.take_now("steady", 0, rate=0.001, capacity=2)  # a known key's takes add nothing to prune
    assert len(store._buckets) <= PRUNE_EVERY and "steady" in store._buckets
    assert store.take_now("steady", 1, rate=0.001, capacity=2)[0] > 0  # its level survived every prune


def test_giving_tokens_back_is_taking_a_negative_amount_at_every_later_moment() -> None:
    taken, given = MemoryStore(), MemoryStore()
    for store in (taken, given):
        store.take_now("k", 9, rate=4, capacity=10)  # 1 left, refilled at 4 a second
        store.take_now("debt", 12, rate=4, capacity=10, force=True)  # 2 in debt
        store.take_now("full", 2, rate=4, capacity=10)  # full again in half a second
    time.sleep(0.25)  # a token of refill since each bucket's last take, which a give must keep
    for name, amount in (("k", 5), ("debt", 3), ("full", 1), ("k", 20)):  # the last one past the capacity
        taken.take_now(name, -amount, rate=4, capacity=10)
        given.give_now(name, amount)
        assert given.take_now(name, 0, 4, 10)[1] == pytest.approx(taken.take_now(name, 0, 4, 10)[1], abs=0.02)
    assert taken.take_now("k", 0, 4, 10)[1] == given.take_now("k", 0, 4, 10)[1] == 10
    time.sleep(0.1)  # and later on
    assert given.take_now("debt", 0, 4, 10)[1] == pytest.approx(taken.take_now("debt", 0, 4, 10)[1], abs=0.02)
    given.give_now("never taken", 3)  # a bucket the store does not hold is full: nothing to give back to
    assert "never taken" not in given._buckets


def test_a_pair_of_buckets_is_taken_from_at_one_moment_both_or_neither() -> None:
    store = MemoryStore()
    r, t = (1 / 600, 2), (1 / 60, 100)  # refills so slow that the test's own time changes no figure
    assert store.take_pair_now("r", 1, *r, "t", 30, *t) == (0.0, 1, 0.0, 70)  # both taken
    wait, left, tokens_wait, tokens_left = store.take_pair_now("r", 1, *r, "t", 80, *t)
    assert wait == 0.0 and tokens_wait == pytest.approx(600, rel=0.01)  # 70 there, 80 asked: 10 at 1/60 a second
    assert left == pytest.approx(1, abs=0.01) and tokens_left == pytest.approx(70, abs=0.01)  # neither was taken
    wait, left, tokens_wait, _ = store.take_pair_now("r", 1, *r, "t", 1, *t)
    assert wait == 0.0 and tokens_wait == 0.0 and left == pytest.approx(0, abs=0.01)
    wait, left, tokens_wait, tokens_left = store.take_pair_now("r", 1, *r, "t", 1, *t)
    assert wait == pytest.approx(600, rel=0.01) and tokens_wait == 0.0  # the requests bucket refuses this time
    assert tokens_left == pytest.approx(69, abs=0.01)  # and the tokens bucket gave nothing either
    assert store.take_now("t", 0, *t)[1] == pytest.approx(69, abs=0.01)


def test_a_pair_taken_as_its_new_bucket_sets_off_a_prune_is_kept() -> None:
    store = MemoryStore()
    store._writes = PRUNE_MASK - 1  # the next new bucket is the one that prunes
    assert store.take_pair_now("r", 1, 1 / 600, 1, "t", 500, 1000 / 600, 1000)[::2] == (0.0, 0.0)
    assert set(store._buckets) == {"r", "t"}  # written into the store, not into the dict the prune replaced
    wait, _, tokens_wait, _ = store.take_pair_now("r", 1, 1 / 600, 1, "t", 500, 1000 / 600, 1000)
    assert wait > 500 and tokens_wait == 0.0  # one request a minute: the second is refused

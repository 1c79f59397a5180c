"""ratelimit: requests and tokens a minute per key, a per-key concurrency cap, and fair queues for busy backends.

Limits come from the caller's key (``call.identity``: ``rpm``, ``tpm``, ``max_concurrency``),
else from the options (``rpm``... for keys without their own, ``anonymous_*`` per client
address). Both rates are token buckets in ``gateway.store``, so gateways sharing a Redis
store enforce one limit; a key's two are taken from together, both or neither
(``store.take_pair``). A request's tokens are estimated up front (body length /
``chars_per_token`` plus ``max_tokens``) and corrected with the answer's real ``usage``.
Answers carry OpenAI's ``x-ratelimit-*`` headers; a refusal is a 429 with ``Retry-After``.

When every routable backend of the model is at its ``max_concurrency``, a request waits
in its key's queue and keys take turns (``fair_share.FairQueue``); ``priority: high``
keys go first; after ``max_queue_wait`` seconds it gets a 429. The slot is reserved
before ``before_request`` returns and handed over to routing in ``filter_candidates``
(where the relay takes it as ``in_flight`` without yielding), so two calls never race
for one slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway import hookimpl
from gateway.call import peer_closed
from gateway.errors import GatewayError
from gateway.identity import Identity
from gateway.pump import NUMBER
from gateway.store import MemoryStore, Store
from gateway.validate import positive
from plugins._buckets import Bucket, settle, settle_pair
from plugins.fair_share import FairQueue, Waiter

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway

UNLIMITED = None
MOST_TOKENS = 2**53  # an estimate's bound: more than any tpm, and a float still
CORRECT_EVERY = 0.1  # seconds between two batches of token corrections to a shared store
LOOK_EVERY = 0.1  # seconds between two looks for free backend slots, while requests wait for one


@dataclass(frozen=True)
class Options:
    rpm: int | None = field(
        default=None,
        metadata={"doc": "requests a minute, for keys without their own rpm", "check": positive},
    )
    tpm: int | None = field(
        default=None,
        metadata={"doc": "tokens a minute, for keys without their own tpm", "check": positive},
    )
    max_concurrency: int | None = field(
        default=None, metadata={"doc": "requests at once for keys without their own limit", "check": positive}
    )
    anonymous_rpm: int | None = field(
        default=None, metadata={"doc": "requests a minute per client address, without a key", "check": positive}
    )
    anonymous_tpm: int | None = field(
        default=None, metadata={"doc": "tokens a minute per client address, without a key", "check": positive}
    )
    anonymous_max_concurrency: int | None = field(
        default=None, metadata={"doc": "requests at once per client address, without a key", "check": positive}
    )
    fair_queue: bool = field(
        default=True, metadata={"doc": "queue per key, in turn, when every backend of the model is at max_concurrency"}
    )
    max_queue_wait: float = field(
        default=30.0, metadata={"doc": "seconds a request may wait for a backend slot (429 beyond)", "check": positive}
    )
    chars_per_token: float = field(
        default=4.0, metadata={"doc": "request bytes per token, for the up-front estimate", "check": positive}
    )
    default_max_tokens: int = field(
        default=256, metadata={"doc": "completion tokens assumed when a request sets no max_tokens", "check": positive}
    )


@dataclass(frozen=True, slots=True)
class Limits:
    """What applies to a caller, worked out once for a key's ``Identity`` (auth makes a new one when the key
    changes; ``identity`` tells a stale entry): its key in counts, its buckets (None: no limit of that kind)."""

    key: str
    who: str
    requests: Bucket | None
    tokens: Bucket | None
    cap: int | None
    high: bool
    identity: Identity | None = None

    @classmethod
    def of(
        cls, key: str, who: str, rpm: int | None, tpm: int | None, cap: int | None, high: bool = False,
        identity: Identity | None = None,
    ) -> Limits:  # fmt: skip
        requests = Bucket.of("requests", key, rpm, who) if rpm is not None else None
        tokens = Bucket.of("tokens", key, tpm, who) if tpm is not None else None
        return cls(key, who, requests, tokens, cap, high, identity)


class Ticket:
    """What this plugin took for one call, so that ``request_complete`` gives back exactly that."""

    __slots__ = ("held", "limits", "tokens", "tpm")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits  # with a cap, its key counts the call among its requests at once
        self.tpm: Bucket | None = None  # the tokens bucket, when tokens were taken from it
        self.tokens = 0.0  # taken from it: corrected with the real usage once the answer is in
        self.held: Backend | None = None  # a backend slot reserved until the call is routed


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.queue = FairQueue()
        self.running: dict[str, int] = {}  # key with a max_concurrency -> its calls queued or in flight
        self.held: dict[str, int] = {}  # backend id -> slots reserved for admitted calls not yet routed
        self.limits: dict[str, Limits] = {}  # key id -> its names and limits, for its current Identity
        self.tokens_per_byte = 1 / self.options.chars_per_token
        self.fair_queue = self.options.fair_queue
        self.owed: dict[str, list[float]] = {}  # a shared store's bucket -> [tokens to take (< 0: give), rate, limit]
        self.looking: asyncio.Task[None] | None = None  # _look_while_waiting, while anyone waits
        self.gateway: Gateway | None = None

    @hookimpl
    def startup(self, gateway: Gateway) -> None:
        self.gateway = gateway
        if gateway.store.__class__ is not MemoryStore:
            gateway.every(CORRECT_EVERY, self.correct, name="ratelimit-corrections")

    @hookimpl
    async def shutdown(self) -> None:
        await self.correct()  # before the gateway closes its store

    def _look_for_slots(self) -> None:
        """While requests wait, look for free slots every LOOK_EVERY seconds: slots also free up outside
        ``request_complete`` (a backend registered or raised, failover, health). Nobody waiting: no timer (one
        every 0.1 s all the time cost ~3 ms of CPU a second, idle or not)."""
        if (self.looking is None or self.looking.done()) and self.gateway is not None:
            self.looking = self.gateway.start_task(self._look_while_waiting(self.gateway), name="ratelimit")

    async def _look_while_waiting(self, gateway: Gateway) -> None:
        try:
            while self.queue.count:
                await asyncio.sleep(LOOK_EVERY)
                try:
                    self.queue.dispatch(self._admit)
                except Exception:  # logged, and the next look comes: the waiters still wait
                    gateway.log.exception("task_failed", task="ratelimit")
        finally:
            self.looking = None

    async def correct(self) -> None:
        """Take (or give back) the token corrections owed to a shared store since the last batch: a round trip a
        bucket every CORRECT_EVERY, not one a request in a task of its own. A bucket's corrections are added up
        first, so a give-back and a debt in one batch cancel before the capacity caps either."""
        if not self.owed or self.gateway is None:
            return
        owed, self.owed = self.owed, {}
        store = self.gateway.store
        takes = [
            store.take(name, tokens, rate, limit, force=True) for name, (tokens, rate, limit) in owed.items() if tokens
        ]
        await asyncio.gather(*takes)

    # -- before the call -------------------------------------------------------------------

    @hookimpl
    def before_request(self, call: Call) -> Awaitable[None] | None:
        """Synchronous with the in-process store and a free backend (the usual case): no coroutine to run."""
        identity = call.identity
        limits = self.limits.get(identity.key_id) if identity.__class__ is Identity else None
        if limits is None or limits.identity is not identity:
            limits = self._limits(call)
        requests, tokens, cap = limits.requests, limits.tokens, limits.cap
        if call.dry_run:
            call.explain["ratelimit"] = {
                "key": limits.who, "rpm": requests and requests.limit, "tpm": tokens and tokens.limit,
                "max_concurrency": cap,
            }  # fmt: skip
            return None
        if cap is not None:  # a key without a cap is not counted: nothing would read its count (so a cap given to
            # a key while calls of it are in flight counts the calls from then on, not those)
            key = limits.key
            running = self.running.get(key, 0)
            if running >= cap:
                message = f"rate limit: at most {cap} requests at once for {limits.who}; wait for one to finish"
                raise GatewayError(429, message, code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.running[key] = running + 1
        ticket = call.state["ratelimit"] = Ticket(limits)
        if requests is None and tokens is None:
            return self._queue(call, ticket, limits.high)
        estimate = 0.0 if tokens is None else self._estimate(call, tokens)
        store = call.gateway.store
        if store.__class__ is not MemoryStore:
            return self._take_then_queue(call, store, ticket, estimate)
        headers = call.response_headers
        if requests is not None and tokens is not None:  # the usual case: both, at one moment, both or neither
            answer = store.take_pair_now(
                requests.name, 1.0, requests.rate, requests.limit, tokens.name, estimate, tokens.rate, tokens.limit
            )
            settle_pair(requests, tokens, estimate, answer, headers)  # raises the 429 if either refused
            ticket.tpm, ticket.tokens = tokens, estimate  # corrected with the real usage once the answer is in
        elif requests is not None:
            wait, left = store.take_now(requests.name, 1.0, requests.rate, requests.limit)
            settle(requests, 1.0, wait, left, headers)  # raises the 429 if refused
        elif tokens is not None:
            wait, left = store.take_now(tokens.name, estimate, tokens.rate, tokens.limit)
            settle(tokens, estimate, wait, left, headers)
            ticket.tpm, ticket.tokens = tokens, estimate  # corrected with the real usage once the answer is in
        if self.fair_queue and (self.queue.count or call.gateway.registry.any_limited):
            return self._queue(call, ticket, limits.high)
        return None  # the usual case, checked here: nobody waits and no backend has a slot to keep

    async def _take_then_queue(self, call: Call, store: Store, ticket: Ticket, estimate: float) -> None:
        """``before_request`` with a shared store (Redis): a round trip for the take (one for both buckets)."""
        requests, tokens = ticket.limits.requests, ticket.limits.tokens
        if requests is not None and tokens is not None:  # both or neither, in one round trip
            answer = await store.take_pair(
                requests.name, 1.0, requests.rate, requests.limit, tokens.name, estimate, tokens.rate, tokens.limit
            )
            settle_pair(requests, tokens, estimate, answer, call.response_headers)
            ticket.tpm, ticket.tokens = tokens, estimate
        elif requests is not None:
            wait, left = await store.take_level(requests.name, 1.0, requests.rate, requests.limit)
            settle(requests, 1.0, wait, left, call.response_headers)
        elif tokens is not None:
            wait, left = await store.take_level(tokens.name, estimate, tokens.rate, tokens.limit)
            settle(tokens, estimate, wait, left, call.response_headers)
            ticket.tpm, ticket.tokens = tokens, estimate
        waiting = self._queue(call, ticket, ticket.limits.high)
        if waiting is not None:
            await waiting

    def _limits(self, call: Call) -> Limits:
        """The caller's names and limits: a key's are kept until its Identity changes; an anonymous client's
        (by address) and another plugin's idea of a caller are made each time."""
        identity, o = call.identity, self.options
        if identity is None:
            address = call.request.remote or "unknown"
            who = f"anonymous client {address}"
            return Limits.of(f"anon:{address}", who, o.anonymous_rpm, o.anonymous_tpm, o.anonymous_max_concurrency)
        if not isinstance(identity, Identity):  # another plugin's idea of a caller: its text is its key
            return Limits.of(f"key:{identity}", f"key '{identity}'", o.rpm, o.tpm, o.max_concurrency)
        if len(self.limits) >= 4096:  # keys come and go (rotated, revoked): never grow without bound
            self.limits.clear()
        limits = self.limits[identity.key_id] = Limits.of(
            f"key:{identity.key_id}", f"key '{identity.name}'",
            identity.rpm or o.rpm, identity.tpm or o.tpm, identity.max_concurrency or o.max_concurrency,
            identity.priority == "high", identity,
        )  # fmt: skip
        return limits

    def _estimate(self, call: Call, tokens: Bucket) -> float:
        """The call's tokens, estimated up front; a 429 if more than its key may ever take in a minute."""
        body = call.json
        completion = body.get("max_completion_tokens") or body.get("max_tokens")
        if call.endpoint == "embeddings":
            completion = 0
        elif not isinstance(completion, int) or completion < 0:
            completion = self.options.default_max_tokens
        elif completion > MOST_TOKENS:  # past any float: 1e400 + 0.5 would raise (and the take never happen)
            completion = MOST_TOKENS
        estimate = len(call.body) * self.tokens_per_byte + completion
        if estimate > tokens.limit:
            message = (
                f"rate limit: this request is estimated at {estimate:.0f} tokens, more than the {tokens.limit} "
                f"tokens a minute allowed for {tokens.who}; lower max_tokens or shorten the prompt"
            )
            raise GatewayError(429, message, code="request_too_large")
        return estimate

    # -- waiting for a backend slot ----------------------------------------------------------

    def _queue(self, call: Call, ticket: Ticket, high: bool) -> Awaitable[None] | None:
        """None when the call may go on now; else the wait for its turn at a backend slot."""
        if not self.options.fair_queue:
            return None
        if not self.queue.count:  # nobody waits: no turn to take
            if not call.gateway.registry.any_limited:  # no backend has a slot to keep
                return None
            free, ticket.held = self._reserve(call.model)
            if free:
                return None
        return self._wait_for_slot(call, ticket, high)

    async def _wait_for_slot(self, call: Call, ticket: Ticket, high: bool) -> None:
        waiter = Waiter(ticket.limits.key, call.model, high)
        queued_at = time.perf_counter()
        admitted = False
        closed = asyncio.ensure_future(peer_closed(call.request).wait())
        try:
            self.queue.add(waiter)
            self.queue.dispatch(self._admit)
            if not waiter.future.done():
                self._look_for_slots()
            async with asyncio.timeout(self.options.max_queue_wait):
                await asyncio.wait((waiter.future, closed), return_when=asyncio.FIRST_COMPLETED)
            if not waiter.future.done():  # the client closed its connection: nobody to answer
                call.client_disconnected = True
                raise GatewayError(499, "the client closed its connection while its request was queued")
            admitted = True
        except TimeoutError:
            wait = self.options.max_queue_wait
            message = (
                f"model '{call.model}' is busy: every backend serving it is at its max_concurrency and this "
                f"request waited {wait:g} s (max_queue_wait) in {ticket.limits.who}'s queue; retry in a few seconds"
            )
            raise GatewayError(429, message, code="queue_timeout", headers={"Retry-After": "5"}) from None
        finally:
            call.tags["queue_wait"] = round(time.perf_counter() - queued_at, 4)  # seconds: logged, and for metrics
            closed.cancel()
            if admitted:
                ticket.held = waiter.slot
            else:  # timed out or the client hung up: leave the queue, and free a slot granted meanwhile
                self.queue.remove(waiter)
                if waiter.slot is not None:
                    self._release(waiter.slot)
                    waiter.slot = None
                waiter.future.cancel()

    def _admit(self, waiter: Waiter) -> bool:
        free, waiter.slot = self._reserve(waiter.model)
        return free

    def _reserve(self, model: str) -> tuple[bool, Backend | None]:
        """Whether the model has room, and the backend whose slot was reserved (None: it has no limit).

        Changes nothing when there is no room.
        """
        gateway = self.gateway
        backends = gateway.registry.for_model(model) if gateway else ()
        best: Backend | None = None
        room = 0
        for backend in backends:
            if backend.max_concurrency is None:
                return True, UNLIMITED
            free = backend.max_concurrency - backend.in_flight - self.held.get(backend.id, 0)
            if free > room:
                best, room = backend, free
        if not backends:
            return True, UNLIMITED  # routing will say why nothing serves it
        if best is None:
            return False, None
        self.held[best.id] = self.held.get(best.id, 0) + 1
        return True, best

    def _release(self, backend: Backend | None) -> None:
        if backend is not None:
            self.held[backend.id] -= 1
            self.queue.dispatch(self._admit)

    def queued(self) -> dict[str, int]:
        """Requests waiting for a backend slot, per model (the ``metrics`` plugin reads it)."""
        return self.queue.by_model()

    @hookimpl(trylast=True)
    def filter_candidates(self, call: Call, candidates: list[Backend]) -> list[Backend] | None:
        """Hand the reserved slot to routing; route no call to a backend already at its max_concurrency."""
        if not self.fair_queue or not call.gateway.registry.any_limited:
            return None
        ticket: Ticket | None = call.state.get("ratelimit")
        reserved = ticket.held if ticket is not None else None
        if ticket is not None and reserved is not None and not call.dry_run:
            ticket.held = None
            self.held[reserved.id] -= 1  # the relay counts it as in_flight before anything else runs
        held = self.held
        open_ = [
            b
            for b in candidates
            if b is reserved or b.max_concurrency is None or b.in_flight + held.get(b.id, 0) < b.max_concurrency
        ]
        if call.dry_run:
            for backend in candidates:
                if backend not in open_:
                    call.explain.setdefault("excluded", {})[backend.name] = "at its max_concurrency"
        return open_ if open_ and len(open_) < len(candidates) else None

    # -- after the call ------------------------------------------------------------------------

    @hookimpl
    def request_complete(self, call: Call) -> None:
        """Release the call's slots; correct its token estimate (at once in the in-process store, in the next
        batch in a shared one): synchronous, so no task is needed for this observer."""
        ticket: Ticket | None = call.state.pop("ratelimit", None)
        if ticket is None:
            return None
        limits = ticket.limits
        if limits.cap is not None:  # counted (the ticket's limits are those before_request read)
            key = limits.key
            left = self.running[key] - 1
            if left:
                self.running[key] = left
            else:
                del self.running[key]
        if ticket.held is not None:  # refused or answered before routing: the slot was never used
            self.held[ticket.held.id] -= 1
        if self.queue.count:
            self.queue.dispatch(self._admit)
        tokens = ticket.tpm
        if tokens is None:
            return None
        # Give back, or take, the difference between the estimate and what the answer used.
        usage = call.usage
        used = usage.get("total_tokens") if usage else None
        if not isinstance(used, NUMBER):
            used = ticket.tokens if call.attempts else 0.0  # no usage reported: keep the estimate
        difference = used - ticket.tokens
        if not difference:
            return None
        if difference > tokens.limit:  # one answer's debt: a minute of tokens at most, whatever a backend reports
            difference = tokens.limit
        store = call.gateway.store
        if store.__class__ is MemoryStore:
            if difference < 0:  # the usual case: the estimate counts max_tokens, the answer is shorter
                store.give_now(tokens.name, -difference)
            else:
                store.take_now(tokens.name, difference, tokens.rate, tokens.limit, True)
            return None
        owed = self.owed.get(tokens.name)  # a shared store: added up, and sent in the next batch (correct)
        if owed is None:
            self.owed[tokens.name] = [difference, tokens.rate, tokens.limit]
        else:
            owed[0] += difference
        return None

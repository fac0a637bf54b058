"""`solaris replay`: drives the real sidecar core, store, speculator and model with a stream of
ranking requests in its own time, and reports what each speculation policy set buys: hit rate,
precision (per policy), why misses missed, compute spent and the age of what was served.

Time is simulated (a clock the core and the speculator read), so a replay is exact and
repeatable: the same events, budget and seed give the same report. At a compute round the
speculator (or the oracle) hands out what the budget allows; what it hands out is fresh from
that moment. Nothing reads the store between two requests, so the pairs of every round between
them are computed with the model through ONNX Runtime in one batch before the next request,
and written with the times of their own rounds (until then, the speculator and the oracle see
them as fresh from those times): a round costs a choice, not a model call. Requests are
answered by the sidecar's own read path. Rounds run on a grid of one-second ticks, but only
where there is work, so a log spanning years costs what its events do.
"""

import asyncio
import math
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from solaris.precompute.features import UserWork
from solaris.precompute.model import ModelConfig
from solaris.precompute.replay_traffic import Event
from solaris.precompute.runner import OnnxRunner
from solaris.precompute.speculator import (
    PREFETCH,
    RETURNING,
    Pair,
    Policy,
    Speculated,
    SpeculationSettings,
    Speculator,
    StaleAt,
)
from solaris.server.core import EmbeddingService
from solaris.server.l1 import MemoryStore
from solaris.server.prefetch_queue import PrefetchQueue
from solaris.server.request_log import LoggedRequest, RequestLog
from solaris.server.settings import SidecarSettings
from solaris.server.store import TIMES, RowStatus

ORACLE = "oracle"
NO_SPECULATION = "no speculation"
ALL = "all policies"
POLICY_SETS: dict[str, frozenset[Policy]] = {
    NO_SPECULATION: frozenset({Policy.MISS}),
    "prefetch+miss+refresh": frozenset({Policy.PREFETCH, Policy.MISS, Policy.REFRESH}),
    "+covisit+popular": frozenset(Policy) - RETURNING,
    ALL: frozenset(Policy),
}
"""Each set a row of the report, each adding policies to the one above; "no speculation" only
fills the store after misses, "all policies" adds return and widen."""


@dataclass
class ReplayResult:
    policy_set: str
    budget: float
    """Pairs per second of the events' time."""
    budget_label: str = ""
    """How the budget was asked for (`1x`: the traffic's own mean pair rate)."""
    rows: int = 0
    served: int = 0
    computed: int = 0
    used: int = 0
    """Computed pairs later requested and served from the store."""
    never_predicted: int = 0
    too_late: int = 0
    """Predicted, but not computed before the request."""
    expired: int = 0
    served_age_ms: float = 0.0
    rounds: int = 0
    """Compute rounds the replay ran (what its cost follows, beside the events)."""
    computed_by: Counter[str] = field(default_factory=Counter)
    used_by: Counter[str] = field(default_factory=Counter)

    @property
    def hit_rate(self) -> float:
        return self.served / self.rows if self.rows else 0.0

    @property
    def precision(self) -> float:
        return self.used / self.computed if self.computed else 0.0

    @property
    def mean_age_s(self) -> float:
        return self.served_age_ms / self.served / 1000 if self.served else 0.0


@dataclass
class Computed:
    """Pairs computed: each computation waits in `unused` (with its policy) until a request
    is served from it; `ever` tells an expired miss from one never computed."""

    unused: dict[Pair, str] = field(default_factory=dict)
    ever: set[Pair] = field(default_factory=set)

    def add(self, pair: Pair, policy: str) -> None:
        self.unused[pair] = policy
        self.ever.add(pair)


class Pending:
    """Pairs handed out since the last request, computed and stored in one batch before the
    next one (`flush`), each with the times of its own round. Until then `stale_at` answers
    for them as the store will, so that no later round takes them again."""

    def __init__(
        self, runner: OnnxRunner, store: MemoryStore, ttl_seconds: float, stale_seconds: float
    ) -> None:
        self.runner = runner
        self.store = store
        self.ttl_seconds = ttl_seconds
        self.stale_seconds = stale_seconds
        self._computed_at: dict[Pair, float] = {}
        """When each pending pair was computed (clock seconds), in the order handed out."""
        self._stale_at: dict[Pair, float] = {}
        """Each pair's stale_at as written or to be written: the replay is the store's only
        writer, so while the store has evicted nothing this is what it holds, and a dict
        answers the speculator's many small look-ups for a fraction of the store's cost."""

    def add(self, pairs: Iterable[Pair], at: float) -> None:
        """Pairs computed at clock time `at`."""
        stale_at = at + self.ttl_seconds  # the arithmetic of flush, so times match exactly
        for pair in pairs:
            self._computed_at.pop(pair, None)  # a pair taken twice keeps its later time
            self._computed_at[pair] = at
            self._stale_at[pair] = stale_at

    def stale_at(self, pairs: Sequence[Pair]) -> np.ndarray:
        """The store's stale_at for `pairs` (-inf if not held), a pending pair's as it will
        be stored."""
        if not self.store.evictions:
            known = self._stale_at
            return np.fromiter((known.get(pair, -math.inf) for pair in pairs), float, len(pairs))
        found = self.store.stale_at(pairs)
        for index, pair in enumerate(pairs):
            at = self._computed_at.get(pair)
            if at is not None:
                found[index] = at + self.ttl_seconds
        return found

    def flush(self, batch_pairs: int = 1_024) -> None:
        """Computes every pending pair with the model, `batch_pairs` at a time, and writes each
        user's pairs in one write, every row with its own round's times."""
        if not self._computed_at:
            return
        items: dict[str, list[str]] = {}
        times: dict[str, list[float]] = {}
        for (user_id, item_id), at in self._computed_at.items():
            items.setdefault(user_id, []).append(item_id)
            times.setdefault(user_id, []).append(at)
        self._computed_at.clear()
        work = [UserWork(user_id, (), tuple(listed)) for user_id, listed in items.items()]
        vectors = np.concatenate(
            [self.runner.compute(batch) for batch in _batches(work, batch_pairs)]
        )
        start = 0
        for user_work in work:
            end = start + len(user_work.item_ids)
            rows = np.empty(len(user_work.item_ids), TIMES)
            # The arithmetic of Freshness.starting, so that times are what the daemon writes.
            rows["computed_at"] = times[user_work.user_id]
            rows["stale_at"] = rows["computed_at"] + self.ttl_seconds
            rows["expires_at"] = rows["stale_at"] + self.stale_seconds
            self.store.write_rows(
                user_work.user_id,
                user_work.item_ids,
                vectors[start:end],
                rows,
                self.runner.model_version,
            )
            start = end


def _batches(work: list[UserWork], pairs: int) -> Iterator[list[UserWork]]:
    """`work` in runs of about `pairs` pairs (a user's work is never split)."""
    batch: list[UserWork] = []
    size = 0
    for user_work in work:
        batch.append(user_work)
        size += len(user_work.item_ids)
        if size >= pairs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


OnRequest = Callable[[Event, MemoryStore, float], object]
"""Hears of each request once answered: the event, the store, and the clock's time."""


class SimulatedClock:
    """Wall-clock seconds as the store understands them, moved by the replay. It starts on a
    whole second, so that whole-second times (a log's) add up exactly and a tie between two
    times (a pair going stale the second it is asked for) falls the same way in every run."""

    def __init__(self) -> None:
        self.start = float(math.floor(time.time()))
        self.now = self.start

    def __call__(self) -> float:
        return self.now


class Source(Protocol):
    """What hands out pairs to compute: the speculator, or the oracle."""

    def take_up_to(self, count: int) -> list[Speculated]: ...

    def wake_at(self) -> float:
        """When it next has work that no event brings (clock seconds; inf if never)."""
        ...


class Oracle:
    """Knows every future request and spends the same budget on the soonest ones whose pairs
    would not be served when asked for (missing, or expired by then), looking no further
    ahead than a computation stays servable (TTL plus stale window). A pair still fresh now
    but not when asked for waits until it goes stale (the daemon computes no fresh pair)."""

    def __init__(
        self,
        requests: Sequence[Event],
        lookahead_seconds: float,
        stale_seconds: float,
        stale_at: StaleAt,
        clock: SimulatedClock,
    ) -> None:
        self.requests = requests
        self.lookahead_seconds = lookahead_seconds
        self.stale_seconds = stale_seconds
        self.stale_at = stale_at
        self.clock = clock
        self._satisfied = np.zeros(len(requests), bool)
        self._first_open = 0
        """Requests before this index are past or have every pair served when asked."""
        self._window_end = 0
        """The first request beyond the lookahead at the last take."""
        self._next_stale = math.inf
        """When the soonest pair left because it was fresh goes stale."""

    def take_up_to(self, count: int) -> list[Speculated]:
        elapsed = self.clock() - self.clock.start
        requests = self.requests
        while self._first_open < len(requests) and (
            self._satisfied[self._first_open] or requests[self._first_open].time < elapsed
        ):
            self._first_open += 1
        chosen: list[Speculated] = []
        chosen_pairs: set[Pair] = set()
        self._next_stale = math.inf
        index = self._first_open
        while index < len(requests) and requests[index].time - elapsed < self.lookahead_seconds:
            if len(chosen) >= count:
                break
            if not self._satisfied[index]:
                self._satisfied[index] = self._hand_out(
                    requests[index], count, chosen, chosen_pairs
                )
            index += 1
        self._window_end = index
        return chosen

    def wake_at(self) -> float:
        """When the first request beyond the lookahead comes into it, or a pair left because
        it was fresh goes stale."""
        if self._window_end >= len(self.requests):
            return self._next_stale
        enters = self.requests[self._window_end].time - self.lookahead_seconds
        return min(self._next_stale, math.nextafter(self.clock.start + enters, math.inf))

    def _hand_out(
        self, event: Event, count: int, chosen: list[Speculated], chosen_pairs: set[Pair]
    ) -> bool:
        """Adds the pairs of `event` that would not be served to `chosen`, up to `count` in
        all; returns whether every pair of it will be served."""
        now = self.clock()
        asked_at = self.clock.start + event.time
        pairs = [(event.user_id, item) for item in event.item_ids]
        stale_at = self.stale_at(pairs)
        missing = stale_at + self.stale_seconds <= asked_at
        satisfied = True
        for pair, is_missing, pair_stale_at in zip(pairs, missing, stale_at, strict=True):
            if not is_missing or pair in chosen_pairs:
                continue
            if pair_stale_at > now:
                self._next_stale = min(self._next_stale, float(pair_stale_at))
                satisfied = False
            elif len(chosen) >= count:
                return False
            else:
                chosen_pairs.add(pair)
                chosen.append(Speculated(pair[0], pair[1], PREFETCH, 1.0))
        return satisfied


@dataclass
class RoundBudget:
    """The budget as a per-tick token bucket would spend it, worked out for any later tick at
    once: `rate` tokens a second; while the source has nothing to do the bucket holds at most
    one tick's worth plus one token (tokens are lost as they would be, tick by tick), and while
    it takes all it is given every token accrues (the ticks the replay skipped would have
    spent them). Times are seconds since the replay's start."""

    rate: float
    tick_seconds: float
    tokens: float = 0.0
    at: float = 0.0
    busy: bool = False

    @property
    def cap(self) -> float:
        return self.rate * self.tick_seconds + 1

    def tokens_at(self, when: float, work_from: float) -> float:
        """Tokens at `when`, the source having had work since `work_from`."""
        if self.busy:
            return self.tokens + self.rate * (when - self.at)
        held = min(self.cap, self.tokens + self.rate * max(0.0, work_from - self.at))
        return held + self.rate * (when - work_from)

    def ticks_until(self, tokens: float, work_from: float) -> int:
        """Whole ticks after `work_from` until the bucket holds `tokens`."""
        short = tokens - self.tokens_at(work_from, work_from)
        return max(0, math.ceil(short / (self.rate * self.tick_seconds) - 1e-9))


class Replay:
    """Replays `events` through the store, speculator and model, the clock jumping from event to
    event: a compute round runs only at a tick where the source has work (after an event,
    when it wakes, or while it takes all it is given), so a replay costs what its events do,
    not its time span. With `round_pairs` 1 it computes exactly what a round at every tick
    would (`every_tick`); above 1, rounds while busy are merged until they hold that many
    pairs (or the next event comes), so a backlog at a small budget costs few rounds."""

    def __init__(
        self,
        events: Sequence[Event],
        runner: OnnxRunner,
        ttl_seconds: float = 600.0,
        stale_seconds: float = 0.0,
        tick_seconds: float = 1.0,
        speculation: SpeculationSettings | None = None,
        round_pairs: int = 1,
        every_tick: bool = False,
    ) -> None:
        """`speculation`: the speculator's settings but for budget and policies (which each
        run gives); TTL, stale window and decay are all in the events' seconds."""
        self.events = sorted(events, key=lambda event: (event.time, not event.is_hint))
        self.runner = runner
        self.ttl_seconds = ttl_seconds
        self.stale_seconds = stale_seconds
        self.tick_seconds = tick_seconds
        self.speculation = speculation or SpeculationSettings()
        self.round_pairs = max(1, round_pairs)
        self.every_tick = every_tick

    def run(
        self,
        policy_set: str | frozenset[Policy],
        budget: float,
        on_request: OnRequest | None = None,
    ) -> ReplayResult:
        """`policy_set`: a name in POLICY_SETS, ORACLE, or a set of policies; `budget`: pairs
        per second of the events' time (any amount above 0). `on_request(event, store, now)`
        is called once each request has been answered."""
        return asyncio.run(self._run(policy_set, budget, on_request))

    async def _run(
        self,
        policy_set: str | frozenset[Policy],
        budget: float,
        on_request: OnRequest | None = None,
    ) -> ReplayResult:
        clock = SimulatedClock()
        items = max((len(event.item_ids) for event in self.events), default=1)
        settings = SidecarSettings(
            dim=self.runner.dim,
            cache_bytes=1024**3,
            ttl_seconds=self.ttl_seconds,
            stale_seconds=self.stale_seconds,
            max_items=max(4096, items),
        )
        store = MemoryStore(settings.cache_bytes, settings.dim)
        request_log = RequestLog()
        reads: list[LoggedRequest] = []
        request_log.listeners.append(reads.append)
        service = EmbeddingService(settings, store, request_log, PrefetchQueue(1), clock=clock)
        pending = Pending(self.runner, store, self.ttl_seconds, self.stale_seconds)

        label = policy_set if isinstance(policy_set, str) else "+".join(sorted(policy_set))
        result = ReplayResult(label, budget)
        predicted: set[Pair] = set()
        computed = Computed()
        speculator: Speculator | None = None
        source: Source
        if policy_set == ORACLE:
            requests = [event for event in self.events if not event.is_hint]
            source = Oracle(
                requests,
                self.ttl_seconds + self.stale_seconds,
                self.stale_seconds,
                pending.stale_at,
                clock,
            )
        else:
            policies = POLICY_SETS[policy_set] if isinstance(policy_set, str) else policy_set
            speculator = Speculator(
                replace(
                    self.speculation,
                    budget_pairs_per_second=budget,
                    policies=policies,
                    ttl_seconds=self.ttl_seconds,
                ),
                pending.stale_at,
                clock,
                on_queue=lambda entry: predicted.add((entry.user_id, entry.item_id)),
            )
            source = speculator
        rounds = _Rounds(self, source, RoundBudget(budget, self.tick_seconds), clock)
        for event in self.events:
            while (round_tick := rounds.next_round(event.time)) is not None:
                taken = rounds.take(round_tick)
                if taken:
                    self._computed(taken, clock(), speculator, pending, computed, result)
            clock.now = clock.start + event.time
            rounds.event_at(event.time)
            if event.is_hint:
                if speculator is not None:
                    speculator.hint(event.user_id, event.item_ids)
                continue
            pending.flush()
            answer = await service.batch_get(event.user_id, event.item_ids)
            self._score(event, answer.statuses, answer.ages_ms, predicted, computed, result)
            if on_request is not None:
                on_request(event, store, clock())
            if speculator is not None:
                speculator.observe(reads)
            reads.clear()
        pending.flush()
        result.rounds = rounds.count
        return result

    @staticmethod
    def _computed(
        taken: list[Speculated],
        at: float,
        speculator: Speculator | None,
        pending: Pending,
        computed: "Computed",
        result: ReplayResult,
    ) -> None:
        """A round's pairs: fresh from `at` (the clock), computed before the next request."""
        pairs = [(entry.user_id, entry.item_id) for entry in taken]
        for pair, entry in zip(pairs, taken, strict=True):
            computed.add(pair, str(entry.policy))
            result.computed_by[str(entry.policy)] += 1
        result.computed += len(set(pairs))  # a round may name a pair twice; it is computed once
        pending.add(pairs, at)
        if speculator is not None:
            speculator.done(pairs)

    def _score(
        self,
        event: Event,
        statuses: np.ndarray,
        ages_ms: np.ndarray,
        predicted: set[Pair],
        computed: "Computed",
        result: ReplayResult,
    ) -> None:
        unused, computed_ever = computed.unused, computed.ever
        result.rows += len(statuses)
        missed = statuses == RowStatus.MISS
        served = np.flatnonzero(~missed)
        result.served += served.size
        for age in ages_ms.take(served).tolist():  # one by one, as floats: the same total
            result.served_age_ms += age  # to the last bit (sum() compensates from 3.12)
        user_id, item_ids = event.user_id, event.item_ids
        for index in served.tolist():
            policy = unused.pop((user_id, item_ids[index]), None)
            if policy is not None:
                result.used += 1
                result.used_by[policy] += 1
        for index in np.flatnonzero(missed).tolist():
            pair = (user_id, item_ids[index])
            if pair in computed_ever:
                result.expired += 1
            elif pair in predicted:
                result.too_late += 1
            else:
                result.never_predicted += 1


class _Rounds:
    """When compute rounds run, on the grid of ticks (tick indices, not seconds, so that a
    long log has no rounding drift), and what each may spend."""

    def __init__(
        self, replay: Replay, source: Source, budget: RoundBudget, clock: SimulatedClock
    ) -> None:
        self.source = source
        self.budget = budget
        self.clock = clock
        self.tick = replay.tick_seconds
        self.round_pairs = replay.round_pairs
        self.every_tick = replay.every_tick
        self.work_from = 0
        """The first tick at which the source may have work (no later than any round)."""
        self.has_work = replay.every_tick
        self.next_free = 0
        """The first tick not yet rounded."""
        self.start = 0
        """The tick from which the source had work, for the round `next_round` chose."""
        self.count = 0

    def event_at(self, at: float) -> None:
        """An event at `at`: the source may have work from the next tick on."""
        after = math.floor(at / self.tick) + 1
        self.work_from = after if not self.has_work else min(self.work_from, after)
        self.has_work = True

    def next_round(self, before: float) -> int | None:
        """The tick of the next round no later than time `before`, or None."""
        last = math.floor(before / self.tick)
        start = self.work_from if self.has_work else math.inf
        wake = self.source.wake_at()
        if math.isfinite(wake):
            start = min(start, math.ceil((wake - self.clock.start) / self.tick - 1e-9))
        if math.isinf(start):
            return None
        self.start = max(int(start), self.next_free)
        if self.start > last:
            return None
        if self.every_tick:
            return self.start
        need = max(1.0, self.round_pairs)
        return min(last, self.start + self.budget.ticks_until(need, self.start * self.tick))

    def take(self, tick: int) -> list[Speculated]:
        """The round at `tick`: what the source hands out of the budget then."""
        when = tick * self.tick
        budget = self.budget
        tokens = budget.tokens_at(when, self.start * self.tick)
        self.clock.now = self.clock.start + when
        self.next_free = tick + 1
        allowed = int(tokens)
        budget.tokens, budget.at = tokens, when
        self.count += 1
        if allowed == 0:
            self.work_from = max(self.work_from, tick + 1)
            return []
        taken = self.source.take_up_to(allowed)
        budget.tokens -= len(taken)
        budget.busy = len(taken) == allowed
        self.has_work = budget.busy or self.every_tick
        self.work_from = tick + 1
        return taken


REPLAY_MODEL = ModelConfig(
    dim=16,
    model_width=32,
    heads=2,
    layers=1,
    feedforward_width=64,
    mlp_width=64,
    history_cap=16,
)
"""Hit rates do not depend on what the model computes, only on which pairs get computed: the
replay runs a small model through the same runner, so that the model costs a sweep little."""


@dataclass(frozen=True)
class Budget:
    pairs_per_second: float
    label: str


def demand(events: Sequence[Event]) -> float:
    """The traffic's mean pair rate: pairs requested per second over the span of its requests
    (at least one second)."""
    requests = [event for event in events if not event.is_hint]
    if not requests:
        return 0.0
    span = max(event.time for event in requests) - min(event.time for event in requests)
    return sum(len(event.item_ids) for event in requests) / max(span, 1.0)


@dataclass(frozen=True)
class Ceiling:
    """What any causal policy could have served: requested rows by what was known before them.
    A row whose user or item no earlier request named cannot be computed ahead by a policy
    that learns only from requests; the others could, at some cost."""

    rows: int = 0
    new_user: int = 0
    """Rows of a user's first request."""
    new_item: int = 0
    """Rows of an item no earlier request named (the user seen before)."""
    repeat_within: int = 0
    """Rows repeating the user's request of the pair within the window (TTL and stale
    window): computing every miss at once serves them."""
    repeat_older: int = 0
    """Rows repeating a pair requested longer ago: served by renewing it in time."""
    other_item: int = 0
    """Rows of an item requested before, but never for this user: served by a good guess."""

    @property
    def reachable(self) -> float:
        """The share of rows some causal policy could have served: the ceiling."""
        return 1 - (self.new_user + self.new_item) / self.rows if self.rows else 0.0


def causal_ceiling(events: Sequence[Event], window_seconds: float) -> Ceiling:
    """Each requested row of `events` by what the requests before it showed."""
    users: set[str] = set()
    items: set[str] = set()
    last_asked: dict[Pair, float] = {}
    counts = Counter[str]()
    for event in events:
        if event.is_hint:
            continue
        known_user = event.user_id in users
        for item in event.item_ids:
            asked = last_asked.get((event.user_id, item))
            if not known_user:
                counts["new_user"] += 1
            elif asked is not None:
                counts[
                    "repeat_within" if event.time - asked <= window_seconds else "repeat_older"
                ] += 1
            elif item in items:
                counts["other_item"] += 1
            else:
                counts["new_item"] += 1
        for item in event.item_ids:
            last_asked[(event.user_id, item)] = event.time
        items.update(event.item_ids)
        users.add(event.user_id)
    return Ceiling(rows=counts.total(), **counts)


def format_ceiling(ceiling: Ceiling, results: Sequence[ReplayResult]) -> str:
    """The ceiling, and each budget's oracle and target (80 % of the oracle) against it."""
    rows = max(ceiling.rows, 1)
    parts = (
        f"first request of its user {ceiling.new_user / rows:.1%}",
        f"item never requested before {ceiling.new_item / rows:.1%}",
        f"pair requested within the TTL and stale window {ceiling.repeat_within / rows:.1%}",
        f"pair requested longer ago {ceiling.repeat_older / rows:.1%}",
        f"item requested before by others only {ceiling.other_item / rows:.1%}",
    )
    lines = [
        f"causal ceiling {ceiling.reachable:.3f}: the share of the {ceiling.rows:,} requested "
        "rows whose user and item some earlier request named (no policy that learns from "
        "requests can compute the rest ahead). Rows: " + "; ".join(parts) + "."
    ]
    for r in results:
        if r.policy_set == ORACLE and ceiling.reachable:
            target = 0.8 * r.hit_rate
            lines.append(
                f"  {r.budget_label or f'{r.budget:g}/s'}: the oracle {r.hit_rate:.3f}; 80 % of "
                f"it, {target:.3f}, is {target / ceiling.reachable:.0%} of the ceiling"
            )
    return "\n".join(lines)


def resolve_budgets(specs: Sequence[tuple[float, bool]], mean_rate: float) -> list[Budget]:
    """(value, relative) pairs as budgets: a relative one is `value` times `mean_rate`."""
    return [
        Budget(value * mean_rate, f"{value:g}x") if relative else Budget(value, f"{value:g}/s")
        for value, relative in specs
    ]


def sweep(
    replay: Replay,
    budgets: Sequence[Budget],
    progress: bool = False,
    jobs: int = 1,
) -> list[ReplayResult]:
    """Every policy set, then the oracle, at every budget, in that order; `jobs` runs at a
    time in processes of their own (each run is independent; one process holds one run's
    store and speculator, so memory grows with `jobs`, not with the runs). A progress bar on
    stderr with `progress` (tqdm leaves it out where stderr is not a terminal)."""
    from tqdm import tqdm

    runs = [(budget, policy_set) for budget in budgets for policy_set in (*POLICY_SETS, ORACLE)]
    results: list[ReplayResult | None] = [None] * len(runs)
    with tqdm(
        total=len(runs), disable=None if progress else True, unit=" runs", leave=False
    ) as bar:
        for index, result in _runs(replay, runs, jobs):
            result.budget_label = runs[index][0].label
            results[index] = result
            bar.update(1)
    return [result for result in results if result is not None]


_SWEPT: Replay | None = None
"""The replay a sweep's worker processes run: forked with it, so neither the traffic nor the
model is sent to them."""


def _runs(
    replay: Replay, runs: Sequence[tuple[Budget, str]], jobs: int
) -> Iterator[tuple[int, ReplayResult]]:
    """Each run's index and result, as they finish."""
    if jobs <= 1 or len(runs) <= 1:
        for index, (budget, policy_set) in enumerate(runs):
            yield index, replay.run(policy_set, budget.pairs_per_second)
        return
    global _SWEPT
    _SWEPT = replay
    try:
        # Forked, not spawned: a spawned worker would import the model stack again (seconds
        # and hundreds of MB each); the forked ones share the parent's pages.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(jobs, len(runs)), mp_context=context) as pool:
            futures = {
                pool.submit(_run_swept, policy_set, budget.pairs_per_second): index
                for index, (budget, policy_set) in enumerate(runs)
            }
            for future in as_completed(futures):
                yield futures[future], future.result()
    finally:
        _SWEPT = None


def _run_swept(policy_set: str, budget: float) -> ReplayResult:
    assert _SWEPT is not None, "a sweep's worker runs the replay it was forked with"
    return _SWEPT.run(policy_set, budget)


COLUMNS = {
    "budget": "pairs per second the runner may compute (Nx: N times the traffic's mean pair rate)",
    "policy set": "the speculation policies on, each row adding to the one above",
    "hit rate": "requested pairs served from the store (HIT or STALE) / requested pairs",
    "of oracle": "hit rate / the oracle's hit rate at the same budget",
    "gap closed": "(hit rate - no speculation's) / (the oracle's - no speculation's)",
    "precision": "computed pairs later served / computed pairs",
    "computed": "pairs computed",
    "never": "missed rows never predicted",
    "late": "missed rows predicted but not computed before the request",
    "expired": "missed rows computed earlier, expired by the request",
    "age s": "mean age of the served embeddings, seconds",
}


def format_report(results: Sequence[ReplayResult]) -> str:
    widths = [9, 22, 8, 9, 10, 9, 10, 8, 8, 8, 9]
    lines = ["  ".join(f"{name:>{width}}" for name, width in zip(COLUMNS, widths, strict=True))]
    oracle = {r.budget_label: r.hit_rate for r in results if r.policy_set == ORACLE}
    floor = {r.budget_label: r.hit_rate for r in results if r.policy_set == NO_SPECULATION}
    for r in results:
        best, none = oracle.get(r.budget_label), floor.get(r.budget_label)
        share = f"{r.hit_rate / best:.0%}" if best else "-"
        closed = (
            f"{(r.hit_rate - none) / (best - none):.0%}"
            if best is not None and none is not None and best > none
            else "-"
        )
        cells = [
            r.budget_label or f"{r.budget:g}/s",
            r.policy_set,
            f"{r.hit_rate:.3f}",
            share,
            closed,
            f"{r.precision:.3f}",
            f"{r.computed:,}",
            f"{r.never_predicted:,}",
            f"{r.too_late:,}",
            f"{r.expired:,}",
            f"{r.mean_age_s:,.0f}",
        ]
        lines.append(
            "  ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True))
        )
    lines.append("")
    lines.append("precision by policy: pairs computed / later served / precision")
    for r in results:
        if r.policy_set != ORACLE and r.computed_by:
            cells = [
                f"{policy} {r.computed_by[policy]:,}/{r.used_by[policy]:,}/"
                f"{r.used_by[policy] / r.computed_by[policy]:.2f}"
                for policy in sorted(r.computed_by)
            ]
            label = r.budget_label or f"{r.budget:g}/s"
            lines.append(f"{label:>9}  {r.policy_set:<22} " + "  ".join(cells))
    lines.append("")
    lines.append("columns:")
    lines += [f"  {name:<10} {meaning}" for name, meaning in COLUMNS.items()]
    budgets = {r.budget_label: r.budget for r in results}
    lines.append(
        "  budgets: " + ", ".join(f"{label} = {rate:.4g}/s" for label, rate in budgets.items())
    )
    return "\n".join(lines)


MARKERS = "osD^vP"
STYLES = ["-", "--", "-.", ":", "-", "--"]


def plot(results: Sequence[ReplayResult], path: str, title: str) -> None:
    """Hit rate and precision against budget, one line per policy set and the oracle; lines
    differ in marker and dash, and each is nudged sideways a little so that equal ones show."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    budgets = sorted({(r.budget, r.budget_label) for r in results})
    position = {label: index for index, (_, label) in enumerate(budgets)}
    figure, (hits, precision) = pyplot.subplots(1, 2, figsize=(12, 5.5), sharex=True)
    sets = (*POLICY_SETS, ORACLE)
    for number, policy_set in enumerate(sets):
        rows = sorted(
            (position[r.budget_label], r.hit_rate, r.precision)
            for r in results
            if r.policy_set == policy_set
        )
        if not rows:
            continue
        nudge = (number - (len(sets) - 1) / 2) * 0.04
        x = [row[0] + nudge for row in rows]
        style = {
            "marker": MARKERS[number % len(MARKERS)],
            "linestyle": STYLES[number % len(STYLES)],
            "label": policy_set,
            "markersize": 6,
        }
        hits.plot(x, [row[1] for row in rows], **style)
        if policy_set != ORACLE:
            precision.plot(x, [row[2] for row in rows], **style)
    for axes, name in ((hits, "hit rate"), (precision, "precision (computed pairs later served)")):
        axes.set_xticks(range(len(budgets)), [f"{label}\n{rate:.3g}/s" for rate, label in budgets])
        axes.set_xlim(-0.5, len(budgets) - 0.5)
        axes.set_ylim(-0.02, 1.05)
        axes.set_xlabel("compute budget (pairs per second of traffic time)")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
    handles, labels = hits.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=120, bbox_inches="tight")
    pyplot.close(figure)

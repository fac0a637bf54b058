"""The speculator: turns signals into a prioritised, de-duplicated queue of pairs to compute,
under a compute budget. The store is only as good as its hit rate, and compute is only well
spent on pairs that are later requested, so a pair's priority is the value of the signals that
asked for it: each signal is worth its policy's weight times how likely that policy thinks a
request is, and that worth decays with the signal's age (a user's interest is strongest right
after they showed it). Signals for the same pair add up, so a pair missed twice goes before a
pair missed once, and a fresh miss before one from minutes ago.

Policies, strongest signal first:
  prefetch  the ranker said the user will score these items (Prefetch hints);
  miss      the pair was requested and missed: the user's next request will likely want it;
  refresh   the pair was requested and goes stale soon: computed again once it is stale
            (never while fresh), while it is still served as STALE, before it expires;
  covisit   items that other users' requests show together with this user's recent
            candidates (co-visitation), for users active recently;
  popular   the most requested items, for users active recently;
  return    a user's latest candidates, computed again as they go stale while the user is
            likely to come back before the new ones would go stale (a `ReturnModel` learns
            each user's gaps between visits), valued by that chance;
  widen     for the same users at the same moments, their other recent items and the items
            co-visited with them, valued by the same chance times their co-visit score.
Covisit and popular are expansion: they fill only the budget the first three leave, drawing on
a `TrafficModel` of recent requests. Return and widen spend budget that would go unused while
demand is below it: their looks at a user are due at set times (`wake_at`), so a caller that
skips idle time (the replay) knows when to look again. A pair already fresh in the store is
never handed out, and every pair remembers the policy that asked for it.
"""

import heapq
import itertools
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from solaris.precompute.return_model import ReturnModel, ReturnSettings
from solaris.precompute.traffic_model import Scored, TrafficModel, TrafficSettings
from solaris.server.request_log import LoggedRequest
from solaris.server.store import RowStatus
from solaris.wire import MAX_PRIORITY

Pair = tuple[str, str]
StaleAt = Callable[[Sequence[Pair]], np.ndarray]
"""`pairs -> stale_at per pair` (-inf for a pair the store lacks). One call covers many pairs,
so that a store across the network answers a batch of reads in one round trip."""


class Policy(StrEnum):
    """Why a pair is asked for; see the module docstring."""

    PREFETCH = "prefetch"
    MISS = "miss"
    REFRESH = "refresh"
    COVISIT = "covisit"
    POPULAR = "popular"
    RETURN = "return"
    WIDEN = "widen"


# Members as module names: on Python 3.11 `Policy.MISS` is a metaclass __getattr__ call, a
# cost on paths run for every pair.
PREFETCH, MISS, REFRESH = Policy.PREFETCH, Policy.MISS, Policy.REFRESH
COVISIT, POPULAR, RETURN, WIDEN = Policy.COVISIT, Policy.POPULAR, Policy.RETURN, Policy.WIDEN
EXPANSION = frozenset({COVISIT, POPULAR, RETURN, WIDEN})
"""Guesses, not evidence: offered again, so their offers do not add up."""
RETURNING = frozenset({RETURN, WIDEN})

DEFAULT_WEIGHTS = {
    Policy.PREFETCH: 1.0,
    Policy.MISS: 0.8,
    Policy.REFRESH: 0.6,
    Policy.COVISIT: 0.3,
    Policy.POPULAR: 0.1,
    Policy.RETURN: 0.5,
    Policy.WIDEN: 0.2,
}


@dataclass(frozen=True)
class SpeculationSettings:
    """The queue's budget, policies and bounds, and the traffic model's."""

    budget_pairs_per_second: float = 500.0
    policies: frozenset[Policy] = frozenset(Policy)
    weights: dict[Policy, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    refresh_window_seconds: float = 300.0
    """A requested pair whose freshness ends within this window is refreshed."""
    decay_seconds: float = 60.0
    """A signal's value falls by a factor of e every this many seconds."""
    max_queued_pairs: int = 200_000
    """Past this, the least valuable half of the queue is dropped."""
    in_flight_seconds: float = 60.0
    """A pair handed out is not handed out again until `done` or for this long."""
    traffic: TrafficSettings = field(default_factory=TrafficSettings)
    """What the traffic model behind expansion remembers, when the speculator builds it."""
    ttl_seconds: float = 600.0
    """How long a computed pair stays fresh in the store: return and widen look at a user
    again as their pairs go stale, and ask whether they will be back within this long."""
    returns: ReturnSettings = field(default_factory=ReturnSettings)
    widen_items: int = 50
    """The most pairs widen offers a user at one look."""

    def __post_init__(self) -> None:
        for name in ("budget_pairs_per_second", "decay_seconds", "ttl_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be above 0, got {getattr(self, name)}")


class TokenBucket:
    """The budget: `rate` tokens a second, holding at most one second's worth (or one token,
    so that a budget below one pair a second saves up for whole pairs)."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = 0.0
        self._at = now

    def spendable(self, now: float) -> int:
        self.tokens = min(max(self.rate, 1.0), self.tokens + max(0.0, now - self._at) * self.rate)
        self._at = max(self._at, now)
        return int(self.tokens)

    def spend(self, count: float) -> None:
        self.tokens -= count


@dataclass(frozen=True, slots=True)
class Speculated:
    """A pair the speculator queued or handed out."""

    user_id: str
    item_id: str
    policy: Policy
    """The strongest policy that asked for the pair."""
    priority: float
    """The log of the pair's decayed value, plus the time since the speculator started over
    `decay_seconds`: every queued pair decays at the same rate, so comparing these orders the
    queue by value now without ever updating them."""


@dataclass
class SpeculatorStats:
    """Counters since start, by policy."""

    queued: Counter[Policy] = field(default_factory=Counter)
    handed_out: Counter[Policy] = field(default_factory=Counter)
    skipped_fresh: int = 0
    dropped_full: int = 0


class Speculator:
    """The queue under the budget. What it learns of traffic beyond the pairs it queues lives
    in `traffic`, which it feeds every read it observes."""

    def __init__(
        self,
        settings: SpeculationSettings,
        stale_at: StaleAt,
        clock: Callable[[], float] = time.time,
        on_queue: Callable[[Speculated], None] | None = None,
        traffic: TrafficModel | None = None,
    ) -> None:
        """`on_queue` sees every pair as it is queued (the replay uses it to tell a miss that
        was never predicted from one predicted too late). `traffic`: a model to learn into and
        expand from, by default one of `settings.traffic` (counting co-visits only with the
        covisit policy)."""
        self.settings = settings
        self.traffic = traffic if traffic is not None else _traffic_model(settings)
        self._on_queue = on_queue
        self.stats = SpeculatorStats()
        self._stale_at = stale_at
        self._clock = clock
        self._heap: list[tuple[float, int, Speculated]] = []
        self._queued: dict[Pair, Speculated] = {}
        self._order = itertools.count()
        self._started_at = clock()
        self._bucket = TokenBucket(settings.budget_pairs_per_second, clock())
        self.returns = ReturnModel(settings.returns)
        self._handed_out: OrderedDict[Pair, float] = OrderedDict()

    def hint(self, user_id: str, item_ids: Iterable[str], priority: int = 0) -> None:
        """A Prefetch: the ranker will score these soon. Its priority (0 to 1000) raises the
        hint's value up to twice that of a plain one."""
        now = self._clock()
        score = 1.0 + priority / MAX_PRIORITY
        for item_id in item_ids:
            self._offer(user_id, item_id, PREFETCH, score, now)

    def observe(self, requests: Iterable[LoggedRequest]) -> None:
        """Reads the sidecar answered: misses and soon-stale pairs to compute, and the
        traffic that expansion draws on. Each read's signals are valued as of its own time, so
        a read learnt late is worth less. With return or widen on, a miss is also worth the
        user's chance to come back before its pair would go stale: budget short of every miss
        goes to users who will read them."""
        refresh = REFRESH in self.settings.policies
        returning = bool(RETURNING & self.settings.policies)
        horizon = self._clock() + self.settings.refresh_window_seconds
        for request in requests:
            self.traffic.learn(request.user_id, request.item_ids)
            at = min(request.time, self._clock())
            miss_value = 1.0
            if returning:
                ttl = self.settings.ttl_seconds
                self.returns.visit(request.user_id, request.time, request.item_ids)
                self.returns.schedule(request.user_id, request.time + ttl)
                miss_value = self._miss_value(request.user_id, request.time)
            missed = request.statuses == RowStatus.MISS
            for index in np.flatnonzero(missed):
                self._offer(request.user_id, request.item_ids[index], MISS, miss_value, at)
            if refresh:
                due = ~missed & (request.stale_at < horizon)
                for index in np.flatnonzero(due):
                    self._offer(request.user_id, request.item_ids[index], REFRESH, 1.0, at)

    def _miss_value(self, user_id: str, at: float) -> float:
        """The user's chance to be back within a TTL, no less than the least worth renewing
        (1 until any user has been seen to come back)."""
        if not self.returns.gaps_seen:
            return 1.0
        chance = self.returns.probability(user_id, at, self.settings.ttl_seconds)
        return max(chance, self.settings.returns.min_probability)

    def take(self, max_pairs: int | None = None, max_users: int | None = None) -> list[Speculated]:
        """The best pairs not already fresh, as many as the budget allows since the last take
        (and at most `max_pairs`, of at most `max_users` users). Expansion fills what the
        queue leaves."""
        allowed = self._bucket.spendable(self._clock())
        if max_pairs is not None:
            allowed = min(allowed, max_pairs)
        chosen = self.take_up_to(allowed, max_users)
        self._bucket.spend(len(chosen))
        return chosen

    def take_up_to(self, count: int, max_users: int | None = None) -> list[Speculated]:
        """`take` without the budget, for a caller that keeps the budget itself (the replay):
        up to `count` of the best pairs not already fresh. Where expansion's pairs turn out
        fresh, it expands more users, so that budget goes unused only when no user is left."""
        self._look_at_due_users()
        chosen: list[Speculated] = []
        while True:
            if len(self._queued) < count - len(chosen):
                self._expand(count - len(chosen))
            chosen += self._choose(count - len(chosen), max_users)
            if len(chosen) >= count or max_users is not None or not self.traffic.unexpanded:
                break
        self._hand_out(chosen)
        return chosen

    def wake_at(self) -> float:
        """When the speculator next has work that no new signal brings: the next look due at
        a returning user (inf if none)."""
        return self.returns.next_due() if RETURNING & self.settings.policies else math.inf

    def put_back(self, entries: Iterable[Speculated]) -> None:
        """Taken but not passed on (the work stream did not take them): queued again as they
        were, and the budget they used given back."""
        for entry in entries:
            self._handed_out.pop((entry.user_id, entry.item_id), None)
            self.stats.handed_out[entry.policy] -= 1
            self._bucket.spend(-1)
            self._requeue(entry)

    def done(self, pairs: Iterable[Pair]) -> None:
        """These pairs are computed and stored: no longer in flight."""
        for pair in pairs:
            self._handed_out.pop(pair, None)

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def tracked_items(self) -> int:
        """Items whose popularity (and neighbours) the traffic model remembers."""
        return self.traffic.tracked_items

    def _choose(self, allowed: int, max_users: int | None) -> list[Speculated]:
        """Up to `allowed` of the best queued pairs that the store does not hold fresh."""
        chosen: list[Speculated] = []
        users: set[str] = set()
        while len(chosen) < allowed:
            batch = self._pop(allowed - len(chosen), users, max_users)
            if not batch:
                break
            try:
                chosen += self._not_fresh(batch)
            except Exception:  # the store did not answer: nothing taken is lost
                for entry in chosen + batch:
                    self._requeue(entry)
                raise
        return chosen

    def _hand_out(self, chosen: list[Speculated]) -> None:
        """Counts the pairs and marks them in flight; the oldest marks go past a bound."""
        now = self._clock()
        for entry in chosen:
            self.stats.handed_out[entry.policy] += 1
            self._handed_out[(entry.user_id, entry.item_id)] = now
            self._handed_out.move_to_end((entry.user_id, entry.item_id))
        while len(self._handed_out) > self.settings.max_queued_pairs:
            self._handed_out.popitem(last=False)

    def _offer(self, user_id: str, item_id: str, policy: Policy, score: float, at: float) -> None:
        """A signal of `policy` at time `at` that `(user_id, item_id)` will be requested."""
        if policy not in self.settings.policies:
            return
        value = self.settings.weights[policy] * score
        pair = (user_id, item_id)
        if value <= 0 or self._in_flight(pair):
            return
        priority = math.log(value) + (at - self._started_at) / self.settings.decay_seconds
        queued = self._queued.get(pair)
        if queued is None:
            self._queue_new(Speculated(user_id, item_id, policy, priority))
        else:
            self._raise(queued, policy, priority)

    def _queue_new(self, entry: Speculated) -> None:
        if len(self._queued) >= self.settings.max_queued_pairs:
            self._drop_least_valuable()
        self._push(entry)
        self.stats.queued[entry.policy] += 1
        if self._on_queue is not None:
            self._on_queue(entry)

    def _raise(self, queued: Speculated, policy: Policy, priority: float) -> None:
        """Another signal for a queued pair: evidence adds up, a guess only replaces a weaker
        value; the pair keeps the stronger policy."""
        if policy in EXPANSION:
            if queued.priority >= priority:
                return
        else:
            priority = _log_sum(queued.priority, priority)
        weights = self.settings.weights
        policy = max(queued.policy, policy, key=lambda known: weights[known])
        self._push(Speculated(queued.user_id, queued.item_id, policy, priority))

    def _push(self, entry: Speculated) -> None:
        """Queues `entry` over any earlier one for its pair; the heap keeps the earlier entry
        until it is popped or the heap grows past twice the queue."""
        self._queued[(entry.user_id, entry.item_id)] = entry
        heapq.heappush(self._heap, (-entry.priority, next(self._order), entry))
        if len(self._heap) > 2 * len(self._queued) + 1_000:
            self._rebuild_heap()

    def _requeue(self, entry: Speculated) -> None:
        pair = (entry.user_id, entry.item_id)
        queued = self._queued.get(pair)
        if queued is None or queued.priority < entry.priority:
            self._queued[pair] = entry
            heapq.heappush(self._heap, (-entry.priority, next(self._order), entry))

    def _drop_least_valuable(self) -> None:
        """Keeps the better half of a full queue: dropping half at once keeps the cost of
        choosing them to one sort per `max_queued_pairs / 2` offers."""
        keep = self.settings.max_queued_pairs // 2
        self.stats.dropped_full += len(self._queued) - keep
        kept = heapq.nlargest(keep, self._queued.values(), key=lambda entry: entry.priority)
        self._queued = {(entry.user_id, entry.item_id): entry for entry in kept}
        self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        """Drops the heap's entries that a later offer for the same pair replaced."""
        self._heap = [
            (-entry.priority, next(self._order), entry) for entry in self._queued.values()
        ]
        heapq.heapify(self._heap)

    def _in_flight(self, pair: Pair) -> bool:
        handed_out_at = self._handed_out.get(pair)
        in_flight = self.settings.in_flight_seconds
        return handed_out_at is not None and self._clock() - handed_out_at < in_flight

    def _pop(self, count: int, users: set[str], max_users: int | None) -> list[Speculated]:
        """Up to `count` queued pairs, best first, while their users (added to `users`) number
        at most `max_users`; entries a better offer replaced are skipped."""
        popped: list[Speculated] = []
        while self._heap and len(popped) < count:
            entry = self._heap[0][2]
            pair = (entry.user_id, entry.item_id)
            if self._queued.get(pair) is entry and entry.user_id not in users:
                if max_users is not None and len(users) >= max_users:
                    break
                users.add(entry.user_id)
            heapq.heappop(self._heap)
            if self._queued.get(pair) is entry:
                del self._queued[pair]
                popped.append(entry)
        return popped

    def _not_fresh(self, entries: list[Speculated]) -> list[Speculated]:
        stale_at = self._stale_at([(entry.user_id, entry.item_id) for entry in entries])
        fresh = stale_at > self._clock()
        self.stats.skipped_fresh += int(fresh.sum())
        return [entry for entry, is_fresh in zip(entries, fresh, strict=True) if not is_fresh]

    def _expand(self, room: int) -> None:
        """Offers covisit and popular pairs to users who made a request since they were last
        expanded, most recent first, until `room` pairs are queued. Each request earns its
        user one expansion: an idle speculator does no work, and a busy one does it once."""
        now = self._clock()
        policies = self.settings.policies
        top = self.traffic.popular() if POPULAR in policies else []
        while len(self._queued) < room:
            user_id = self.traffic.pop_unexpanded_user()
            if user_id is None:
                return
            if COVISIT in policies:
                self._offer_all(user_id, self.traffic.neighbours(user_id), COVISIT, now)
            if top:
                seen = self.traffic.recent_items(user_id)
                unseen = [(item_id, score) for item_id, score in top if item_id not in seen]
                self._offer_all(user_id, unseen, POPULAR, now)

    def _look_at_due_users(self) -> None:
        """Each user due for a look whose chance of a return within the next TTL is worth it:
        their latest candidates that are no longer fresh are offered for return (the fresh
        ones are looked at again when they go stale); once none is fresh, their other recent
        items and co-visited items for widen, so that all are fresh as long. One read of the
        store covers every user due."""
        if not RETURNING & self.settings.policies:
            return
        now = self._clock()
        ttl = self.settings.ttl_seconds
        chances = {
            user_id: self.returns.probability(user_id, now, ttl)
            for user_id in self.returns.pop_due(now)
        }
        worth = {
            user_id: chance
            for user_id, chance in chances.items()
            if chance >= self.settings.returns.min_probability
        }
        pairs = [(user, item) for user in worth for item in self.returns.last_items(user)]
        if not pairs:
            return
        stale_at = iter(self._stale_at(pairs))
        for user_id, chance in worth.items():
            latest = self.returns.last_items(user_id)
            fresh_until = [float(next(stale_at)) for _ in latest]
            due = [item for item, until in zip(latest, fresh_until, strict=True) if until <= now]
            self._offer_all(user_id, [(item, chance) for item in due], RETURN, now)
            if len(due) < len(latest):
                self.returns.schedule(user_id, min(until for until in fresh_until if until > now))
                continue
            if WIDEN in self.settings.policies:
                self._offer_all(user_id, self._wider(user_id, latest, chance), WIDEN, now)
            self.returns.schedule(user_id, now + ttl)

    def _wider(self, user_id: str, latest: tuple[str, ...], chance: float) -> Scored:
        """The user's other recent items, newest first, then items co-visited with them."""
        shown = set(latest)
        own = [
            item for item in reversed(list(self.traffic.recent_items(user_id))) if item not in shown
        ]
        scored = [(item, chance) for item in own]
        scored += [(item, chance * score) for item, score in self.traffic.neighbours(user_id)]
        return scored[: self.settings.widen_items]

    def _offer_all(self, user_id: str, scored: Scored, policy: Policy, now: float) -> None:
        for item_id, score in scored:
            self._offer(user_id, item_id, policy, score, now)


def _traffic_model(settings: SpeculationSettings) -> TrafficModel:
    """Counting co-visits is most of what learning costs: done only for the policies that
    draw on them (covisit, widen)."""
    draws = {COVISIT, WIDEN} & settings.policies
    return TrafficModel(settings.traffic, covisits=bool(draws))


def by_user(entries: Iterable[Speculated]) -> dict[str, list[Speculated]]:
    """Entries grouped into one list per user (a task each), users in order of their first
    entry."""
    grouped: dict[str, list[Speculated]] = {}
    for entry in entries:
        grouped.setdefault(entry.user_id, []).append(entry)
    return grouped


def _log_sum(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) without overflow."""
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))

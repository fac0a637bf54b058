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
  popular   the most requested items, for users active recently.
The last two are expansion: they fill only the budget the first three leave. A pair already
fresh in the store is never handed out, and every pair remembers the policy that asked for it.
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

from solaris.server.request_log import LoggedRequest
from solaris.server.store import RowStatus
from solaris.wire import MAX_PRIORITY

Pair = tuple[str, str]
FreshUntil = Callable[[Sequence[Pair]], np.ndarray]
"""`pairs -> stale_at per pair` (-inf for a pair the store lacks). One call covers many pairs,
so that a store across the network answers a batch of reads in one round trip."""


class Policy(StrEnum):
    PREFETCH = "prefetch"
    MISS = "miss"
    REFRESH = "refresh"
    COVISIT = "covisit"
    POPULAR = "popular"


EXPANSION = frozenset({Policy.COVISIT, Policy.POPULAR})
"""Guesses, not evidence: offered again at every take, so their offers do not add up."""

DEFAULT_WEIGHTS = {
    Policy.PREFETCH: 1.0,
    Policy.MISS: 0.8,
    Policy.REFRESH: 0.6,
    Policy.COVISIT: 0.3,
    Policy.POPULAR: 0.1,
}


@dataclass(frozen=True)
class SpeculationSettings:
    budget_pairs_per_second: float = 500.0
    policies: frozenset[Policy] = frozenset(Policy)
    weights: dict[Policy, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    refresh_window_seconds: float = 300.0
    """A requested pair whose freshness ends within this window is refreshed."""
    recent_users: int = 10_000
    """Users whose recent candidates feed expansion, most recently active kept."""
    recent_items_per_user: int = 200
    neighbours_per_item: int = 20
    """Co-visited items kept per item, most frequent first."""
    covisit_items_per_request: int = 20
    """Co-visitation counts the first this many items of a request (the cost is their square),
    and expansion starts from a user's latest this many items."""
    max_tracked_items: int = 20_000
    """Items whose popularity and neighbours are kept (each keeps up to 4 x neighbours_per_item
    counts); past this the rarer half is forgotten and the rest's counts halved."""
    decay_seconds: float = 60.0
    """A signal's value falls by a factor of e every this many seconds."""
    max_queued_pairs: int = 200_000
    """Past this, the least valuable half of the queue is dropped."""
    in_flight_seconds: float = 60.0
    """A pair handed out is not handed out again until `done` or for this long."""

    def __post_init__(self) -> None:
        for name in ("budget_pairs_per_second", "decay_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be above 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class Speculated:
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
    queued: Counter[Policy] = field(default_factory=Counter)
    handed_out: Counter[Policy] = field(default_factory=Counter)
    skipped_fresh: int = 0
    dropped_full: int = 0


class Speculator:
    def __init__(
        self,
        settings: SpeculationSettings,
        fresh_until: FreshUntil,
        clock: Callable[[], float] = time.time,
        on_queue: Callable[[Speculated], None] | None = None,
    ) -> None:
        """`on_queue` sees every pair as it is queued (the replay uses it to tell a miss that
        was never predicted from one predicted too late)."""
        self.settings = settings
        self._on_queue = on_queue
        self.stats = SpeculatorStats()
        self._fresh_until = fresh_until
        self._clock = clock
        self._heap: list[tuple[float, int, Speculated]] = []
        self._queued: dict[Pair, Speculated] = {}
        self._order = itertools.count()
        self._started_at = clock()
        self._tokens = 0.0
        self._tokens_at = clock()
        self._recent: OrderedDict[str, dict[str, None]] = OrderedDict()
        self._unexpanded: OrderedDict[str, None] = OrderedDict()
        """Users with a request since their last expansion, most recent last."""
        self._covisits: dict[str, Counter[str]] = {}
        self._popularity: Counter[str] = Counter()
        self._handed_out: OrderedDict[Pair, float] = OrderedDict()

    def hint(self, user_id: str, item_ids: Iterable[str], priority: int = 0) -> None:
        """A Prefetch: the ranker will score these soon. Its priority (0 to 1000) raises the
        hint's value up to twice that of a plain one."""
        now = self._clock()
        score = 1.0 + priority / MAX_PRIORITY
        for item_id in item_ids:
            self._offer(user_id, item_id, Policy.PREFETCH, score, now)

    def observe(self, requests: Iterable[LoggedRequest]) -> None:
        """Reads the sidecar answered: misses and soon-stale pairs to compute, and the
        co-visitation and popularity that expansion draws on. Each read's signals are valued
        as of its own time, so a read learnt late is worth less."""
        refresh = Policy.REFRESH in self.settings.policies
        horizon = self._clock() + self.settings.refresh_window_seconds
        for request in requests:
            self._remember(request.user_id, request.item_ids)
            at = min(request.time, self._clock())
            missed = request.statuses == RowStatus.MISS
            for index in np.flatnonzero(missed):
                self._offer(request.user_id, request.item_ids[index], Policy.MISS, 1.0, at)
            if refresh:
                due = ~missed & (request.stale_at < horizon)
                for index in np.flatnonzero(due):
                    self._offer(request.user_id, request.item_ids[index], Policy.REFRESH, 1.0, at)

    def take(self, max_pairs: int | None = None, max_users: int | None = None) -> list[Speculated]:
        """The best pairs not already fresh, as many as the budget allows since the last take
        (and at most `max_pairs`, of at most `max_users` users). Expansion fills what the
        queue leaves."""
        allowed = self._spendable()
        if max_pairs is not None:
            allowed = min(allowed, max_pairs)
        if len(self._queued) < allowed:
            self._expand(allowed)
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
        self._tokens -= len(chosen)
        now = self._clock()
        for entry in chosen:
            self.stats.handed_out[entry.policy] += 1
            self._handed_out[(entry.user_id, entry.item_id)] = now
            self._handed_out.move_to_end((entry.user_id, entry.item_id))
        while len(self._handed_out) > self.settings.max_queued_pairs:
            self._handed_out.popitem(last=False)
        return chosen

    def put_back(self, entries: Iterable[Speculated]) -> None:
        """Taken but not passed on (the work stream did not take them): queued again as they
        were, and the budget they used given back."""
        for entry in entries:
            self._handed_out.pop((entry.user_id, entry.item_id), None)
            self.stats.handed_out[entry.policy] -= 1
            self._tokens += 1
            self._requeue(entry)

    def done(self, pairs: Iterable[Pair]) -> None:
        """These pairs are computed and stored: no longer in flight."""
        for pair in pairs:
            self._handed_out.pop(pair, None)

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def tracked_items(self) -> int:
        """Items whose popularity (and neighbours) the speculator remembers."""
        return len(self._popularity)

    def _spendable(self) -> int:
        """A token bucket: the budget accrues with time, up to one second's worth."""
        now = self._clock()
        rate = self.settings.budget_pairs_per_second
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        return int(self._tokens)

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
        if queued is not None:
            if policy in EXPANSION:
                if queued.priority >= priority:
                    return
            else:
                priority = _log_sum(queued.priority, priority)
            weights = self.settings.weights
            policy = max(queued.policy, policy, key=lambda known: weights[known])
        elif len(self._queued) >= self.settings.max_queued_pairs:
            self._drop_least_valuable()
        entry = Speculated(user_id, item_id, policy, priority)
        self._queued[pair] = entry
        heapq.heappush(self._heap, (-priority, next(self._order), entry))
        if len(self._heap) > 2 * len(self._queued) + 1_000:
            self._rebuild_heap()
        if queued is None:
            self.stats.queued[policy] += 1
            if self._on_queue is not None:
                self._on_queue(entry)

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
        fresh_until = self._fresh_until([(entry.user_id, entry.item_id) for entry in entries])
        fresh = fresh_until > self._clock()
        self.stats.skipped_fresh += int(fresh.sum())
        return [entry for entry, is_fresh in zip(entries, fresh, strict=True) if not is_fresh]

    def _remember(self, user_id: str, item_ids: Sequence[str]) -> None:
        head = self._head(item_ids)
        recent = self._recent.pop(user_id, {})
        for item_id in self._recency_order(item_ids, head):
            recent.pop(item_id, None)
            recent[item_id] = None
        while len(recent) > self.settings.recent_items_per_user:
            del recent[next(iter(recent))]
        self._recent[user_id] = recent
        self._unexpanded.pop(user_id, None)
        self._unexpanded[user_id] = None
        if len(self._recent) > self.settings.recent_users:
            forgotten, _ = self._recent.popitem(last=False)
            self._unexpanded.pop(forgotten, None)
        self._popularity.update(item_ids)
        self._count_covisits(head)
        if len(self._popularity) > self.settings.max_tracked_items:
            self._forget_rare_items()

    def _head(self, item_ids: Sequence[str]) -> list[str]:
        """The items of a request that co-visitation counts, and expansion starts from."""
        return list(dict.fromkeys(item_ids))[: self.settings.covisit_items_per_request]

    def _recency_order(self, item_ids: Sequence[str], head: list[str]) -> list[str]:
        """A request's items in the order a user's recent items take them: the head last, so
        that a user's newest items are the head of their latest request."""
        in_head = set(head)
        return [item for item in item_ids if item not in in_head] + head

    def _count_covisits(self, unique: list[str]) -> None:
        """The head of one request co-occurs; each item keeps its strongest neighbours."""
        if Policy.COVISIT not in self.settings.policies:
            return
        keep = self.settings.neighbours_per_item
        for item_id in unique:
            neighbours = self._covisits.setdefault(item_id, Counter())
            neighbours.update(unique)
            del neighbours[item_id]
            if len(neighbours) > 4 * keep:
                self._covisits[item_id] = Counter(dict(neighbours.most_common(keep)))

    def _forget_rare_items(self) -> None:
        """Keeps the memory of items bounded under item churn: the more requested half stays,
        and its counts are halved so that what is popular now can overtake what was."""
        kept = self._popularity.most_common(self.settings.max_tracked_items // 2)
        self._popularity = Counter({item: (count + 1) // 2 for item, count in kept})
        self._covisits = {
            item: neighbours
            for item, neighbours in self._covisits.items()
            if item in self._popularity
        }

    def _expand(self, room: int) -> None:
        """Offers covisit and popular pairs to users who made a request since they were last
        expanded, most recent first, until `room` pairs are queued. Each request earns its
        user one expansion: an idle speculator does no work, and a busy one does it once."""
        now = self._clock()
        top: list[tuple[str, int]] = []
        if Policy.POPULAR in self.settings.policies:
            top = self._popularity.most_common(self.settings.neighbours_per_item)
        while self._unexpanded and len(self._queued) < room:
            user_id, _ = self._unexpanded.popitem()
            if Policy.COVISIT in self.settings.policies:
                self._offer_neighbours(user_id, now)
            if top:
                self._offer_popular(user_id, top, now)

    def _offer_popular(self, user_id: str, top: list[tuple[str, int]], now: float) -> None:
        most = top[0][1]
        seen = self._recent[user_id]
        for item_id, count in top:
            if item_id not in seen:
                self._offer(user_id, item_id, Policy.POPULAR, count / most, now)

    def _offer_neighbours(self, user_id: str, now: float) -> None:
        seen = self._recent[user_id]
        scores: Counter[str] = Counter()
        for item_id in list(seen)[-self.settings.covisit_items_per_request :]:
            scores.update(self._covisits.get(item_id, {}))
        for item_id in seen:
            scores.pop(item_id, None)
        if not scores:
            return
        most = max(scores.values())
        for other, count in scores.most_common(self.settings.neighbours_per_item):
            self._offer(user_id, other, Policy.COVISIT, count / most, now)


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

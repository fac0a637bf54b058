"""When does a user come back? Learnt from the times of their requests, so that the speculator
can renew a user's pairs as they go stale while that user is likely to read them again, and
let them lapse once that is unlikely.

Each user's own recent gaps between requests are blended with the gaps of every user (a prior
worth `prior_visits` gaps, which is all a user seen once has) and with the share of requests
that are never followed by another (most users of a real service visit once or twice). From
that mixture, the chance that a user who last came `s` seconds ago comes back within the next
`w` seconds is the share of the gaps longer than `s` that end before `s + w`. Memory is
bounded: the least recently active users are forgotten past `users`.
"""

import heapq
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

_BINS = 48
"""Gaps are histogrammed by powers of two of seconds, from 1 s to about 9 million years."""


@dataclass(frozen=True)
class ReturnSettings:
    gaps_per_user: int = 16
    """A user's latest gaps between requests that their own pattern is learnt from."""
    prior_visits: float = 2.0
    """How many gaps the pattern of all users counts for, in each user's own."""
    min_probability: float = 0.05
    """Below this chance of a return within the next TTL, a user's pairs are left to lapse."""
    users: int = 10_000
    """Users whose visits are remembered, the least recently active forgotten first."""
    requests: int = 1
    """How many of a user's latest requests return renews the items of (a user who comes
    back often asks again for what they were shown a few visits ago, not only at the last)."""

    def __post_init__(self) -> None:
        if min(self.gaps_per_user, self.users, self.requests) < 1 or self.prior_visits < 0:
            raise ValueError(
                "gaps_per_user, users and requests must be 1 or more, prior_visits 0 or more"
            )
        if not 0 <= self.min_probability <= 1:
            raise ValueError(f"min_probability: must be in [0, 1], got {self.min_probability}")


@dataclass
class _Visits:
    last_at: float
    requested: deque[tuple[str, ...]]
    """The items of the user's latest requests, newest last."""
    gaps: deque[float]
    last_items: tuple[str, ...] = ()
    """Their items, each once, the newest request's first."""


class ReturnModel:
    """Users' visits, the chance of their return, and when each is next due for a look."""

    def __init__(self, settings: ReturnSettings | None = None) -> None:
        self.settings = settings or ReturnSettings()
        self._users: OrderedDict[str, _Visits] = OrderedDict()
        self._gap_counts = np.zeros(_BINS)
        self._requests = 0
        self._first_visits = 0
        self._due: list[tuple[float, str]] = []
        self._due_at: dict[str, float] = {}

    def visit(self, user_id: str, at: float, item_ids: tuple[str, ...]) -> None:
        """A request by `user_id` at `at` over `item_ids` (the items its renewal will cover)."""
        self._requests += 1
        visits = self._users.pop(user_id, None)
        if visits is None:
            self._first_visits += 1
            visits = _Visits(
                at,
                deque(maxlen=self.settings.requests),
                deque(maxlen=self.settings.gaps_per_user),
            )
        elif at > visits.last_at:
            gap = at - visits.last_at
            visits.gaps.append(gap)
            self._gap_counts[_bin(gap)] += 1
        visits.last_at = max(at, visits.last_at)
        visits.requested.append(item_ids)
        visits.last_items = (
            item_ids
            if len(visits.requested) == 1
            else tuple(dict.fromkeys(itertools.chain.from_iterable(reversed(visits.requested))))
        )
        self._users[user_id] = visits
        if len(self._users) > self.settings.users:
            forgotten, _ = self._users.popitem(last=False)
            self._due_at.pop(forgotten, None)

    @property
    def gaps_seen(self) -> int:
        """Gaps between two requests of a user seen so far, all users together."""
        return int(self._gap_counts.sum())

    def last_items(self, user_id: str) -> tuple[str, ...]:
        """The items of the user's latest `requests` requests, each once, newest first."""
        visits = self._users.get(user_id)
        return visits.last_items if visits else ()

    def probability(self, user_id: str, now: float, window: float) -> float:
        """The chance that `user_id` makes a request in `(now, now + window]`, given none since
        their last one (0 for a user not remembered)."""
        visits = self._users.get(user_id)
        if visits is None:
            return 0.0
        since = max(0.0, now - visits.last_at)
        survive_now = self._survival(visits, since)
        if survive_now <= 0:
            return 0.0
        return max(0.0, 1 - self._survival(visits, since + window) / survive_now)

    def schedule(self, user_id: str, at: float) -> None:
        """Look at `user_id` again at `at` (replacing an earlier plan)."""
        if user_id in self._users:
            self._due_at[user_id] = at
            heapq.heappush(self._due, (at, user_id))
            if len(self._due) > 2 * len(self._due_at) + 1_000:
                self._due = [(when, user) for user, when in self._due_at.items()]
                heapq.heapify(self._due)

    def pop_due(self, now: float) -> list[str]:
        """Users whose look is due by `now`, soonest first; each plan is used once."""
        due: list[str] = []
        while self._due and self._due[0][0] <= now:
            at, user_id = heapq.heappop(self._due)
            if self._due_at.get(user_id) == at:
                del self._due_at[user_id]
                due.append(user_id)
        return due

    def next_due(self) -> float:
        """When the next look is due (inf if none is planned)."""
        while self._due and self._due_at.get(self._due[0][1]) != self._due[0][0]:
            heapq.heappop(self._due)
        return self._due[0][0] if self._due else math.inf

    def _survival(self, visits: _Visits, after: float) -> float:
        """The blended share of a user's next gaps longer than `after` (a never-returning
        user's gap counts as endless)."""
        own = sum(1 for gap in visits.gaps if gap > after)
        prior = self.settings.prior_visits
        returning = 1 - self._first_visits / self._requests if self._requests else 0.0
        everyone = returning * self._global_survival(after) + (1 - returning)
        return (own + prior * everyone) / (len(visits.gaps) + prior)

    def _global_survival(self, after: float) -> float:
        total = self._gap_counts.sum()
        if total == 0:
            return 1.0
        position = math.log2(max(after, 1.0))
        whole = min(int(position), _BINS - 1)
        above = self._gap_counts[whole + 1 :].sum()
        within = self._gap_counts[whole] * (1 - (position - whole))
        return float((above + max(0.0, within)) / total)


def _bin(gap: float) -> int:
    return min(_BINS - 1, int(math.log2(max(gap, 1.0))))

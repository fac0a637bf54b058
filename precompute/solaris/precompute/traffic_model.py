"""A model of recent ranking traffic, learnt from the requests the sidecar answers: which users
were active recently and their recent candidates, how often items are requested (popularity),
and which items are requested together (co-visitation). It answers "which items go with these",
"which items are most requested" and "who was active recently", in memory bounded however many
users and items pass through: the least recently active users are forgotten, and past a bound
the rarer half of the items.

The speculator draws its expansion candidates from it (the covisit and popular policies), and
it stands on its own for anything else that needs the same picture of traffic.
"""

import itertools
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class TrafficSettings:
    """Bounds on what the model of traffic remembers."""

    recent_users: int = 10_000
    """Users whose recent items are kept, most recently active kept."""
    recent_items_per_user: int = 200
    neighbours_per_item: int = 20
    """Co-visited items kept per item, most frequent first; also how many candidates
    `neighbours` and `popular` return."""
    covisit_items_per_request: int = 20
    """Co-visitation counts the first this many items of a request (the cost is their square),
    and a user's neighbours start from their latest this many items."""
    max_tracked_items: int = 20_000
    """Items whose popularity and neighbours are kept (each keeps up to 4 x neighbours_per_item
    counts); past this the rarer half is forgotten and the rest's counts halved."""

    def __post_init__(self) -> None:
        for setting in fields(self):
            if getattr(self, setting.name) < 1:
                raise ValueError(
                    f"{setting.name}: must be 1 or more, got {getattr(self, setting.name)}"
                )


Scored = list[tuple[str, float]]
"""Items with a score in (0, 1], relative to the best of them, best first."""


class TrafficModel:
    """What recent requests show: each user's recent items, which items are requested together
    (co-visitation) and which most (popularity); bounded in users and items."""

    def __init__(self, settings: TrafficSettings | None = None, covisits: bool = True) -> None:
        """`covisits=False` skips counting co-visitation (the dearest part of `learn`) for a
        user of the model that never asks for it; `covisited` then finds nothing."""
        self.settings = settings or TrafficSettings()
        self._counts_covisits = covisits
        self._recent: OrderedDict[str, dict[str, None]] = OrderedDict()
        """Each user's recent items (oldest first), users least recently active first."""
        self._unexpanded: OrderedDict[str, None] = OrderedDict()
        """Users with a request since they were last popped, most recent last."""
        self._covisits: dict[str, Counter[str]] = {}
        self._popularity: Counter[str] = Counter()
        self._popular: Scored | None = None
        """`popular()` until the next request changes the counts: asked for at every
        expansion, and sorting thousands of counts each time cost a replay most of its CPU."""

    def learn(self, user_id: str, item_ids: Sequence[str]) -> None:
        """One request: `user_id` was ranked over `item_ids`."""
        head = self._head(item_ids)
        self._remember_user(user_id, item_ids, head)
        self._popularity.update(item_ids)
        self._popular = None
        self._count_covisits(head)
        if len(self._popularity) > self.settings.max_tracked_items:
            self._forget_rare_items()

    def neighbours(self, user_id: str) -> Scored:
        """Items co-visited with the user's latest items that the user has not been shown
        recently (none for a user not active recently)."""
        seen = self._recent.get(user_id, {})
        latest = list(seen)[-self.settings.covisit_items_per_request :]
        return self.covisited(latest, exclude=seen)

    def covisited(self, item_ids: Iterable[str], exclude: Collection[str] = ()) -> Scored:
        """The items most often requested together with `item_ids` (their co-visit counts
        added up), neither among them nor in `exclude`."""
        item_ids = list(item_ids)
        scores: Counter[str] = Counter()
        for item_id in item_ids:
            scores.update(self._covisits.get(item_id, {}))
        for item_id in itertools.chain(item_ids, exclude):
            scores.pop(item_id, None)
        return _relative(scores.most_common(self.settings.neighbours_per_item))

    def popular(self) -> Scored:
        """The most requested items, with their share of the top item's count."""
        if self._popular is None:
            top = self._popularity.most_common(self.settings.neighbours_per_item)
            self._popular = _relative(top)
        return list(self._popular)

    def recent_items(self, user_id: str) -> Collection[str]:
        """The user's recent items, oldest first (empty for a user not active recently)."""
        return self._recent.get(user_id, {}).keys()

    def active_users(self) -> list[str]:
        """Users active recently, most recent first."""
        return list(reversed(self._recent))

    def pop_unexpanded_user(self) -> str | None:
        """The most recently active user with a request since they were last popped (None if
        there is none): each request earns its user one turn, so a caller that expands users
        does no work while traffic is idle and none twice for the same request."""
        if not self._unexpanded:
            return None
        user_id, _ = self._unexpanded.popitem()
        return user_id

    @property
    def unexpanded(self) -> int:
        """Users with a request since they were last popped."""
        return len(self._unexpanded)

    @property
    def tracked_items(self) -> int:
        """Items whose popularity (and neighbours) the model remembers."""
        return len(self._popularity)

    def _remember_user(self, user_id: str, item_ids: Sequence[str], head: list[str]) -> None:
        """Moves the request's items to the end of the user's recent items, the head last (so
        that a user's newest items are the head of their latest request), and lets the oldest
        go past the bound: built in one pass, as moving them one by one would leave them."""
        earlier = self._recent.pop(user_id, {})
        newest = _last_occurrences(item_ids, exclude=head) + head
        keep = self.settings.recent_items_per_user
        if len(newest) < keep:
            requested = set(newest)
            newest = [item for item in earlier if item not in requested] + newest
        self._recent[user_id] = dict.fromkeys(newest[-keep:])
        self._unexpanded.pop(user_id, None)
        self._unexpanded[user_id] = None
        if len(self._recent) > self.settings.recent_users:
            forgotten, _ = self._recent.popitem(last=False)
            self._unexpanded.pop(forgotten, None)

    def _head(self, item_ids: Sequence[str]) -> list[str]:
        """The items of a request that co-visitation counts, and neighbours start from: its
        first this many distinct items."""
        count = self.settings.covisit_items_per_request
        head = dict.fromkeys(item_ids[:count])
        if len(head) < count < len(item_ids):
            head = dict.fromkeys(item_ids)
        return list(head)[:count]

    def _count_covisits(self, unique: list[str]) -> None:
        """The head of one request co-occurs; each item keeps its strongest neighbours."""
        if not self._counts_covisits:
            return
        keep = self.settings.neighbours_per_item
        for item_id in unique:
            neighbours = self._covisits.get(item_id)
            if neighbours is None:
                neighbours = self._covisits[item_id] = Counter()
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


def _last_occurrences(item_ids: Sequence[str], exclude: list[str]) -> list[str]:
    """Each distinct item not in `exclude` once, ordered by where it last occurs."""
    last_first = dict.fromkeys(reversed(item_ids))
    for item_id in exclude:
        last_first.pop(item_id, None)
    return list(reversed(last_first))


def _relative(counted: list[tuple[str, int]]) -> Scored:
    """Counts, best first, as shares of the best."""
    if not counted:
        return []
    most = counted[0][1]
    return [(item_id, count / most) for item_id, count in counted]

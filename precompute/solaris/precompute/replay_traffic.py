"""Ranking traffic to replay: a synthetic generator with knobs a user can reason about, and a
loader that turns interaction logs (`user,item,timestamp[,rating]`, the MovieLens layout) into
ranking requests without letting anything from the future into a request."""

import csv
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, slots=True)
class Event:
    """At `time` (seconds from the start), `user_id` is ranked over `item_ids` (a request), or
    the ranker hints that it soon will be (a Prefetch)."""

    time: float
    user_id: str
    item_ids: tuple[str, ...]
    is_hint: bool = False


@dataclass(frozen=True)
class SyntheticTraffic:
    users: int = 2_000
    items: int = 5_000
    user_zipf: float = 1.1
    """Skew of how often users come back (Zipf exponent)."""
    item_zipf: float = 1.1
    """Skew of item popularity."""
    duration_seconds: float = 1_800.0
    sessions_per_second: float = 1.0
    requests_per_session: int = 4
    seconds_between_requests: float = 30.0
    candidates: int = 50
    overlap: float = 0.6
    """Share of a request's candidates carried over from the user's previous request."""
    new_items_per_minute: float = 10.0
    """Item churn: new items arrive, and each request draws some of its candidates from them."""
    hinted_share: float = 0.3
    """Share of requests the ranker announces with a Prefetch `hint_lead_seconds` before."""
    hint_lead_seconds: float = 5.0
    seed: int = 0

    def events(self) -> list[Event]:
        return sorted(_Generator(self).run(), key=lambda event: (event.time, event.is_hint))


class _Generator:
    def __init__(self, knobs: SyntheticTraffic) -> None:
        self.knobs = knobs
        self.rng = np.random.default_rng(knobs.seed)
        self.user_weights = _zipf_weights(knobs.users, knobs.user_zipf)
        self.item_weights = _zipf_weights(knobs.items, knobs.item_zipf)
        self.last_list: dict[int, list[str]] = {}

    def run(self) -> Iterator[Event]:
        knobs = self.knobs
        sessions = self.rng.poisson(knobs.sessions_per_second * knobs.duration_seconds)
        starts = np.sort(self.rng.uniform(0, knobs.duration_seconds, sessions))
        users = self.rng.choice(knobs.users, size=sessions, p=self.user_weights)
        for start, user in zip(starts, users, strict=True):
            for index in range(knobs.requests_per_session):
                at = start + index * knobs.seconds_between_requests
                if at >= knobs.duration_seconds:
                    break
                items = tuple(self._candidates(int(user), at))
                yield Event(float(at), f"user-{user}", items)
                if self.rng.random() < knobs.hinted_share:
                    yield Event(max(0.0, at - knobs.hint_lead_seconds), f"user-{user}", items, True)

    def _candidates(self, user: int, at: float) -> list[str]:
        knobs = self.knobs
        previous = self.last_list.get(user, [])
        carried = [item for item in previous if self.rng.random() < knobs.overlap]
        chosen = dict.fromkeys(carried)
        arrived = int(at / 60 * knobs.new_items_per_minute)
        while len(chosen) < knobs.candidates:
            if arrived and self.rng.random() < 0.1:
                chosen[f"new-{self.rng.integers(max(0, arrived - 100), arrived)}"] = None
            else:
                chosen[f"item-{self.rng.choice(knobs.items, p=self.item_weights)}"] = None
        items = list(chosen)[: knobs.candidates]
        self.last_list[user] = items
        return items


def _zipf_weights(count: int, exponent: float) -> np.ndarray:
    weights: np.ndarray = 1.0 / np.arange(1, count + 1) ** exponent
    weights /= weights.sum()
    return weights


@dataclass(frozen=True)
class LogReplay:
    """How an interaction log becomes ranking requests."""

    visit_gap_seconds: float = 1_800.0
    """A gap longer than this in a user's timestamps starts a new visit (one request)."""
    candidates: int = 50
    recent_items: int = 20
    """The user's latest items that seed co-visitation retrieval."""


def load_interactions(path: Path) -> list[tuple[str, str, float]]:
    """(user, item, timestamp) rows of a CSV with a header naming user/userId, item/movieId
    and timestamp columns (a rating column, if present, is not used), oldest first.

    Raises:
        ValueError: the file is not such a CSV; the message names it (and the line).
    """
    try:
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            columns = _columns(reader.fieldnames or (), path)
            rows = [_interaction(row, columns, path, reader.line_num) for row in reader]
    except (csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a CSV of text ({error})") from None
    return sorted(rows, key=lambda row: row[2])


def _columns(header: Sequence[str], path: Path) -> tuple[str, str, str]:
    fields = {name.lower(): name for name in header}
    user = fields.get("user") or fields.get("userid")
    item = fields.get("item") or fields.get("movieid") or fields.get("itemid")
    stamp = fields.get("timestamp")
    if not (user and item and stamp):
        shown = repr(list(header))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(
            f"{path}: needs a header naming user (or userId), item (or movieId) and timestamp "
            f"columns; its first line reads as {shown}"
        )
    return user, item, stamp


def _interaction(
    row: Mapping[str, str | None], columns: tuple[str, str, str], path: Path, line: int
) -> tuple[str, str, float]:
    user, item, stamp = (row.get(name) for name in columns)
    try:
        time = float(stamp or "")
    except ValueError:
        time = math.nan
    if user is None or item is None or not math.isfinite(time):
        raise ValueError(f"{path}, line {line}: needs a user, an item and a timestamp in seconds")
    return user, item, time


def requests_from_log(rows: Iterable[tuple[str, str, float]], how: LogReplay) -> list[Event]:
    """One request per user visit, at the visit's first interaction, whose candidates a
    simple retrieval stage picks from what was known strictly before that moment: items
    co-visited with the user's recent items, then the most popular ones. The visit's own
    interactions (and anything later) are never seen by its request."""
    retrieval = _Retrieval(how)
    events: list[Event] = []
    start: float | None = None
    last_seen: dict[str, float] = {}
    for user, item, stamp in rows:
        start = stamp if start is None else start
        previous = last_seen.get(user)
        if previous is None or stamp - previous > how.visit_gap_seconds:
            candidates = retrieval.candidates(user)
            if candidates:
                events.append(Event(stamp - start, user, tuple(candidates)))
        last_seen[user] = stamp
        retrieval.learn(user, item)
    return events


class _Retrieval:
    """Co-visitation and popularity, learnt one interaction at a time. Each item keeps its
    strongest neighbours only (past four times `candidates` of them, the weaker half goes, as
    in the speculator's traffic model), sorted again only once it has changed, and popularity
    is counted in an array, so that a log of years turns into requests in seconds."""

    def __init__(self, how: LogReplay) -> None:
        self.how = how
        self.covisits: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.recent: defaultdict[str, list[str]] = defaultdict(list)
        self._top: dict[str, list[tuple[str, int]]] = {}
        self._changed: set[str] = set()
        self._index: dict[str, int] = {}
        self._names: list[str] = []
        self._counts = np.zeros(1024, np.int64)

    def candidates(self, user: str) -> list[str]:
        seen = set(self.recent[user])
        scores: Counter[str] = Counter()
        for item in self.recent[user]:
            for other, count in self._neighbours(item):
                if other not in seen:
                    scores[other] += count
        chosen = [item for item, _ in scores.most_common(self.how.candidates)]
        for item in self._popular(self.how.candidates + len(seen)):
            if len(chosen) >= self.how.candidates:
                break
            if item not in seen and item not in chosen:
                chosen.append(item)
        return chosen

    def learn(self, user: str, item: str) -> None:
        recent = self.recent[user]
        for other in recent[-self.how.recent_items :]:
            if other != item:
                self._covisit(item, other)
                self._covisit(other, item)
        recent.append(item)
        del recent[: max(0, len(recent) - self.how.recent_items)]
        self._count(item)

    def _covisit(self, item: str, other: str) -> None:
        neighbours = self.covisits[item]
        neighbours[other] += 1
        self._changed.add(item)
        if len(neighbours) > 4 * self.how.candidates:
            self.covisits[item] = Counter(dict(neighbours.most_common(2 * self.how.candidates)))

    def _neighbours(self, item: str) -> list[tuple[str, int]]:
        if item in self._changed or item not in self._top:
            self._top[item] = self.covisits[item].most_common(self.how.candidates)
            self._changed.discard(item)
        return self._top[item]

    def _count(self, item: str) -> None:
        index = self._index.setdefault(item, len(self._names))
        if index == len(self._names):
            self._names.append(item)
            if index >= self._counts.size:
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
        self._counts[index] += 1

    def _popular(self, count: int) -> list[str]:
        """The `count` most counted items, most first (ties: the first counted first)."""
        counts = self._counts[: len(self._names)]
        if counts.size > count:
            top = np.argpartition(-counts, count - 1)[:count]
        else:
            top = np.arange(counts.size)
        top = top[np.lexsort((top, -counts[top]))]
        return [self._names[index] for index in top]


def write_synthetic_log(path: Path, users: int, items: int, days: float, seed: int) -> int:
    """A CSV in the MovieLens ratings layout (the `week` profile: every user a Poisson stream
    of two short visits a day); returns its rows."""
    rng = np.random.default_rng(seed)
    weights = _zipf_weights(items, 1.0)
    rows = 0
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["userId", "movieId", "rating", "timestamp"])
        for user in range(users):
            visits = max(1, rng.poisson(days * 2))
            for visit in np.sort(rng.uniform(0, days * 86_400, visits)):
                for step in range(rng.integers(1, 8)):
                    item = rng.choice(items, p=weights)
                    rating = math.ceil(rng.uniform(0, 5))
                    writer.writerow([user, item, rating, int(visit + step * 60)])
                    rows += 1
    return rows


LOG_PROFILES = ("realistic", "week")
"""`realistic`: heavy-tailed users over years; `week`: every user a Poisson stream of short
visits over a week (the first generator, kept to compare with)."""


@dataclass(frozen=True)
class RealisticLog:
    """An interaction log shaped like public rating logs: half the users come once (one burst
    of ratings, as a new user rates what they know), the rest come back a heavy-tailed number
    of times (a few thousands of visits), in bursts of visits hours apart separated by gaps of
    weeks to years; items are released over the whole span, taste runs in genres, and what is
    new and popular is rated most."""

    users: int = 600
    items: int = 9_000
    days: float = 7_300.0
    seed: int = 0
    once_share: float = 0.5
    """Users who visit once."""
    visits_tail: float = 0.8
    """The Pareto exponent of the number of visits of the others (smaller: a heavier tail)."""
    burst_share: float = 0.6
    """Share of gaps between visits that are hours (a burst), the rest weeks to years."""
    genres: int = 40
    taste: float = 0.7
    """Share of a user's ratings from their two favourite genres."""

    def rows(self) -> Iterator[tuple[int, int, int, int]]:
        """(user, item, rating, timestamp) rows, user by user."""
        rng = np.random.default_rng(self.seed)
        span = self.days * 86_400
        catalogue = _Catalogue(self, rng, span)
        for user in range(self.users):
            favourites = rng.choice(self.genres, size=2, replace=False)
            rated: set[int] = set()
            for visit, start in enumerate(self._visits(rng, span)):
                count = 15 + rng.geometric(0.05) if visit == 0 else rng.geometric(0.1)
                at = start
                for _ in range(count):
                    item = catalogue.pick(rng, at, favourites, rated)
                    if item is not None:
                        rated.add(item)
                        yield user, item, int(rng.integers(1, 6)), int(at)
                    at += rng.uniform(10, 120)

    def _visits(self, rng: np.random.Generator, span: float) -> list[float]:
        """Visit times: bursts hours apart, between gaps whose typical length fits the user's
        visits into the log's span (a user with a thousand visits comes back every few days)."""
        if rng.random() < self.once_share:
            count = 1
        else:
            count = 2 + min(5_000, int(3 * rng.pareto(self.visits_tail)))
        start = rng.uniform(0, span * 0.95)
        typical_gap = (span - start) / (count * (1 - self.burst_share) + 1)
        at, starts = start, [start]
        while len(starts) < count:
            if rng.random() < self.burst_share:
                at += 1_900 + rng.lognormal(math.log(3 * 3_600), 1.0)
            else:
                at += rng.lognormal(math.log(typical_gap), 1.0)
            if at >= span:
                break
            starts.append(at)
        return starts


class _Catalogue:
    """Items by genre in order of release, each with a lasting appeal; a pick favours the
    user's genres, appeal and what came out recently."""

    def __init__(self, log: RealisticLog, rng: np.random.Generator, span: float) -> None:
        self.release = np.sort(rng.uniform(-0.2 * span, span, log.items))
        self.genre = rng.integers(0, log.genres, log.items)
        self.appeal = rng.pareto(1.2, log.items) + 0.05
        self.by_genre = [np.flatnonzero(self.genre == genre) for genre in range(log.genres)]
        self.taste = log.taste
        self.genres = log.genres

    def pick(
        self, rng: np.random.Generator, at: float, favourites: np.ndarray, rated: set[int]
    ) -> int | None:
        genre = (
            int(rng.choice(favourites))
            if rng.random() < self.taste
            else int(rng.integers(self.genres))
        )
        members = self.by_genre[genre]
        out = members[: np.searchsorted(self.release[members], at, side="right")]
        if not out.size:
            return None
        age_years = (at - self.release[out]) / (365 * 86_400)
        weights = self.appeal[out] * (0.2 + np.exp(-age_years))
        cumulative = np.cumsum(weights)
        for _ in range(5):
            drawn = np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")
            item = int(out[min(int(drawn), out.size - 1)])
            if item not in rated:
                return item
        return None


def write_log(path: Path, profile: str, users: int, items: int, days: float, seed: int) -> int:
    """A generated log of `profile` (one of LOG_PROFILES) in the MovieLens ratings layout;
    returns its rows."""
    if profile == "week":
        return write_synthetic_log(path, users, items, days, seed)
    log = RealisticLog(users=users, items=items, days=days, seed=seed)
    rows = 0
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["userId", "movieId", "rating", "timestamp"])
        for row in log.rows():
            writer.writerow(row)
            rows += 1
    return rows

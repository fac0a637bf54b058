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
    time_scale: float = 1.0
    """Log seconds per replay second (a day of log in a minute of replay: 1440)."""


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
                events.append(Event((stamp - start) / how.time_scale, user, tuple(candidates)))
        last_seen[user] = stamp
        retrieval.learn(user, item)
    return events


class _Retrieval:
    """Co-visitation and popularity, learnt one interaction at a time."""

    def __init__(self, how: LogReplay) -> None:
        self.how = how
        self.popularity: Counter[str] = Counter()
        self.covisits: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.recent: defaultdict[str, list[str]] = defaultdict(list)

    def candidates(self, user: str) -> list[str]:
        seen = set(self.recent[user])
        scores: Counter[str] = Counter()
        for item in self.recent[user]:
            for other, count in self.covisits[item].most_common(self.how.candidates):
                if other not in seen:
                    scores[other] += count
        chosen = [item for item, _ in scores.most_common(self.how.candidates)]
        for item, _ in self.popularity.most_common(self.how.candidates + len(seen)):
            if len(chosen) >= self.how.candidates:
                break
            if item not in seen and item not in chosen:
                chosen.append(item)
        return chosen

    def learn(self, user: str, item: str) -> None:
        recent = self.recent[user]
        for other in recent[-self.how.recent_items :]:
            if other != item:
                self.covisits[item][other] += 1
                self.covisits[other][item] += 1
        recent.append(item)
        del recent[: max(0, len(recent) - self.how.recent_items)]
        self.popularity[item] += 1


def write_synthetic_log(path: Path, users: int, items: int, days: float, seed: int) -> None:
    """A CSV in the MovieLens ratings layout, for trying the loader without downloading."""
    rng = np.random.default_rng(seed)
    weights = _zipf_weights(items, 1.0)
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

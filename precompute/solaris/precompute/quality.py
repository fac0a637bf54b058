"""`solaris replay --quality`: how much of the foundation model's gain reaches a downstream
ranker at the coverage the replay serves, at each budget.

A sample of the log's visits (the moments `requests_from_log` makes requests at) become probes:
the visit's logged items are positives, `negatives` items drawn uniformly from the items seen
before the visit are negatives (as `solaris train` samples them). Positives are kept only where
the item was seen before the visit, so that "never seen" cannot tell a positive from a
negative. Each probe pair's FM feature is what the store would answer for it at the moment of
the visit's request (read after the request was served, at the same clock), so a pair the
speculator did not compute is a miss (zeros), whether or not the ranker would have asked for
it. Base features are counted from the rows strictly before the visit.

A logistic regression is fitted on the earlier probes and scored on the later ones for three
feature sets: (a) base only, (b) base + the pair's row always computed (the ceiling), (c) base
+ the row as served with its status (misses as zeros). The share retained is
(served - none) / (ceiling - none) of normalized entropy's gain (and of AUC's).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from solaris.precompute.features import UserWork
from solaris.precompute.replay import ALL, Budget, Replay
from solaris.precompute.replay_traffic import Event, LogReplay
from solaris.precompute.runner import OnnxRunner
from solaris.server.l1 import MemoryStore
from solaris.server.store import RowStatus

Rows = Sequence[tuple[str, str, float]]
POSITIVES_CAP = 10
"""Positives kept per probe (a first visit rates dozens of items), so no user dominates."""
BASE_FEATURES = ("log user rows so far", "log item rows so far", "log days since item last taken")
RIDGE = 30.0
"""The L2 penalty on standardized weights: 128 rows of weak signal overfit a few thousand
probes without it (the ceiling then scores below no FM feature)."""
TRAIN_SHARE = 0.7
"""The earlier share of the probes (by time) the ranker is fitted on."""


@dataclass(frozen=True)
class Probes:
    """Pairs to label: pair p belongs to probe `probe[p]`, asked at `time[probe]` (seconds
    from the log's start, as the requests' times) by `user[probe]`."""

    user: list[str]
    time: np.ndarray
    item: list[str]
    probe: np.ndarray
    label: np.ndarray
    base: np.ndarray
    """(pairs, len(BASE_FEATURES)), from the rows before the probe's visit."""

    def pairs_of(self, index: int) -> range:
        """The pairs of probe `index` (each probe's pairs are contiguous, in probe order)."""
        start, stop = np.searchsorted(self.probe, [index, index + 1])
        return range(int(start), int(stop))


def make_probes(rows: Rows, how: LogReplay, requests: int, negatives: int, seed: int) -> Probes:
    """Probes at `requests` visits drawn at random (never the log's first row, before which
    nothing is known), `negatives` negatives each."""
    rng = np.random.default_rng(seed)
    starts = _visit_starts(rows, how)
    chosen = set(rng.choice(starts, min(requests, len(starts)), replace=False).tolist())
    builder = _ProbeBuilder(rows, negatives, rng)
    for index, (user, item, stamp) in enumerate(rows):
        if index in chosen:
            builder.probe_at(index, how)
        builder.learn(user, item, stamp)
    return builder.done()


def _visit_starts(rows: Rows, how: LogReplay) -> list[int]:
    """Row indices where a visit starts (as `requests_from_log` cuts them), after the first
    row (before which nothing is known)."""
    last_seen: dict[str, float] = {}
    starts: list[int] = []
    for index, (user, _, stamp) in enumerate(rows):
        previous = last_seen.get(user)
        if index and (previous is None or stamp - previous > how.visit_gap_seconds):
            starts.append(index)
        last_seen[user] = stamp
    return starts


class _ProbeBuilder:
    def __init__(self, rows: Rows, negatives: int, rng: np.random.Generator) -> None:
        self.rows = rows
        self.negatives = negatives
        self.rng = rng
        self.start = rows[0][2] if rows else 0.0
        self.user_rows: dict[str, int] = {}
        self.item_rows: dict[str, int] = {}
        self.item_last: dict[str, float] = {}
        self.catalogue: list[str] = []
        self.users: list[str] = []
        self.times: list[float] = []
        self.items: list[str] = []
        self.probe: list[int] = []
        self.labels: list[float] = []
        self.base: list[tuple[float, float, float]] = []

    def learn(self, user: str, item: str, stamp: float) -> None:
        self.user_rows[user] = self.user_rows.get(user, 0) + 1
        if item not in self.item_rows:
            self.catalogue.append(item)
        self.item_rows[item] = self.item_rows.get(item, 0) + 1
        self.item_last[item] = stamp

    def probe_at(self, index: int, how: LogReplay) -> None:
        user, _, stamp = self.rows[index]
        positives = list(dict.fromkeys(self._visit_items(index, how)))
        positives = [item for item in positives if item in self.item_rows][:POSITIVES_CAP]
        if not positives:
            return
        negatives: list[str] = []
        taken = set(positives)
        for drawn in self.rng.integers(0, len(self.catalogue), 4 * self.negatives):
            item = self.catalogue[int(drawn)]
            if item not in taken and len(negatives) < self.negatives:
                negatives.append(item)
                taken.add(item)
        number = len(self.users)
        self.users.append(user)
        self.times.append(stamp - self.start)
        for item, label in [(item, 1.0) for item in positives] + [(i, 0.0) for i in negatives]:
            self.items.append(item)
            self.probe.append(number)
            self.labels.append(label)
            days = (stamp - self.item_last[item]) / 86_400
            self.base.append(
                (
                    math.log1p(self.user_rows.get(user, 0)),
                    math.log1p(self.item_rows[item]),
                    math.log1p(max(0.0, days)),
                )
            )

    def _visit_items(self, index: int, how: LogReplay) -> list[str]:
        """The items `rows[index]`'s user takes in the visit starting there."""
        user, _, last = self.rows[index]
        items = []
        for position in range(index, len(self.rows)):
            other_user, item, stamp = self.rows[position]
            if stamp - last > how.visit_gap_seconds:
                break
            if other_user == user:
                items.append(item)
                last = stamp
        return items

    def done(self) -> Probes:
        return Probes(
            self.users,
            np.array(self.times, np.float64),
            self.items,
            np.array(self.probe, np.int64),
            np.array(self.labels, np.float64),
            np.array(self.base, np.float64).reshape(-1, len(BASE_FEATURES)),
        )


class Served:
    """What the store answers for each probe's pairs at the probe's request, as the replay
    runs: `on_request` is the replay's hook. Rows (zeros for a miss) and statuses."""

    def __init__(self, probes: Probes, dim: int) -> None:
        self.probes = probes
        self.values = np.zeros((len(probes.item), dim), np.float32)
        self.status = np.full(len(probes.item), int(RowStatus.MISS), np.int8)
        self._at = {
            (user, float(t)): n
            for n, (user, t) in enumerate(zip(probes.user, probes.time, strict=True))
        }

    def on_request(self, event: Event, store: MemoryStore, now: float) -> None:
        number = self._at.get((event.user_id, float(event.time)))
        if number is None:
            return
        span = self.probes.pairs_of(number)
        items = self.probes.item[span.start : span.stop]
        rows = store.read_sync(event.user_id, items, np.dtype(np.float32), now)
        self.values[span.start : span.stop] = rows.values
        self.status[span.start : span.stop] = rows.statuses(now)

    @property
    def coverage(self) -> float:
        """The share of probe pairs the store served (HIT or STALE)."""
        return float((self.status != RowStatus.MISS).mean()) if self.status.size else 0.0


def fresh_rows(probes: Probes, runner: OnnxRunner, batch_probes: int = 64) -> np.ndarray:
    """Every probe pair computed now, as the replay computes a pair (no history): the ceiling."""
    out = np.zeros((len(probes.item), runner.dim), np.float32)
    for first in range(0, len(probes.user), batch_probes):
        numbers = range(first, min(first + batch_probes, len(probes.user)))
        spans = [probes.pairs_of(number) for number in numbers]
        work = [
            UserWork(probes.user[number], (), tuple(probes.item[span.start : span.stop]))
            for number, span in zip(numbers, spans, strict=True)
        ]
        out[spans[0].start : spans[-1].stop] = runner.compute(work)
    return out


@dataclass(frozen=True)
class Score:
    auc: float
    ne: float
    """Normalized entropy: log loss over the entropy of the evaluation labels' base rate."""


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The chance a positive outscores a negative (ties count half)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # tied scores share a mean rank
    positives = float(labels.sum())
    negatives = len(labels) - positives
    if not positives or not negatives:
        return math.nan
    return float(
        (ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    )


def normalized_entropy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    rate = float(np.clip(labels.mean(), 1e-7, 1 - 1e-7))
    return float(loss / -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)))


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, ridge: float = RIDGE, steps: int = 25
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logistic regression by Newton's method with an L2 ridge on standardized features:
    (weights with the intercept last, the features' means, their scales)."""
    mean = features.mean(0)
    scale = features.std(0) + 1e-6
    x = np.hstack([(features - mean) / scale, np.ones((len(features), 1))])
    weights = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], ridge)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ weights)))
        gradient = x.T @ (p - labels) + penalty * weights
        hessian = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-6:
            break
    return weights, mean, scale


def predict(model: tuple[np.ndarray, np.ndarray, np.ndarray], features: np.ndarray) -> np.ndarray:
    weights, mean, scale = model
    x = np.hstack([(features - mean) / scale, np.ones((len(features), 1))])
    result: np.ndarray = 1 / (1 + np.exp(-(x @ weights)))
    return result


def split(probes: Probes) -> tuple[np.ndarray, np.ndarray]:
    """(earlier pairs, later pairs): probes before and from the TRAIN_SHARE point in time."""
    if not len(probes.time):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cutoff = np.sort(probes.time)[int(len(probes.time) * TRAIN_SHARE)]
    later = probes.time[probes.probe] >= cutoff
    return np.flatnonzero(~later), np.flatnonzero(later)


def evaluate(probes: Probes, features: np.ndarray) -> Score:
    """The ranker fitted on the earlier pairs, scored on the later ones."""
    earlier, later = split(probes)
    model = fit_logistic(features[earlier], probes.label[earlier])
    predicted = predict(model, features[later])
    labels = probes.label[later]
    return Score(auc(labels, predicted), normalized_entropy(labels, predicted))


def served_features(probes: Probes, served: Served) -> np.ndarray:
    status = served.status
    flags = np.stack([status == RowStatus.HIT, status == RowStatus.STALE], axis=1)
    return np.hstack([probes.base, served.values, flags.astype(np.float64)])


def retained(none: float, ceiling: float, served: float) -> float:
    """The share of the ceiling's gain over none that served keeps (nan where the ceiling
    gains nothing: then there is no share to keep)."""
    gain = ceiling - none
    return (served - none) / gain if gain > 0 else math.nan


@dataclass(frozen=True)
class QualityRow:
    budget_label: str
    budget: float
    hit_rate: float
    coverage: float
    served: Score

    def retained_ne(self, none: Score, ceiling: Score) -> float:
        # Lower NE is better: the gain is how far below none's it goes.
        return retained(-none.ne, -ceiling.ne, -self.served.ne)

    def retained_auc(self, none: Score, ceiling: Score) -> float:
        return retained(none.auc, ceiling.auc, self.served.auc)


def format_quality(probes: Probes, none: Score, ceiling: Score, rows: Sequence[QualityRow]) -> str:
    earlier, later = split(probes)
    lines = [
        f"ranker quality: logistic regression on {len(earlier):,} earlier probe pairs, "
        f"scored on {len(later):,} later ones ({len(probes.time):,} sampled visits, "
        f"{int(probes.label.sum()):,} positives)",
        f"  (a) no FM feature:        AUC {none.auc:.4f}  NE {none.ne:.4f}",
        f"  (b) FM always fresh:      AUC {ceiling.auc:.4f}  NE {ceiling.ne:.4f}  (the ceiling)",
        f"{'budget':>9}  {'hit rate':>8}  {'coverage':>8}  {'AUC':>6}  {'NE':>6}  "
        f"{'retained NE':>11}  {'retained AUC':>12}",
    ]
    for row in rows:
        lines.append(
            f"{row.budget_label:>9}  {row.hit_rate:8.3f}  {row.coverage:8.3f}  "
            f"{row.served.auc:6.4f}  {row.served.ne:6.4f}  "
            f"{_share(row.retained_ne(none, ceiling)):>11}  "
            f"{_share(row.retained_auc(none, ceiling)):>12}"
        )
    lines += [
        "columns: (c) as served, misses as zeros, at each budget (all policies); hit rate: "
        "requested pairs served; coverage: probe pairs the store held at their visit's request; "
        "retained: (served - none) / (ceiling - none) of NE's gain (lower NE) and of AUC's",
    ]
    return "\n".join(lines)


def _share(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1%}"


def plot_quality(
    rows: Sequence[QualityRow], none: Score, ceiling: Score, path: str, title: str
) -> None:
    """The retained share of NE's and AUC's gain against budget and against coverage."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (by_budget, by_coverage) = pyplot.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    ordered = sorted(rows, key=lambda row: row.budget)
    lines = (
        ("NE's gain", [row.retained_ne(none, ceiling) for row in ordered], "o"),
        ("AUC's gain", [row.retained_auc(none, ceiling) for row in ordered], "s"),
    )
    for name, shares, marker in lines:
        by_budget.plot(range(len(ordered)), shares, marker=marker, label=name)
        by_coverage.plot([row.coverage for row in ordered], shares, marker=marker, label=name)
    by_budget.set_xticks(
        range(len(ordered)), [f"{row.budget_label}\n{row.budget:.3g}/s" for row in ordered]
    )
    by_budget.set_xlabel("compute budget (pairs per second of traffic time)")
    by_coverage.set_xlabel("coverage (probe pairs served from the store)")
    by_coverage.set_xlim(-0.02, 1.02)
    by_budget.set_ylabel("share of the ceiling's gain retained")
    empty = all(math.isnan(row.retained_ne(none, ceiling)) for row in rows)
    for axes in (by_budget, by_coverage):
        axes.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axes.grid(alpha=0.3)
        axes.legend()
        if empty:
            axes.text(
                0.5,
                0.5,
                "the ceiling gains nothing over no FM feature:\nno share to plot",
                transform=axes.transAxes,
                ha="center",
            )
    scores = (
        f"no FM: AUC {none.auc:.4f}, NE {none.ne:.4f}; "
        f"always fresh: AUC {ceiling.auc:.4f}, NE {ceiling.ne:.4f}"
    )
    figure.suptitle(f"{title}\n{scores}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    pyplot.close(figure)


@dataclass(frozen=True)
class QualityReport:
    probes: Probes
    none: Score
    ceiling: Score
    rows: list[QualityRow]


def quality_sweep(
    replay: Replay, budgets: Sequence[Budget], probes: Probes, progress: bool = False
) -> QualityReport:
    """(a) and (b) once, then the replay with all policies at each budget for (c)."""
    from tqdm import tqdm

    none = evaluate(probes, probes.base)
    ceiling_rows = fresh_rows(probes, replay.runner)
    ceiling = evaluate(probes, np.hstack([probes.base, ceiling_rows]))
    del ceiling_rows
    rows = []
    for budget in tqdm(budgets, disable=None if progress else True, leave=False, unit=" budget"):
        served = Served(probes, replay.runner.dim)
        result = replay.run(ALL, budget.pairs_per_second, on_request=served.on_request)
        score = evaluate(probes, served_features(probes, served))
        rows.append(
            QualityRow(
                budget.label, budget.pairs_per_second, result.hit_rate, served.coverage, score
            )
        )
    return QualityReport(probes, none, ceiling, rows)

"""`solaris replay`: drives the real sidecar core, store, daemon and model with a
time-compressed stream of ranking requests, and reports what each speculation policy set buys:
hit rate, precision, why misses missed, compute spent and the age of what was served.

Time is simulated (a clock the core and the daemon read), so a replay is exact and
repeatable: the same events, budget and seed give the same report. Each simulated second the
speculator hands out what the budget allows, the daemon computes it with the model through ONNX
Runtime and writes it to the store; requests are answered by the sidecar's own read path.
"""

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from solaris.precompute.daemon import PrecomputeDaemon
from solaris.precompute.model import ModelConfig
from solaris.precompute.replay_traffic import Event
from solaris.precompute.runner import OnnxRunner
from solaris.precompute.settings import PrecomputeSettings
from solaris.precompute.speculator import (
    Pair,
    Policy,
    Speculated,
    SpeculationSettings,
    Speculator,
    StaleAt,
    by_user,
)
from solaris.server.core import EmbeddingService
from solaris.server.l1 import MemoryStore
from solaris.server.prefetch_queue import PrefetchQueue, PrefetchTask
from solaris.server.request_log import LoggedRequest, RequestLog
from solaris.server.settings import SidecarSettings
from solaris.server.store import RowStatus

ORACLE = "oracle"
POLICY_SETS: dict[str, frozenset[Policy]] = {
    "no speculation": frozenset({Policy.MISS}),
    "prefetch+miss": frozenset({Policy.PREFETCH, Policy.MISS}),
    "prefetch+miss+refresh": frozenset({Policy.PREFETCH, Policy.MISS, Policy.REFRESH}),
    "all policies": frozenset(Policy),
}
"""Each set a column of the report; "no speculation" only fills the store after misses."""


@dataclass
class ReplayResult:
    policy_set: str
    budget: float
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


class SimulatedClock:
    """Wall-clock seconds as the store understands them, moved by the replay."""

    def __init__(self) -> None:
        self.start = time.time()
        self.now = self.start

    def __call__(self) -> float:
        return self.now


class Oracle:
    """Knows every future request and spends the same budget on the soonest ones, looking no
    further ahead than half a TTL (so that what it computes is still fresh when asked for),
    and computes a pair again once its last computation has expired."""

    def __init__(
        self,
        requests: Sequence[Event],
        budget: float,
        horizon_seconds: float,
        stale_at: StaleAt,
        clock: SimulatedClock,
    ) -> None:
        self.requests = requests
        self.budget = budget
        self.horizon_seconds = horizon_seconds
        self.stale_at = stale_at
        self.clock = clock
        self._next = 0
        self._tokens = 0.0
        self._at = clock()
        self._handed_out: dict[Pair, float] = {}
        self._first_open = 0
        """Requests before this index have every pair handed out: no need to look again."""

    def take(self) -> list[Speculated]:
        now = self.clock()
        self._tokens = min(self.budget, self._tokens + (now - self._at) * self.budget)
        self._at = now
        elapsed = now - self.clock.start
        while self._next < len(self.requests) and self.requests[self._next].time < elapsed:
            self._next += 1
        chosen: list[Speculated] = []
        self._first_open = max(self._first_open, self._next)
        for event in self.requests[self._first_open :]:
            if event.time > elapsed + self.horizon_seconds / 2 or len(chosen) >= int(self._tokens):
                break
            pairs = [(event.user_id, item) for item in event.item_ids]
            stale = self.stale_at(pairs) <= now
            for item, is_stale in zip(event.item_ids, stale, strict=True):
                pair = (event.user_id, item)
                if is_stale and self._may_hand_out(pair, now) and len(chosen) < int(self._tokens):
                    self._handed_out[pair] = now
                    chosen.append(Speculated(event.user_id, item, Policy.PREFETCH, 1.0))
        self._tokens -= len(chosen)
        while self._first_open < len(self.requests) and self._all_handed_out(
            self.requests[self._first_open]
        ):
            self._first_open += 1
        return chosen

    def _may_hand_out(self, pair: Pair, now: float) -> bool:
        handed_out_at = self._handed_out.get(pair)
        return handed_out_at is None or now - handed_out_at >= self.horizon_seconds

    def _all_handed_out(self, event: Event) -> bool:
        """Every pair of `event` computed recently enough to be fresh when it is asked for.
        Once true it stays true (hand-out times only grow), so the event needs no more looks."""
        asked_at = self.clock.start + event.time
        return all(
            self._handed_out.get((event.user_id, item), -np.inf) + self.horizon_seconds > asked_at
            for item in event.item_ids
        )


class Replay:
    def __init__(
        self,
        events: Sequence[Event],
        runner: OnnxRunner,
        ttl_seconds: float = 600.0,
        stale_seconds: float = 0.0,
        tick_seconds: float = 1.0,
    ) -> None:
        self.events = sorted(events, key=lambda event: (event.time, not event.is_hint))
        self.runner = runner
        self.ttl_seconds = ttl_seconds
        self.stale_seconds = stale_seconds
        self.tick_seconds = tick_seconds

    def run(self, policy_set: str | frozenset[Policy], budget: float) -> ReplayResult:
        """`policy_set`: a name in POLICY_SETS, ORACLE, or a set of policies."""
        return asyncio.run(self._run(policy_set, budget))

    async def _run(self, policy_set: str | frozenset[Policy], budget: float) -> ReplayResult:
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
        queue = PrefetchQueue(1)
        request_log = RequestLog()
        reads: list[LoggedRequest] = []
        request_log.listeners.append(reads.append)
        service = EmbeddingService(settings, store, request_log, queue, clock=clock)
        daemon = PrecomputeDaemon(
            self.runner,
            store,
            queue,
            PrecomputeSettings(batch_pairs=1024),
            self.ttl_seconds,
            self.stale_seconds,
            clock=clock,
        )

        label = policy_set if isinstance(policy_set, str) else "+".join(sorted(policy_set))
        result = ReplayResult(label, budget)
        predicted: set[Pair] = set()
        computed = Computed()
        if policy_set == ORACLE:
            requests = [event for event in self.events if not event.is_hint]
            speculator: Speculator | Oracle = Oracle(
                requests, budget, self.ttl_seconds, store.stale_at, clock
            )
        else:
            policies = POLICY_SETS[policy_set] if isinstance(policy_set, str) else policy_set
            speculator = Speculator(
                SpeculationSettings(budget, policies),
                store.stale_at,
                clock,
                on_queue=lambda entry: predicted.add((entry.user_id, entry.item_id)),
            )
        next_tick = 0.0
        for event in self.events:
            while next_tick <= event.time:
                clock.now = clock.start + next_tick
                await self._compute(speculator, daemon, computed, result)
                next_tick += self.tick_seconds
            clock.now = clock.start + event.time
            if event.is_hint:
                if isinstance(speculator, Speculator):
                    speculator.hint(event.user_id, event.item_ids)
                continue
            answer = await service.batch_get(event.user_id, event.item_ids)
            self._score(event, answer.statuses, answer.ages_ms, predicted, computed, result)
            if isinstance(speculator, Speculator):
                speculator.observe(reads)
            reads.clear()
        return result

    async def _compute(
        self,
        speculator: "Speculator | Oracle",
        daemon: PrecomputeDaemon,
        computed: "Computed",
        result: ReplayResult,
    ) -> None:
        taken = speculator.take()
        if not taken:
            return
        for entry in taken:
            computed.add((entry.user_id, entry.item_id), str(entry.policy))
            result.computed_by[str(entry.policy)] += 1
        tasks = [
            PrefetchTask(user, tuple(entry.item_id for entry in entries))
            for user, entries in by_user(taken).items()
        ]
        before = daemon.stats.pairs_computed
        await daemon.process(tasks)
        result.computed += daemon.stats.pairs_computed - before
        if isinstance(speculator, Speculator):
            speculator.done((entry.user_id, entry.item_id) for entry in taken)

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
        for item, status, age in zip(event.item_ids, statuses, ages_ms, strict=True):
            pair = (event.user_id, item)
            if status != RowStatus.MISS:
                result.served += 1
                result.served_age_ms += float(age)
                policy = unused.pop(pair, None)
                if policy is not None:
                    result.used += 1
                    result.used_by[policy] += 1
            elif pair in computed_ever:
                result.expired += 1
            elif pair in predicted:
                result.too_late += 1
            else:
                result.never_predicted += 1


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
replay runs a small model through the same runner and daemon so that a sweep takes a minute."""


def sweep(
    events: Sequence[Event],
    runner: OnnxRunner,
    budgets: Sequence[float],
    ttl_seconds: float,
    stale_seconds: float = 0.0,
) -> list[ReplayResult]:
    """Every policy set, then the oracle, at every budget."""
    replay = Replay(events, runner, ttl_seconds, stale_seconds)
    return [
        replay.run(policy_set, budget)
        for budget in budgets
        for policy_set in (*POLICY_SETS, ORACLE)
    ]


def format_report(results: Sequence[ReplayResult]) -> str:
    header = (
        f"{'budget/s':>8}  {'policy set':<22} {'hit rate':>8} {'of oracle':>9} "
        f"{'precision':>9} {'computed':>9} {'never':>7} {'late':>7} {'expired':>7} {'age s':>6}"
    )
    lines = [header]
    oracle = {r.budget: r.hit_rate for r in results if r.policy_set == ORACLE}
    for r in results:
        share = r.hit_rate / oracle[r.budget] if oracle.get(r.budget) else 0.0
        lines.append(
            f"{r.budget:8.0f}  {r.policy_set:<22} {r.hit_rate:8.3f} {share:9.0%} "
            f"{r.precision:9.3f} {r.computed:9,d} {r.never_predicted:7,d} {r.too_late:7,d} "
            f"{r.expired:7,d} {r.mean_age_s:6.0f}"
        )
    lines.append("")
    lines.append("by policy (all policies): pairs computed, later served, precision")
    for r in results:
        if r.policy_set == "all policies":
            cells = [
                f"{policy} {r.computed_by[policy]:,}/{r.used_by[policy]:,}/"
                f"{r.used_by[policy] / r.computed_by[policy]:.2f}"
                for policy in sorted(r.computed_by)
            ]
            lines.append(f"{r.budget:8.0f}  " + "  ".join(cells))
    lines.append("misses: never = never predicted, late = predicted but not computed in time,")
    lines.append("expired = computed but expired; age = mean age of served embeddings.")
    return "\n".join(lines)


def plot(results: Sequence[ReplayResult], path: str, title: str) -> None:
    """Hit rate against budget, one line per policy set and the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for policy_set in (*POLICY_SETS, ORACLE):
        points = sorted((r.budget, r.hit_rate) for r in results if r.policy_set == policy_set)
        axes.plot(*zip(*points, strict=True), marker="o", label=policy_set)
    axes.set_xscale("log")
    budgets = sorted({r.budget for r in results})
    axes.set_xticks(budgets, [f"{budget:g}" for budget in budgets])
    axes.minorticks_off()
    axes.set_xlabel("compute budget (pairs per second)")
    axes.set_ylabel("hit rate")
    axes.set_ylim(0, 1)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)

"""The replay through the real core, store, daemon and model (the tiny one), and the traffic
it replays: synthetic with a seed, or an interaction log turned into requests."""

import csv
import math
from collections import Counter
from pathlib import Path

import pytest

from solaris.precompute.export import ExportReport
from solaris.precompute.replay import (
    ORACLE,
    POLICY_SETS,
    Budget,
    Ceiling,
    Pending,
    Replay,
    ReplayResult,
    causal_ceiling,
    demand,
    format_ceiling,
    format_report,
    resolve_budgets,
    sweep,
)
from solaris.precompute.replay_traffic import (
    Event,
    LogReplay,
    SyntheticTraffic,
    load_interactions,
    requests_from_log,
    write_log,
    write_synthetic_log,
)
from solaris.precompute.return_model import ReturnSettings
from solaris.precompute.runner import OnnxRunner
from solaris.precompute.speculator import Policy, SpeculationSettings
from solaris.server.l1 import MemoryStore

ITEMS = tuple(f"item-{n}" for n in range(5))
SMALL = SyntheticTraffic(users=50, items=300, duration_seconds=120, sessions_per_second=0.5)


@pytest.fixture
def runner(tiny_model: ExportReport) -> OnnxRunner:
    return OnnxRunner(tiny_model.path, "cpu", 1)


def test_pending_answers_stale_at_as_the_store_holds_it(runner: OnnxRunner) -> None:
    store = MemoryStore(1024**2, runner.dim)
    pending = Pending(runner, store, ttl_seconds=60.0, stale_seconds=5.0)
    pending.add([("u", "a"), ("u", "b")], at=100.0)
    pending.flush()
    pending.add([("u", "b"), ("v", "a")], at=130.0)  # b again, later: its later time counts
    pairs = [("u", "a"), ("u", "b"), ("v", "a"), ("v", "b"), ("w", "a")]
    expected = [160.0, 190.0, 190.0, -math.inf, -math.inf]
    assert pending.stale_at(pairs).tolist() == expected
    pending.flush()
    assert store.stale_at(pairs).tolist() == expected


def repeated_list() -> list[Event]:
    return [Event(10.0, "u", ITEMS), Event(40.0, "u", ITEMS)]


def test_a_repeated_list_is_a_hit_the_second_time_with_the_miss_policy(
    runner: OnnxRunner,
) -> None:
    replay = Replay(repeated_list(), runner)
    with_misses = replay.run("no speculation", budget=100)
    assert (with_misses.rows, with_misses.served) == (10, 5)
    assert with_misses.never_predicted == 5
    assert with_misses.precision == 1.0


def test_without_the_miss_policy_the_repeat_misses_again(runner: OnnxRunner) -> None:
    result = Replay(repeated_list(), runner).run(frozenset({Policy.PREFETCH}), budget=100)
    assert result.served == 0
    assert result.never_predicted == 10


def test_a_hint_ahead_of_a_request_makes_it_a_hit(runner: OnnxRunner) -> None:
    events = [Event(5.0, "u", ITEMS, is_hint=True), Event(10.0, "u", ITEMS)]
    assert Replay(events, runner).run("prefetch+miss+refresh", budget=100).served == 5


def test_a_budget_too_small_leaves_predicted_pairs_too_late(runner: OnnxRunner) -> None:
    events = [Event(9.5, "u", ITEMS, is_hint=True), Event(10.0, "u", ITEMS)]
    result = Replay(events, runner).run("prefetch+miss+refresh", budget=2)
    assert result.computed <= 3  # a second's budget, and the whole token the bucket holds over
    assert result.too_late >= 2


def test_an_expired_pair_is_counted_as_expired(runner: OnnxRunner) -> None:
    events = [Event(1.0, "u", ITEMS), Event(100.0, "u", ITEMS)]
    result = Replay(events, runner, ttl_seconds=30).run("no speculation", budget=100)
    assert result.expired == 5


def test_the_budget_is_respected(runner: OnnxRunner) -> None:
    events = SMALL.events()
    result = Replay(events, runner).run("all policies", budget=20)
    assert result.computed <= 20 * (SMALL.duration_seconds + 2)


def test_the_same_seed_gives_the_same_report(runner: OnnxRunner) -> None:
    def report(seed: int) -> ReplayResult:
        traffic = SyntheticTraffic(**{**vars(SMALL), "seed": seed})
        return Replay(traffic.events(), runner).run("all policies", budget=50)

    assert report(1) == report(1)
    assert report(1) != report(2)


def test_the_oracle_is_at_least_as_good_at_the_same_budget(runner: OnnxRunner) -> None:
    replay = Replay(SMALL.events(), runner)
    assert replay.run(ORACLE, 30).hit_rate >= replay.run("all policies", 30).hit_rate


def test_no_future_interaction_reaches_a_request(tmp_path: Path) -> None:
    log = tmp_path / "ratings.csv"
    with open(log, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["userId", "movieId", "rating", "timestamp"])
        writer.writerows(
            [
                ["a", "old", 5, 0],
                ["a", "older-pair", 5, 60],
                ["b", "old", 4, 100],
                ["b", "future", 4, 10_000],
                ["c", "old", 3, 20_000],
            ]
        )
    events = requests_from_log(load_interactions(log), LogReplay(visit_gap_seconds=1_800))
    by_user = {event.user_id: event for event in events}
    assert "future" not in by_user["b"].item_ids
    assert "older-pair" in by_user["b"].item_ids
    assert "future" in by_user["c"].item_ids
    assert "a" not in by_user


def test_a_generated_log_in_the_movielens_layout_loads(tmp_path: Path) -> None:
    log = tmp_path / "ratings.csv"
    write_synthetic_log(log, users=20, items=100, days=2, seed=0)
    rows = load_interactions(log)
    assert rows == sorted(rows, key=lambda row: row[2])
    assert requests_from_log(rows, LogReplay())


def test_the_report_breaks_computed_and_served_pairs_down_by_policy(runner: OnnxRunner) -> None:
    events = [Event(5.0, "u", ITEMS, is_hint=True), Event(10.0, "u", ITEMS)]
    result = Replay(events, runner).run("all policies", budget=100)
    assert result.computed_by["prefetch"] == 5
    assert result.used_by["prefetch"] == 5
    assert "prefetch 5/5/1.00" in format_report([result])


@pytest.mark.parametrize("policy_set", ["no speculation", "all policies", ORACLE])
@pytest.mark.parametrize("budget", [0.5, 30.0])
def test_jumping_between_events_computes_what_a_round_every_second_does(
    runner: OnnxRunner, policy_set: str, budget: float
) -> None:
    events = [event for event in SMALL.events() if event.time < 60]
    events += [Event(event.time + 400, event.user_id, event.item_ids) for event in events[:20]]
    jumping = Replay(events, runner, ttl_seconds=120, stale_seconds=30)
    ticking = Replay(events, runner, ttl_seconds=120, stale_seconds=30, every_tick=True)
    by_event, by_tick = jumping.run(policy_set, budget), ticking.run(policy_set, budget)
    assert by_event.rounds < by_tick.rounds
    by_event.rounds = by_tick.rounds
    assert by_event == by_tick
    assert by_event.served > 0


def test_the_causal_ceiling_leaves_out_new_users_and_new_items() -> None:
    events = [
        Event(0.0, "u", ("a", "b")),  # u is new: out of reach
        Event(5.0, "v", ("a", "c")),  # v is new: out of reach
        Event(9.0, "u", ("a", "d"), is_hint=True),  # a hint is no request
        Event(10.0, "u", ("a", "c", "e")),  # a again; c seen with v only; e never seen
        Event(500.0, "u", ("b",)),  # b last asked 500 s ago, past the window
    ]
    ceiling = causal_ceiling(events, window_seconds=100)
    assert ceiling == Ceiling(
        rows=8, new_user=4, new_item=1, repeat_within=1, repeat_older=1, other_item=1
    )
    assert ceiling.reachable == 3 / 8
    oracle = ReplayResult(ORACLE, 1.0, "1x", rows=8, served=6)
    assert "0.600, is 160% of the ceiling" in format_ceiling(ceiling, [oracle])


def test_a_budget_relative_to_demand_is_that_share_of_the_mean_pair_rate() -> None:
    events = [Event(0.0, "u", ITEMS), Event(10.0, "v", ITEMS), Event(9.0, "u", ITEMS, True)]
    assert demand(events) == 1.0  # 10 pairs requested over 10 seconds; hints are no demand
    relative, absolute = resolve_budgets([(3.0, True), (25.0, False)], demand(events))
    assert (relative.pairs_per_second, relative.label) == (3.0, "3x")
    assert (absolute.pairs_per_second, absolute.label) == (25.0, "25/s")


@pytest.mark.parametrize("policy_set", ["no speculation", ORACLE])
def test_a_budget_below_a_pair_a_second_saves_up_for_whole_pairs(
    runner: OnnxRunner, policy_set: str
) -> None:
    events = [Event(float(at), "u", ITEMS) for at in range(0, 200, 20)]
    result = Replay(events, runner, ttl_seconds=1_000).run(policy_set, budget=0.25)
    assert 0 < result.computed <= 0.25 * 200 + 1
    assert result.served > 0


def regular_visits(lists: list[tuple[str, ...]], visits: int, gap: float) -> list[Event]:
    return [Event(index * gap, "u", lists[index % len(lists)]) for index in range(visits)]


def test_return_renews_a_returning_users_pairs_before_their_next_visit(
    runner: OnnxRunner,
) -> None:
    events = regular_visits([ITEMS], visits=8, gap=7_200)
    replay = Replay(events, runner, ttl_seconds=3_600)
    misses_only = replay.run(frozenset({Policy.MISS}), budget=100)
    with_return = replay.run(frozenset({Policy.MISS, Policy.RETURN}), budget=100)
    assert misses_only.served == 0  # every pair expired by the next visit
    assert with_return.served >= 5 * 5
    assert with_return.used_by["return"] >= 5 * 5
    assert "return" not in misses_only.computed_by


def test_widen_renews_the_users_other_recent_items_too(runner: OnnxRunner) -> None:
    other = tuple(f"other-{n}" for n in range(5))
    events = regular_visits([ITEMS, other], visits=10, gap=7_200)
    replay = Replay(events, runner, ttl_seconds=3_600)
    last_list_only = replay.run(frozenset({Policy.MISS, Policy.RETURN}), budget=100)
    widened = replay.run(frozenset({Policy.MISS, Policy.RETURN, Policy.WIDEN}), budget=100)
    assert last_list_only.served == 0  # each visit asks for the list before the last
    assert widened.served >= 5 * 5
    assert widened.used_by["widen"] >= 5 * 5
    assert "widen" not in last_list_only.computed_by


def test_return_over_more_requests_renews_the_list_before_the_last(runner: OnnxRunner) -> None:
    other = tuple(f"other-{n}" for n in range(5))
    events = regular_visits([ITEMS, other], visits=10, gap=7_200)
    policies = frozenset({Policy.MISS, Policy.RETURN})

    def run(requests: int) -> ReplayResult:
        returns = ReturnSettings(requests=requests)
        speculation = SpeculationSettings(returns=returns)
        return Replay(events, runner, ttl_seconds=3_600, speculation=speculation).run(
            policies, budget=100
        )

    last_only, two = run(1), run(2)
    assert last_only.served == 0  # each visit asks for the list before the last
    assert two.served >= 5 * 5
    assert two.used_by["return"] >= 5 * 5


def test_a_realistic_log_has_heavy_tailed_users_and_is_reproducible(tmp_path: Path) -> None:
    first, again, other = (tmp_path / name for name in ("a.csv", "b.csv", "c.csv"))
    rows = write_log(first, "realistic", users=200, items=2_000, days=3_650, seed=1)
    write_log(again, "realistic", users=200, items=2_000, days=3_650, seed=1)
    write_log(other, "realistic", users=200, items=2_000, days=3_650, seed=2)
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    interactions = load_interactions(first)
    assert len(interactions) == rows
    visits = sorted(
        Counter(e.user_id for e in requests_from_log(interactions, LogReplay())).values()
    )
    assert visits.count(1) >= len(visits) / 3  # many come once
    assert visits[-1] >= 20 * visits[len(visits) // 2]  # a few come very often
    span_days = (interactions[-1][2] - interactions[0][2]) / 86_400
    assert 0.8 * 3_650 < span_days <= 3_650


def test_the_replay_command_on_a_generated_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from solaris.app.cli import main

    log, png = tmp_path / "ratings.csv", tmp_path / "replay.png"
    assert main(["replay", "--make-log", str(log), "--users", "30", "--days", "365"]) == 0
    argv = ["replay", "--log", str(log), "--budgets", "1x,0.5", "--plot", str(png)]
    assert main([*argv, "--model-dir", str(tmp_path / "models")]) == 0
    out = capsys.readouterr().out
    assert "TTL 604800 s, stale window 0 s" in out
    assert "gap closed" in out
    assert "1x = " in out
    assert f"plot: {png.resolve()}" in out
    assert png.stat().st_size > 0


def test_a_sweep_in_worker_processes_reports_what_one_in_process_does(
    runner: OnnxRunner,
) -> None:
    replay = Replay(SMALL.events(), runner, round_pairs=4)
    budgets = [Budget(5.0, "5/s"), Budget(20.0, "20/s")]
    alone = sweep(replay, budgets, jobs=1)
    together = sweep(replay, budgets, jobs=2)
    assert [(r.budget_label, r.policy_set) for r in together] == [
        (budget.label, policy_set) for budget in budgets for policy_set in (*POLICY_SETS, ORACLE)
    ]
    assert together == alone
    assert len({r.hit_rate for r in alone}) > 1  # the runs differ: order matters

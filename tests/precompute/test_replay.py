"""The replay through the real core, store, daemon and model (the tiny one), and the traffic
it replays: synthetic with a seed, or an interaction log turned into requests."""

import csv
from pathlib import Path

import pytest

from solaris.precompute.export import ExportReport
from solaris.precompute.replay import ORACLE, Replay, ReplayResult, format_report
from solaris.precompute.replay_traffic import (
    Event,
    LogReplay,
    SyntheticTraffic,
    load_interactions,
    requests_from_log,
    write_synthetic_log,
)
from solaris.precompute.runner import OnnxRunner
from solaris.precompute.speculator import Policy

ITEMS = tuple(f"item-{n}" for n in range(5))
SMALL = SyntheticTraffic(users=50, items=300, duration_seconds=120, sessions_per_second=0.5)


@pytest.fixture
def runner(tiny_model: ExportReport) -> OnnxRunner:
    return OnnxRunner(tiny_model.path, "cpu", 1)


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
    assert Replay(events, runner).run("prefetch+miss", budget=100).served == 5


def test_a_budget_too_small_leaves_predicted_pairs_too_late(runner: OnnxRunner) -> None:
    events = [Event(9.5, "u", ITEMS, is_hint=True), Event(10.0, "u", ITEMS)]
    result = Replay(events, runner).run("prefetch+miss", budget=2)
    assert result.computed <= 2
    assert result.too_late >= 3


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
    assert requests_from_log(rows, LogReplay(time_scale=1440))


def test_the_report_breaks_computed_and_served_pairs_down_by_policy(runner: OnnxRunner) -> None:
    events = [Event(5.0, "u", ITEMS, is_hint=True), Event(10.0, "u", ITEMS)]
    result = Replay(events, runner).run("all policies", budget=100)
    assert result.computed_by["prefetch"] == 5
    assert result.used_by["prefetch"] == 5
    assert "prefetch 5/5/1.00" in format_report([result])

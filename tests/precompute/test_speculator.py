"""The speculator's policies on small hand-built logs, with a clock and a store the test holds
(a unit test of the logic above the store: the real store is exercised by the replay)."""

import dataclasses

import numpy as np
import pytest

from solaris.precompute.speculator import RETURNING, Policy, SpeculationSettings, Speculator
from solaris.precompute.traffic_model import TrafficModel, TrafficSettings
from solaris.server.request_log import LoggedRequest
from solaris.server.store import RowStatus

HIT, MISS = RowStatus.HIT, RowStatus.MISS
TRAFFIC_FIELDS = {field.name for field in dataclasses.fields(TrafficSettings)}


class World:
    """A clock and what the store holds: pair -> stale_at."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.stale_at: dict[tuple[str, str], float] = {}

    def clock(self) -> float:
        return self.now

    def read_stale_at(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        return np.array([self.stale_at.get(pair, -np.inf) for pair in pairs])

    def speculator(self, rate: float = 1000.0, **settings: object) -> Speculator:
        traffic = {name: settings.pop(name) for name in TRAFFIC_FIELDS & settings.keys()}
        chosen = SpeculationSettings(
            budget_pairs_per_second=rate,
            traffic=TrafficSettings(**traffic),  # type: ignore[arg-type]
            **settings,  # type: ignore[arg-type]
        )
        speculator = Speculator(chosen, self.read_stale_at, self.clock)
        self.now += 1
        return speculator

    def request(self, user_id: str, items: list[str], statuses: list[int]) -> LoggedRequest:
        stale_at = np.array([self.stale_at.get((user_id, i), -np.inf) for i in items])
        return LoggedRequest(
            user_id, tuple(items), np.array(statuses, np.uint8), self.now, stale_at
        )


@pytest.fixture
def world() -> World:
    return World()


def pairs(taken: list) -> set[tuple[str, str, Policy]]:
    return {(entry.user_id, entry.item_id, entry.policy) for entry in taken}


def test_a_missed_list_is_computed_with_the_miss_policy_and_not_without_it(world: World) -> None:
    request = world.request("u", ["a", "b"], [MISS, MISS])
    with_miss = world.speculator()
    with_miss.observe([request])
    assert pairs(with_miss.take()) == {("u", "a", Policy.MISS), ("u", "b", Policy.MISS)}
    without = world.speculator(policies=frozenset({Policy.PREFETCH}))
    without.observe([request])
    assert without.take() == []


def test_a_fresh_pair_is_never_handed_out(world: World) -> None:
    speculator = world.speculator()
    world.stale_at[("u", "a")] = world.now + 100
    speculator.hint("u", ["a", "b"])
    assert pairs(speculator.take()) == {("u", "b", Policy.PREFETCH)}
    assert speculator.stats.skipped_fresh == 1


def test_the_budget_is_respected_and_does_not_pile_up(world: World) -> None:
    speculator = world.speculator(rate=10)
    speculator.hint("u", [f"i{n}" for n in range(100)])
    assert len(speculator.take()) == 10
    assert speculator.take() == []
    world.now += 0.5
    assert len(speculator.take()) == 5
    world.now += 60
    assert len(speculator.take()) == 10


def test_stronger_signals_go_first_and_a_pair_is_queued_once(world: World) -> None:
    speculator = world.speculator(rate=2)
    world.now += 1
    speculator.observe([world.request("u", ["m"], [MISS])])
    speculator.hint("u", ["p", "m"])
    speculator.hint("u", ["p"])
    assert len(speculator) == 2
    assert pairs(speculator.take()) == {("u", "p", Policy.PREFETCH), ("u", "m", Policy.PREFETCH)}


def test_a_pair_about_to_go_stale_is_refreshed(world: World) -> None:
    speculator = world.speculator(policies=frozenset({Policy.REFRESH}), refresh_window_seconds=60)
    world.stale_at[("u", "soon")] = world.now + 30
    world.stale_at[("u", "later")] = world.now + 600
    speculator.observe([world.request("u", ["soon", "later"], [HIT, HIT])])
    world.now += 31
    assert pairs(speculator.take()) == {("u", "soon", Policy.REFRESH)}


def test_covisited_items_are_offered_to_a_recent_user(world: World) -> None:
    speculator = world.speculator(policies=frozenset({Policy.COVISIT}))
    for user in ("a", "b"):
        speculator.observe([world.request(user, ["x", "y"], [HIT, HIT])])
    speculator.observe([world.request("c", ["x"], [HIT])])
    assert ("c", "y", Policy.COVISIT) in pairs(speculator.take())


def test_popular_items_fill_what_is_left(world: World) -> None:
    speculator = world.speculator(policies=frozenset({Policy.POPULAR}))
    for user in ("a", "b", "c"):
        speculator.observe([world.request(user, ["hot"], [HIT])])
    speculator.observe([world.request("d", ["cold"], [HIT])])
    assert ("d", "hot", Policy.POPULAR) in pairs(speculator.take())


def test_a_pair_handed_out_is_not_handed_out_again_while_in_flight(world: World) -> None:
    speculator = world.speculator(in_flight_seconds=30)
    speculator.hint("u", ["a"])
    assert len(speculator.take()) == 1
    speculator.observe([world.request("u", ["a"], [MISS])])
    world.now += 1
    assert speculator.take() == []
    world.now += 30
    speculator.observe([world.request("u", ["a"], [MISS])])
    assert pairs(speculator.take()) == {("u", "a", Policy.MISS)}


def test_a_recent_miss_goes_before_an_older_one(world: World) -> None:
    speculator = world.speculator(rate=1, policies=frozenset({Policy.MISS}))
    speculator.observe([world.request("old", ["a"], [MISS])])
    world.now += 30
    speculator.observe([world.request("new", ["a"], [MISS])])
    assert pairs(speculator.take()) == {("new", "a", Policy.MISS)}


def test_a_pair_asked_for_twice_goes_before_one_asked_for_once(world: World) -> None:
    speculator = world.speculator(rate=1, policies=frozenset({Policy.MISS}))
    speculator.observe([world.request("u", ["once", "twice"], [MISS, MISS])])
    speculator.observe([world.request("u", ["twice"], [MISS])])
    assert pairs(speculator.take()) == {("u", "twice", Policy.MISS)}


def test_a_pair_keeps_the_strongest_policy_that_asked_for_it(world: World) -> None:
    speculator = world.speculator()
    speculator.hint("u", ["a"])
    speculator.observe([world.request("u", ["a"], [MISS])])
    assert pairs(speculator.take()) == {("u", "a", Policy.PREFETCH)}


def test_a_full_queue_drops_its_least_valuable_half(world: World) -> None:
    # Without return's valuation of misses by the user's chance to come back: misses by age.
    not_by_return = frozenset(Policy) - RETURNING
    speculator = world.speculator(rate=1000, max_queued_pairs=4, policies=not_by_return)
    for item in ("old1", "old2", "old3", "old4"):
        speculator.observe([world.request("u", [item], [MISS])])
        world.now += 1
    speculator.hint("u", ["new"])
    assert len(speculator) == 3
    assert speculator.stats.dropped_full == 2
    assert {entry.item_id for entry in speculator.take()} == {"new", "old3", "old4"}


def test_under_item_churn_only_the_more_requested_items_are_remembered(world: World) -> None:
    speculator = world.speculator(max_tracked_items=10)
    for user in ("a", "b"):
        speculator.observe([world.request(user, ["hot", "warm"], [HIT, HIT])])
    for item in range(20):
        speculator.observe([world.request("c", [f"new-{item}"], [HIT])])
    speculator.observe([world.request("d", ["hot"], [HIT])])
    assert speculator.tracked_items <= 10
    assert ("d", "warm", Policy.COVISIT) in pairs(speculator.take())


def test_a_read_learnt_late_is_valued_as_of_when_it_happened(world: World) -> None:
    speculator = world.speculator(rate=1, policies=frozenset({Policy.MISS}))
    speculator.observe([world.request("recent", ["a"], [MISS])])
    world.now += 1
    late = world.request("late", ["a"], [MISS])
    speculator.observe([dataclasses.replace(late, time=world.now - 120)])
    assert pairs(speculator.take()) == {("recent", "a", Policy.MISS)}


def test_each_request_earns_its_user_one_expansion(world: World) -> None:
    speculator = world.speculator(policies=frozenset({Policy.COVISIT}))
    for user in ("a", "b"):
        speculator.observe([world.request(user, ["x", "y"], [HIT, HIT])])
    speculator.observe([world.request("c", ["x"], [HIT])])
    world.stale_at[("c", "y")] = world.now + 1000
    for _ in range(5):
        world.now += 1
        assert speculator.take() == []
    assert speculator.stats.skipped_fresh == 1


def test_a_higher_priority_hint_goes_first(world: World) -> None:
    speculator = world.speculator(rate=1)
    speculator.hint("u", ["plain"])
    speculator.hint("u", ["urgent"], priority=500)
    assert pairs(speculator.take()) == {("u", "urgent", Policy.PREFETCH)}


def test_expansion_starts_from_the_items_co_visitation_counted(world: World) -> None:
    speculator = world.speculator(policies=frozenset({Policy.COVISIT}), covisit_items_per_request=2)
    speculator.observe([world.request("a", ["x", "y"], [HIT, HIT])])
    speculator.observe([world.request("c", ["x", "tail-1", "tail-2"], [HIT, HIT, HIT])])
    assert ("c", "y", Policy.COVISIT) in pairs(speculator.take())


def test_nothing_taken_is_lost_when_the_store_does_not_answer(world: World) -> None:
    speculator = world.speculator(rate=2)
    speculator.hint("u", ["a", "b"])

    def unreachable(pairs: list[tuple[str, str]]) -> np.ndarray:
        raise ConnectionError("store down")

    speculator._stale_at = unreachable
    with pytest.raises(ConnectionError):
        speculator.take()
    speculator._stale_at = world.read_stale_at
    assert {entry.item_id for entry in speculator.take()} == {"a", "b"}


def test_pairs_put_back_are_handed_out_again_within_the_same_budget(world: World) -> None:
    speculator = world.speculator(rate=2)
    speculator.hint("u", ["a", "b"], priority=500)
    speculator.hint("u", ["c"])
    taken = speculator.take()
    assert len(taken) == 2
    speculator.put_back(taken)
    assert speculator.take() == taken
    assert speculator.take() == []


def test_a_take_can_be_held_to_a_number_of_users(world: World) -> None:
    speculator = world.speculator()
    speculator.hint("first", ["a", "b"], priority=500)
    speculator.hint("second", ["c"])
    assert pairs(speculator.take(max_users=1)) == {
        ("first", "a", Policy.PREFETCH),
        ("first", "b", Policy.PREFETCH),
    }
    assert pairs(speculator.take()) == {("second", "c", Policy.PREFETCH)}


def test_a_traffic_model_passed_in_is_the_one_learnt_into_and_expanded_from(world: World) -> None:
    traffic = TrafficModel()
    traffic.learn("a", ["x", "y"])
    settings = SpeculationSettings(policies=frozenset({Policy.COVISIT}))
    speculator = Speculator(settings, world.read_stale_at, world.clock, traffic=traffic)
    world.now += 1
    speculator.observe([world.request("c", ["x"], [HIT])])
    assert traffic.active_users() == ["c", "a"]
    assert pairs(speculator.take()) == {("c", "y", Policy.COVISIT)}


def test_with_return_a_miss_of_a_user_likely_back_goes_first(world: World) -> None:
    def first_served(policies: frozenset[Policy]) -> str:
        speculator = world.speculator(rate=1, policies=policies)
        for _ in range(5):
            speculator.observe([world.request("loyal", ["x"], [HIT])])
            world.now += 60
        once, loyal = world.request("once", ["a"], [MISS]), world.request("loyal", ["b"], [MISS])
        speculator.observe([once, loyal])
        world.now += 1
        (taken,) = speculator.take()
        return taken.user_id

    assert first_served(frozenset({Policy.MISS})) == "once"  # equal value: first come
    assert first_served(frozenset({Policy.MISS, Policy.RETURN})) == "loyal"

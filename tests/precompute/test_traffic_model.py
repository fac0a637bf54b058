"""The traffic model on its own: what it learns from requests and what it answers, within its
memory bounds."""

import random

import pytest

from solaris.precompute.traffic_model import TrafficModel, TrafficSettings


def learnt(*requests: tuple[str, list[str]], **settings: int) -> TrafficModel:
    model = TrafficModel(TrafficSettings(**settings))
    for user_id, item_ids in requests:
        model.learn(user_id, item_ids)
    return model


def test_items_requested_together_are_covisited_best_first() -> None:
    model = learnt(("a", ["x", "y", "z"]), ("b", ["x", "y"]), ("c", ["w"]))
    assert model.covisited(["x"]) == [("y", 1.0), ("z", 0.5)]
    assert model.covisited(["w"]) == []


def test_covisited_leaves_out_the_items_asked_about_and_those_excluded() -> None:
    model = learnt(("a", ["x", "y", "z"]))
    assert model.covisited(["x", "y"]) == [("z", 1.0)]
    assert model.covisited(["x"], exclude={"z"}) == [("y", 1.0)]


def test_a_users_neighbours_are_covisited_items_they_were_not_shown() -> None:
    model = learnt(
        ("a", ["x", "y"]), ("a", ["y", "x"]), ("a", ["x", "z"]), ("b", ["x"]), ("c", ["y"])
    )
    assert model.neighbours("b") == [("y", 1.0), ("z", 0.5)]
    assert model.neighbours("c") == [("x", 1.0)]
    assert model.neighbours("a") == []
    assert model.neighbours("stranger") == []


def test_neighbours_start_from_the_head_of_the_latest_request() -> None:
    model = learnt(("a", ["x", "y"]), ("c", ["x", "tail-1", "tail-2"]), covisit_items_per_request=2)
    assert model.covisited(["tail-2"]) == []
    assert model.neighbours("c") == [("y", 1.0)]


def test_at_most_neighbours_per_item_candidates_are_answered() -> None:
    model = learnt(("a", [f"i{n}" for n in range(10)]), ("b", ["i0"]), neighbours_per_item=3)
    assert len(model.neighbours("b")) == 3
    assert len(model.popular()) == 3


def test_popular_items_come_best_first_as_shares_of_the_top_one() -> None:
    model = learnt(("a", ["hot", "cold"]), ("b", ["hot", "warm"]), ("c", ["hot", "warm"]))
    assert model.popular() == [("hot", 1.0), ("warm", pytest.approx(2 / 3)), ("cold", 1 / 3)]
    assert TrafficModel().popular() == []


def test_popular_items_follow_each_request_though_answers_are_kept_between_them() -> None:
    model = learnt(("a", ["hot", "cold"]))
    first = model.popular()
    first.clear()  # a caller's copy: the kept answer is not touched
    assert model.popular() == [("hot", 1.0), ("cold", 1.0)]
    model.learn("b", ["cold"])
    assert model.popular() == [("cold", 1.0), ("hot", 0.5)]


def test_active_users_are_the_most_recent_ones_first_and_bounded() -> None:
    model = learnt(("a", ["x"]), ("b", ["x"]), ("c", ["x"]), ("a", ["y"]), recent_users=2)
    assert model.active_users() == ["a", "c"]
    assert list(model.recent_items("b")) == []


def test_a_users_recent_items_are_bounded_with_the_latest_request_s_head_newest() -> None:
    model = learnt(
        ("a", ["old-1", "old-2"]),
        ("a", ["head", "tail"]),
        recent_items_per_user=3,
        covisit_items_per_request=1,
    )
    # each request's head goes in last: old-1 was newer than old-2, so old-2 went first
    assert list(model.recent_items("a")) == ["old-1", "tail", "head"]


def test_recent_items_are_as_moving_each_requested_item_to_the_end_in_turn() -> None:
    """Against the plain reckoning, with duplicates, repeats and requests shorter and longer
    than the bound: each item of the request (the head last) moved to the end, one at a time,
    then the oldest dropped past the bound."""
    rng = random.Random(0)
    settings = TrafficSettings(recent_items_per_user=12, covisit_items_per_request=3)
    model, expected = TrafficModel(settings), {"a": [], "b": []}
    for _ in range(300):
        user = rng.choice("ab")
        items = [f"i{rng.randrange(30)}" for _ in range(rng.randrange(1, 25))]
        model.learn(user, items)
        head = list(dict.fromkeys(items))[:3]
        for item in [item for item in items if item not in head] + head:
            expected[user] = [known for known in expected[user] if known != item] + [item]
        expected[user] = expected[user][-12:]
        assert list(model.recent_items(user)) == expected[user]


def test_each_request_earns_its_user_one_pop_most_recent_first() -> None:
    model = learnt(("a", ["x"]), ("b", ["x"]), ("a", ["y"]))
    assert model.pop_unexpanded_user() == "a"
    assert model.pop_unexpanded_user() == "b"
    assert model.pop_unexpanded_user() is None
    model.learn("b", ["z"])
    assert model.pop_unexpanded_user() == "b"


def test_a_forgotten_user_is_not_popped() -> None:
    model = learnt(("a", ["x"]), ("b", ["x"]), recent_users=1)
    assert model.pop_unexpanded_user() == "b"
    assert model.pop_unexpanded_user() is None


def test_under_item_churn_the_more_requested_items_and_their_neighbours_stay() -> None:
    model = learnt(("a", ["hot", "warm"]), ("b", ["hot", "warm"]), max_tracked_items=10)
    for n in range(20):
        model.learn("c", [f"new-{n}"])
    assert model.tracked_items <= 10
    assert model.covisited(["hot"]) == [("warm", 1.0)]
    assert model.popular()[:2] == [("hot", 1.0), ("warm", 1.0)]


def test_without_covisits_nothing_is_covisited_but_popularity_is_kept() -> None:
    model = TrafficModel(covisits=False)
    model.learn("a", ["x", "y"])
    model.learn("b", ["x"])
    assert model.covisited(["x"]) == []
    assert model.neighbours("b") == []
    assert model.popular() == [("x", 1.0), ("y", 0.5)]


@pytest.mark.parametrize("name", ["recent_users", "neighbours_per_item", "max_tracked_items"])
def test_a_bound_below_one_is_refused_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TrafficSettings(**{name: 0})

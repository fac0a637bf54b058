"""The model of when users come back: their own gaps, everyone's, and those who never do."""

from solaris.precompute.return_model import ReturnModel, ReturnSettings

HOUR = 3_600.0


def visited(model: ReturnModel, user: str, times: list[float]) -> None:
    for at in times:
        model.visit(user, at, ("a", "b"))


def test_a_regular_user_is_expected_back_when_they_usually_come() -> None:
    model = ReturnModel()
    visited(model, "u", [n * 24 * HOUR for n in range(10)])
    last = 9 * 24 * HOUR
    around_their_gap = model.probability("u", last + 20 * HOUR, 8 * HOUR)
    soon_after = model.probability("u", last + 1 * HOUR, 8 * HOUR)
    assert around_their_gap > 0.8
    assert soon_after < 0.3


def test_where_most_users_come_once_a_user_seen_once_is_unlikely_back() -> None:
    model = ReturnModel()
    for user in range(50):
        visited(model, f"once-{user}", [user * HOUR])
    visited(model, "regular", [n * HOUR for n in range(5)])
    assert model.probability("once-49", 50 * HOUR, 24 * HOUR) < 0.2
    assert model.probability("regular", 4.5 * HOUR, 2 * HOUR) > 0.5


def test_looks_are_due_in_order_each_once() -> None:
    model = ReturnModel()
    visited(model, "u", [0.0])
    visited(model, "v", [0.0])
    model.schedule("u", 20.0)
    model.schedule("v", 10.0)
    model.schedule("u", 30.0)
    assert model.next_due() == 10.0
    assert model.pop_due(25.0) == ["v"]
    assert model.pop_due(35.0) == ["u"]
    assert model.pop_due(100.0) == []


def test_the_least_recently_active_users_are_forgotten_past_the_bound() -> None:
    model = ReturnModel(ReturnSettings(users=2))
    for user, at in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
        visited(model, user, [at])
        model.schedule(user, at + 10)
    assert model.last_items("a") == ()
    assert model.probability("a", 5.0, 10.0) == 0.0
    assert model.pop_due(100.0) == ["b", "c"]

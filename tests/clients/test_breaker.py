"""The breaker and the recent-duration tracker, on a clock the test moves."""

from solaris.clients._breaker import CircuitBreaker
from solaris.clients._latency import RecentDurations


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failures_to_open=3, open_seconds=1.0, clock=Clock())
    breaker.failed()
    breaker.failed()
    breaker.succeeded()
    breaker.failed()
    breaker.failed()
    assert breaker.state == "closed"
    breaker.failed()
    assert breaker.state == "open"
    assert not breaker.allow()


def test_half_open_lets_one_probe_through_and_its_outcome_decides() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=1, open_seconds=1.0, clock=clock)
    breaker.failed()
    clock.now += 1.0
    assert breaker.state == "half_open"
    assert breaker.allow()
    assert not breaker.allow()
    breaker.failed()
    assert breaker.state == "open"
    clock.now += 1.0
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed"
    assert breaker.allow()
    assert breaker.allow()


def test_a_probe_that_never_reports_is_replaced() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=1, open_seconds=1.0, clock=clock)
    breaker.failed()
    clock.now += 1.0
    assert breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_recent_durations_need_samples_and_age_out() -> None:
    clock = Clock()
    durations = RecentDurations(size=8, window_seconds=10, min_samples=4, clock=clock)
    for seconds in (0.001, 0.002, 0.003):
        durations.add(seconds)
    assert durations.quantile(0.5) is None
    durations.add(0.004)
    assert durations.quantile(0.5) == 0.003
    assert durations.maximum() == 0.004
    clock.now += 11
    assert durations.quantile(0.5) is None
    assert durations.maximum() == 0.0

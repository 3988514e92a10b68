"""Circuit breaker state machine and the retry budget (pure)."""

from __future__ import annotations

import random

from openledger.gateway.breaker import BreakerConfig, BreakerState, CircuitBreaker
from openledger.gateway.retry import RetryBudget, backoff_s, connect_pause_s


def test_opens_after_consecutive_failures_then_one_probe_after_cooldown() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, cooldown_s=5))
    for t in range(3):
        assert b.allow(t)
        b.record_failure(t)
    assert b.state is BreakerState.OPEN and not b.allow(3) and b.retry_after_s(3) == 4
    assert b.allow(7.5) and b.state is BreakerState.HALF_OPEN
    assert not b.allow(7.6)  # only one probe at a time
    b.record_failure(8)
    assert b.state is BreakerState.OPEN and not b.allow(12)
    assert b.allow(13.1)
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow(13.2)


def test_success_resets_the_failure_count_and_an_abandoned_probe_frees_the_slot() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=2, cooldown_s=1))
    b.record_failure(0)
    b.record_success()
    b.record_failure(0)
    assert b.state is BreakerState.CLOSED
    b.record_failure(0)
    assert b.allow(1.5)
    b.release_probe()
    assert b.allow(1.6)


def test_retries_never_exceed_ten_percent_of_requests() -> None:
    budget = RetryBudget(ratio=0.1)
    retries = 0
    for requests in range(1, 10_001):
        budget.deposit()
        while budget.try_withdraw():  # a storm: every request wants to retry forever
            retries += 1
        assert retries <= 0.1 * requests + 1e-9


def test_backoff_is_jittered_and_capped() -> None:
    rng = random.Random(1)
    values = [backoff_s(a, base_s=0.02, cap_s=0.5, rng=rng) for a in range(10) for _ in range(20)]
    assert all(0 <= v <= 0.5 for v in values) and len(set(values)) == len(values)
    assert max(backoff_s(0, rng=rng) for _ in range(100)) <= 0.02


def test_connect_retries_double_to_a_cap_and_a_3_s_window_holds_fifteen_tries() -> None:
    assert [connect_pause_s(a) for a in range(6)] == [0.025, 0.05, 0.1, 0.2, 0.25, 0.25]
    assert connect_pause_s(10_000) == 0.25  # an hour-long window: no overflow
    waited, tries = 0.0, 1
    while waited + connect_pause_s(tries - 1) < 3.0:  # as Proxy.call spends the default window
        waited += connect_pause_s(tries - 1)
        tries += 1
    assert tries == 15 and 2.75 <= waited < 3.0  # one connect every 250 ms once it settles: no storm

"""The GCRA reference (gcra.py), which the Lua limiter must agree with."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from openledger.gateway.gcra import Limit, gcra, gcra_pair


def test_burst_then_one_per_interval() -> None:
    limit = Limit(rate_per_s=10, burst=3)
    now, tat = 1_000_000_000, None
    verdicts = []
    for _ in range(4):
        d = gcra(tat, now, limit)
        verdicts.append(d.allowed)
        tat = d.tat_us
    assert verdicts == [True, True, True, False]
    denied = gcra(tat, now, limit)
    assert denied.retry_after_us == 100_000
    assert gcra(tat, now + 100_000, limit).allowed


def test_cost_above_burst_can_never_pass_and_unlimited_always_passes() -> None:
    assert gcra(None, 0, Limit(10, 5), cost=6).retry_after_us == -1
    assert gcra(None, 0, Limit(0, 1), cost=10**9).allowed


def test_a_denied_pair_moves_neither_tat() -> None:
    req, tok = gcra_pair(None, None, 1_000, Limit(1, 5), Limit(1, 5), token_cost=6)
    assert not tok.allowed and req.allowed
    assert (req.tat_us, tok.tat_us) == (1_000, 1_000)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=5000),
    burst=st.integers(min_value=1, max_value=100),
    gaps=st.lists(st.integers(min_value=0, max_value=2_000_000), min_size=1, max_size=300),
)
def test_never_more_than_burst_plus_rate_times_elapsed(rate: float, burst: int, gaps: list[int]) -> None:
    limit = Limit(rate, burst)
    now = start = 10**15
    tat = None
    allowed = 0
    for gap in gaps:
        now += gap
        d = gcra(tat, now, limit)
        tat = d.tat_us
        allowed += d.allowed
        assert allowed <= burst + rate * (now - start) / 1e6 + 1e-9


def test_steady_pressure_gets_exactly_the_rate() -> None:
    limit = Limit(rate_per_s=50, burst=10)
    now, tat, allowed = 0, None, 0
    for _ in range(30_000):  # one attempt per millisecond for 30 s
        d = gcra(tat, now, limit)
        tat, allowed = d.tat_us, allowed + d.allowed
        now += 1000
    assert allowed == 10 + 50 * 30 - 1 or allowed == 10 + 50 * 30

"""Property tests: the Lua money arithmetic and the budget bookkeeping of admit.lua and
settle.lua agree with a Python model of them, for amounts across the whole range the
ledger accepts (0 .. 10**78 - 1 base units), run on real Redis.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openledger.gateway.records import AgentKeys, apikey_key, settled_key
from openledger.gateway.scripts import ADMIT, MONEY_PRELUDE, SETTLE, AdmitCode, SettleCode

LIMIT = 10**78
EDGES = [0, 1, 2**53 - 1, 2**53, 2**53 + 1, 10**14 - 1, 10**14, 10**17, 10**18, 2**64, LIMIT - 1]
amounts = st.one_of(st.sampled_from(EDGES), st.integers(0, LIMIT - 1), st.integers(0, 10**20))
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_OPS = (
    MONEY_PRELUDE
    + """
local a, b = money(ARGV[2], 'a'), money(ARGV[3], 'b')
if ARGV[1] == 'add' then return money_add(a, b) end
if ARGV[1] == 'sub' then return money_sub(a, b) end
return money_cmp(a, b)
"""
)


@pytest.fixture
def ops(rds: redis.Redis) -> Iterator[redis.commands.core.Script]:
    yield rds.register_script(_OPS)


@PROPERTY
@given(a=amounts, b=amounts, zeros=st.integers(0, 3))
def test_decimal_string_arithmetic_is_exact(ops: redis.commands.core.Script, a: int, b: int, zeros: int) -> None:
    sa = "0" * zeros + str(a)  # leading zeros are accepted and normalised
    assert ops(args=["add", sa, str(b)]).decode() == str(a + b)
    assert ops(args=["sub", sa, str(b)]).decode() == str(max(0, a - b))
    assert ops(args=["cmp", sa, str(b)]) == (a > b) - (a < b)


@pytest.mark.parametrize("bad", ["", "-1", "1.5", "1e18", " 1", "0x10", "1" * 79, "١٢"])
def test_anything_but_base_unit_digits_is_refused_by_name(ops: redis.commands.core.Script, bad: str) -> None:
    with pytest.raises(redis.ResponseError, match="money: a "):
        ops(args=["add", bad, "1"])


class Model:
    """What the scripts must do to the budget (Hard enforcement, one period)."""

    def __init__(self, budget: int, spent: int) -> None:
        self.budget, self.spent = budget, spent
        self.reserved: dict[str, int] = {}
        self.settled: set[str] = set()

    def admit(self, rid: str, reserve: int) -> tuple[AdmitCode, int]:
        committed = self.spent + sum(self.reserved.values())
        if committed + reserve > self.budget:
            return AdmitCode.BUDGET_EXHAUSTED, max(0, self.budget - committed)
        self.reserved[rid] = reserve
        return AdmitCode.ADMITTED, self.budget - committed - reserve

    def settle(self, rid: str, cost: int) -> SettleCode:
        if rid in self.settled:
            return SettleCode.ALREADY_SETTLED
        self.settled.add(rid)
        self.reserved.pop(rid, None)
        self.spent += cost
        return SettleCode.SETTLED


step = st.tuples(st.sampled_from(["admit", "settle", "settle", "resettle", "lose"]), amounts, amounts)


@PROPERTY
@given(budget=amounts, spent=amounts, steps=st.lists(step, min_size=1, max_size=12))
def test_admit_and_settle_keep_the_budget_like_the_model(
    rds: redis.Redis, budget: int, spent: int, steps: list[tuple[str, int, int]]
) -> None:
    ref = f"prop-{secrets.token_hex(6)}/agent"
    keys = AgentKeys(ref)
    stream = f"openledger:usage:prop:{secrets.token_hex(4)}"
    key_hash = secrets.token_hex(8)
    rds.set(apikey_key(key_hash), ref)
    rds.hset(keys.config, "version", "1")
    rds.hset(keys.spend, mapping={"period": "p", "spent": str(spent)})
    admit, settle = rds.register_script(ADMIT.source), rds.register_script(SETTLE.source)
    model = Model(budget, spent)
    admitted: list[str] = []
    try:
        for n, (op, x, y) in enumerate(steps):
            if op == "admit" or not admitted:
                rid = f"r{n}"
                args = [ref, "1", rid, "", "0", "1", "0", "1", "0", "0", str(10**12), str(x), str(budget), "1", "p",
                        "0", "", "0"]  # fmt: skip
                kk = [apikey_key(key_hash), keys.config, keys.inflight, keys.reserved, keys.spend, keys.rate_requests,
                      keys.rate_tokens, keys.queue, keys.stats]  # fmt: skip
                reply = admit(keys=kk, args=args)
                code, remaining = model.admit(rid, x)
                assert (AdmitCode(reply[0]), int(reply[1])) == (code, remaining)
                if code is AdmitCode.ADMITTED:
                    admitted.append(rid)
                continue
            rid = admitted[x % len(admitted)] if op == "resettle" else admitted.pop(x % len(admitted))
            if op == "lose":  # Redis lost the reservation (flush, failover, revocation)
                rds.hdel(keys.reserved, rid)
                model.reserved.pop(rid, None)
                rds.hset(keys.reserved, "_total", str(sum(model.reserved.values())))
            sk = [keys.inflight, keys.reserved, keys.spend, keys.spend_gen, keys.rate_tokens, stream, settled_key(rid),
                  settled_key(rid)]  # fmt: skip
            reply = settle(keys=sk, args=[rid, str(y), "p", "60", "0", "0", "1", "", "0", "id", rid])
            assert SettleCode(reply[0]) is model.settle(rid, y)
            assert int(rds.hget(keys.spend, "spent") or 0) == model.spent
            assert int(rds.hget(keys.reserved, "_total") or 0) == sum(model.reserved.values())
        assert rds.xlen(stream) == len(model.settled)
    finally:
        rids = [f"r{n}" for n in range(len(steps))]
        rds.delete(*keys.all_static(), *keys.in_flight_keys(), keys.spend, keys.spend_gen, stream,
                   apikey_key(key_hash), *(settled_key(r) for r in rids))  # fmt: skip

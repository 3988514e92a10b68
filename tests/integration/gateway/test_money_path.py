"""The gateway's money path on real Redis: every request that reached a model is
metered exactly once, whatever happens to its reservation (issue 10, defects 2, 3, 8, 10).

A slow upstream (a thread in the test) holds requests in flight while the test
takes Redis records away, as a flush, a failover or a revocation would.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
import redis

from openledger.gateway.records import AgentKeys, apikey_key, hash_api_key, idempotency_key, period_id, settled_key
from openledger.gateway.scripts import SETTLE, SettleCode
from openledger.wire import Price
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    GatewayProcess,
    ModelServers,
    post,
    provision_agent,
    route_model,
    usage_events,
)
from tests.waiting import wait_for

BODY = {"instances": [IRIS_ROW]}


class SlowUpstream:
    """A V1 model server that answers after ``delay_s`` (0 = at once)."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.calls += 1
                time.sleep(outer.delay_s)
                body = b'{"predictions": [1]}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow() -> Iterator[SlowUpstream]:
    upstream = SlowUpstream()
    yield upstream
    upstream.close()


def _predict(gw: GatewayProcess, key: str, body: Any = None, **headers: str) -> tuple[int, dict[str, str], Any]:
    return post(f"{gw.url}/v1/models/slow:predict", BODY if body is None else body, key, headers=headers)


def _in_flight(r: redis.Redis, ref: str) -> int:
    return int(r.zcard(AgentKeys(ref).inflight))


def _during_request(gw: GatewayProcess, key: str, r: redis.Redis, ref: str, act: Callable[[], object]) -> Any:
    """Send one request; once it holds its slot, run ``act``; return the request's answer."""
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_predict, gw, key)
        wait_for(lambda: _in_flight(r, ref) == 1, 10, "request admitted")
        act()
        return answer.result(20)


def _setup(r: redis.Redis, namespace: str, slow: SlowUpstream, price: Price, budget: str | None = "1000") -> str:
    key = provision_agent(r, namespace, models=("slow",), budget=budget)
    route_model(r, namespace, "slow", slow.url, price=price)
    return key


def test_request_whose_reservation_vanished_is_still_metered_once(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, slow: SlowUpstream
) -> None:
    ref = f"{namespace}/agent"
    key = _setup(rds, namespace, slow, Price(per_request=7 * 10**15))
    slow.delay_s = 1.0
    keys = AgentKeys(ref)
    # As an empty Redis restart or a failover would leave it: no slot, no reservation.
    status, headers, _ = _during_request(shared_gateway, key, rds, ref, lambda: rds.delete(*keys.in_flight_keys()))
    assert status == 200
    [event] = usage_events(rds, shared_gateway.stream, ref)
    assert event["id"] == headers["x-openledger-event-id"] and int(event["cost"]) == 7 * 10**15
    assert rds.hget(keys.spend, "spent") == str(7 * 10**15).encode()
    assert rds.exists(settled_key(event["id"])) == 1


def test_request_in_flight_across_a_redis_flush_is_metered_once(
    start_gateway: Callable[..., GatewayProcess], private_redis_port: int, namespace: str, slow: SlowUpstream
) -> None:
    r = redis.Redis(port=private_redis_port)
    ref = f"{namespace}/agent"
    key = _setup(r, namespace, slow, Price(per_request=3 * 10**15))
    gw = start_gateway(redis=f"redis://127.0.0.1:{private_redis_port}/0")
    slow.delay_s = 1.0
    status, headers, _ = _during_request(gw, key, r, ref, r.flushall)  # an empty restart or a failover
    assert status == 200
    [event] = usage_events(r, gw.stream, ref)
    assert event["id"] == headers["x-openledger-event-id"] and int(event["cost"]) == 3 * 10**15
    keys = AgentKeys(ref)
    assert r.exists(keys.spend) == 0 and r.get(keys.spend_gen) == b"1"  # spend unknown: left to the operator


def test_request_of_an_agent_revoked_mid_request_is_metered_once(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, slow: SlowUpstream
) -> None:
    ref = f"{namespace}/agent"
    key = _setup(rds, namespace, slow, Price(per_request=10**15))
    slow.delay_s = 1.0
    keys = AgentKeys(ref)

    def revoke() -> None:  # as the Agent controller revokes: config, limits, queue, key; slots left to expire
        rds.delete(*keys.all_static(), apikey_key(hash_api_key(key)))
        for k in keys.in_flight_keys():
            rds.pexpire(k, 60_000)

    status, headers, _ = _during_request(shared_gateway, key, rds, ref, revoke)
    assert status == 200
    [event] = usage_events(rds, shared_gateway.stream, ref)
    assert event["id"] == headers["x-openledger-event-id"]
    assert _in_flight(rds, ref) == 0 and rds.hget(keys.reserved, "_total") in (None, b"0")


def test_spend_lost_mid_request_is_not_recreated_and_budgeted_admission_waits(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, slow: SlowUpstream
) -> None:
    ref = f"{namespace}/agent"
    key = _setup(rds, namespace, slow, Price(per_request=10**15))
    slow.delay_s = 1.0
    keys = AgentKeys(ref)
    status, _, _ = _during_request(shared_gateway, key, rds, ref, lambda: rds.delete(keys.spend))
    assert status == 200 and len(usage_events(rds, shared_gateway.stream, ref)) == 1
    assert rds.exists(keys.spend) == 0 and rds.get(keys.spend_gen) == b"1"  # the operator's rebuild sees it
    slow.delay_s = 0
    calls = slow.calls
    status, headers, body = _predict(shared_gateway, key)
    assert (status, headers["retry-after"]) == (503, "1") and "being restored" in body["error"], body
    assert slow.calls == calls and _in_flight(rds, ref) == 0  # nothing reserved, model not called
    rds.hset(keys.spend, mapping={"period": period_id("Day", time.time()), "spent": str(10**15)})
    assert _predict(shared_gateway, key)[0] == 200


def test_a_replayed_settle_changes_nothing(rds: redis.Redis, namespace: str) -> None:
    keys = AgentKeys(f"{namespace}/agent")
    stream = f"openledger:usage:test:{secrets.token_hex(4)}"
    request_id = f"req-{secrets.token_hex(4)}"
    period = period_id("Day", time.time())
    rds.hset(keys.spend, mapping={"period": period, "spent": "5"})
    rds.hset(keys.reserved, mapping={request_id: "10", "_total": "10"})
    settle = rds.register_script(SETTLE.source)
    skeys = [keys.inflight, keys.reserved, keys.spend, keys.spend_gen, keys.rate_tokens, stream,
             settled_key(request_id), settled_key(request_id)]  # fmt: skip
    args = [request_id, "7", period, "60", "0", "0", "1", "", "0", "id", request_id]
    first, second = settle(keys=skeys, args=args), settle(keys=skeys, args=args)
    assert first[0] == SettleCode.SETTLED and second == [SettleCode.ALREADY_SETTLED]
    assert rds.xlen(stream) == 1 and rds.hget(keys.spend, "spent") == b"12"
    assert rds.hget(keys.reserved, "_total") == b"0"


def _set_budget(r: redis.Redis, ref: str, budget: int, spent: int) -> None:
    """A Hard budget in base units (up to NUMERIC(78,0)) and the spend, as the operator writes them."""
    keys = AgentKeys(ref)
    version = int(r.hget(keys.config, "version") or 0) + 1
    r.hset(keys.config, mapping={"budget": str(budget), "version": str(version)})
    r.hset(keys.spend, mapping={"period": period_id("Day", time.time()), "spent": str(spent)})


@pytest.mark.parametrize("cost", [10**17, 2**53 + 1, 10**77 + 3])
def test_costs_beyond_lua_doubles_settle_exactly(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, slow: SlowUpstream, cost: int
) -> None:
    ref = f"{namespace}/agent"
    key = provision_agent(rds, namespace, models=("slow",))
    route_model(rds, namespace, "slow", slow.url, price=Price(per_request=cost))
    budget = 10**78 - 1
    _set_budget(rds, ref, budget, 0)
    keys = AgentKeys(ref)
    for n in (1, 2):
        status, headers, body = _predict(shared_gateway, key)
        assert status == 200, body
        assert headers["x-openledger-budget-remaining"] == str(budget - n * cost)
    events = usage_events(rds, shared_gateway.stream, ref)
    assert [int(e["cost"]) for e in events] == [cost, cost]
    assert rds.hget(keys.spend, "spent") == str(2 * cost).encode()
    assert rds.hget(keys.reserved, "_total") == b"0" and _in_flight(rds, ref) == 0


def test_hard_budget_of_big_amounts_is_exact_to_the_base_unit(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, slow: SlowUpstream
) -> None:
    ref = f"{namespace}/agent"
    cost = 2**53 + 1  # 9007199254740993: a double rounds it to ...992
    key = provision_agent(rds, namespace, models=("slow",))
    route_model(rds, namespace, "slow", slow.url, price=Price(per_request=cost))
    _set_budget(rds, ref, 2 * cost, 1)
    assert _predict(shared_gateway, key)[0] == 200  # 1 + cost <= 2 cost
    status, _, body = _predict(shared_gateway, key)  # 1 + 2 cost > 2 cost: one base unit over
    assert status == 402 and "exhausted" in body["error"], body


def _idem(gw: GatewayProcess, key: str, idem: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    return post(
        f"{gw.url}/v1/models/slow:predict", BODY if body is None else body, key, headers={"Idempotency-Key": idem}
    )


def test_concurrent_retries_with_one_idempotency_key_are_metered_once(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, slow: SlowUpstream
) -> None:
    ref = f"{namespace}/agent"
    key = _setup(rds, namespace, slow, Price(per_request=10**15))
    slow.delay_s = 0.5
    idem = f"retry-{secrets.token_hex(4)}"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _idem(shared_gateway, key, idem), range(6)))
    statuses = sorted(a[0] for a in answers)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 409}, statuses
    for status, _, body in answers:
        if status == 409:
            assert body["error"].startswith("Idempotency-Key:") and "in progress" in body["error"], body
    [event] = usage_events(rds, shared_gateway.stream, ref)
    first = next(a for a in answers if a[0] == 200)
    status, headers, body = _idem(shared_gateway, key, idem)  # a later retry: the stored outcome
    assert (status, body) == (200, first[2]) and headers["x-openledger-event-id"] == event["id"]
    assert headers["idempotent-replayed"] == "true"
    assert len(usage_events(rds, shared_gateway.stream, ref)) == 1 and slow.calls == 1
    status, _, body = _idem(shared_gateway, key, idem, {"instances": [[1, 2, 3, 4]]})
    assert status == 422 and body["error"].startswith("Idempotency-Key:") and "different request body" in body["error"]


def test_an_idempotency_key_of_a_refused_request_can_be_retried(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, slow: SlowUpstream
) -> None:
    ref = f"{namespace}/agent"
    key = _setup(rds, namespace, slow, Price(per_request=10**21), budget="1")  # 1000 tokens per request > budget
    idem = f"refused-{secrets.token_hex(4)}"
    assert _idem(shared_gateway, key, idem)[0] == 402
    assert _idem(shared_gateway, key, idem)[0] == 402  # not 409: the refusal was not stored
    assert usage_events(rds, shared_gateway.stream, ref) == [] and slow.calls == 0


def test_admission_whose_reply_is_lost_leaves_no_slot_or_reservation(
    start_gateway: Callable[..., GatewayProcess], rds: redis.Redis, namespace: str, slow: SlowUpstream
) -> None:
    ref = f"{namespace}/agent"
    key = _setup(rds, namespace, slow, Price(per_request=10**15))
    gw = start_gateway(redis_timeout_s="0.3")
    assert _predict(gw, key)[0] == 200  # connection up, scripts loaded
    calls = slow.calls
    rds.execute_command("CLIENT", "PAUSE", "1000", "ALL")  # admit.lua runs, but only after the gateway gave up
    status, _, body = _predict(gw, key)
    assert status == 503 and "unavailable" in body["error"], body
    keys = AgentKeys(ref)
    wait_for(lambda: _in_flight(rds, ref) == 0 and rds.hget(keys.reserved, "_total") == b"0", 10, "slot released")
    assert slow.calls == calls and len(usage_events(rds, gw.stream, ref)) == 1
    assert json.loads(rds.hget(keys.reserved, "_total") or b"0") == 0


def test_openai_client_retry_with_its_idempotency_key_gets_the_stored_answer(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    key = provision_agent(rds, namespace, models=("llm",))
    route_model(rds, namespace, "llm", model_servers.llm_url, "openai")
    client = openai.OpenAI(base_url=f"{shared_gateway.url}/v1", api_key=key, max_retries=0, timeout=10)
    idem = {"Idempotency-Key": f"oa-{secrets.token_hex(4)}"}
    messages: Any = [{"role": "user", "content": "what does the ledger record"}]
    first = client.chat.completions.with_raw_response.create(
        model="llm", messages=messages, max_tokens=8, extra_headers=idem
    )
    again = client.chat.completions.with_raw_response.create(
        model="llm", messages=messages, max_tokens=8, extra_headers=idem
    )
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-openledger-event-id"] == first.headers["x-openledger-event-id"]
    assert again.parse().model_dump() == first.parse().model_dump()
    with pytest.raises(openai.UnprocessableEntityError) as reused:
        client.chat.completions.create(model="llm", messages=messages, max_tokens=9, extra_headers=idem)
    assert reused.value.code == "idempotency_key_reused" and reused.value.param == "Idempotency-Key"
    assert len(usage_events(rds, shared_gateway.stream, f"{namespace}/agent")) == 1


def _settle_script(rds: redis.Redis, keys: AgentKeys, stream: str, request_id: str, record: str | None = None) -> Any:
    skeys = [keys.inflight, keys.reserved, keys.spend, keys.spend_gen, keys.rate_tokens, stream,
             settled_key(request_id), record or settled_key(request_id)]  # fmt: skip
    return skeys, rds.register_script(SETTLE.source)


@pytest.mark.parametrize(
    ("stored", "settled_with", "period_after", "spent_after"),
    [
        ("2026120210", "2026120209", "2026120210", "907"),  # a gateway whose clock is behind: counted, kept
        ("2026120210", "20261202", "2026120210", "907"),  # a stale Day config after a Day -> Hour edit
        ("2026120210", "2026120211", "2026120211", "7"),  # the next hour began: a new period
    ],
)
def test_a_settle_never_moves_the_spend_record_back(
    rds: redis.Redis, namespace: str, stored: str, settled_with: str, period_after: str, spent_after: str
) -> None:
    """An older or other-kind period id (clock skew between replicas, a config edit in flight)
    must not reset a period's spend: that would hand a Hard budget out again."""
    keys = AgentKeys(f"{namespace}/agent")
    stream = f"openledger:usage:test:{secrets.token_hex(4)}"
    request_id = f"req-{secrets.token_hex(4)}"
    rds.hset(keys.spend, mapping={"period": stored, "spent": "900"})
    skeys, settle = _settle_script(rds, keys, stream, request_id)
    settle(keys=skeys, args=[request_id, "7", settled_with, "60", "0", "0", "1", "", "0", "id", request_id])
    assert rds.hmget(keys.spend, "period", "spent") == [period_after.encode(), spent_after.encode()]


def test_a_hard_budget_spent_under_a_later_period_id_is_not_handed_out_again(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, slow: SlowUpstream
) -> None:
    """A record written under a period id ahead of this gateway's (another replica's clock) counts."""
    ref = f"{namespace}/agent"
    key = _setup(rds, namespace, slow, Price(per_request=10**18), budget="1")
    ahead = str(int(period_id("Day", time.time())) + 1)
    rds.hset(AgentKeys(ref).spend, mapping={"period": ahead, "spent": str(10**18)})
    assert _predict(shared_gateway, key)[0] == 402


def test_the_settled_marker_lives_minutes_not_a_day(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, slow: SlowUpstream
) -> None:
    """One marker per request (about 150 bytes) kept for a day would fill a `noeviction` Redis."""
    key = _setup(rds, namespace, slow, Price(per_request=10**15))
    status, headers, _ = _predict(shared_gateway, key)
    ttl = rds.ttl(settled_key(headers["x-openledger-event-id"]))
    assert status == 200 and 60 <= ttl <= 600, ttl


def test_a_settle_does_not_fill_an_idempotency_record_another_request_holds(rds: redis.Redis, namespace: str) -> None:
    """A first run whose claim expired (a long queue) and a retry that claimed the key anew: the
    late first settle is metered but must not overwrite the retry's record."""
    keys = AgentKeys(f"{namespace}/agent")
    stream = f"openledger:usage:test:{secrets.token_hex(4)}"
    record = idempotency_key(f"{namespace}/agent", secrets.token_hex(4))
    rds.hset(record, mapping={"state": "running", "fp": "f", "owner": "req-retry"})
    late = f"req-{secrets.token_hex(4)}"
    skeys, settle = _settle_script(rds, keys, stream, late, record)
    outcome = ["status", "200", "ctype", "application/json", "body", "{}", "event", late, "remaining", "",
               "fp", "f", "owner", late]  # fmt: skip
    settle(keys=skeys, args=[late, "0", "20261202", "60", "0", "0", "1", "60000", str(len(outcome) // 2), *outcome,
                             "id", late])  # fmt: skip
    assert rds.xlen(stream) == 1  # metered
    assert rds.hgetall(record) == {b"state": b"running", b"fp": b"f", b"owner": b"req-retry"}


def test_an_idempotency_record_lost_mid_request_is_written_with_its_fingerprint(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, slow: SlowUpstream
) -> None:
    """Redis lost the claim while the request ran: the outcome is stored with the body's
    fingerprint, so the client's retry gets the stored answer (not 422, not a second charge)."""
    ref = f"{namespace}/agent"
    key = _setup(rds, namespace, slow, Price(per_request=10**15))
    slow.delay_s = 1.0
    idem = f"lost-{secrets.token_hex(4)}"
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_idem, shared_gateway, key, idem)
        wait_for(lambda: _in_flight(rds, ref) == 1, 10, "request admitted")
        assert rds.delete(idempotency_key(ref, idem)) == 1
        first = answer.result(20)
    slow.delay_s = 0
    again = _idem(shared_gateway, key, idem)
    assert first[0] == 200 and again[0] == 200 and again[1]["idempotent-replayed"] == "true", again
    assert len(usage_events(rds, shared_gateway.stream, ref)) == 1

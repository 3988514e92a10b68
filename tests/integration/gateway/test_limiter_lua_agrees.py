"""admit.lua (the production limiter) agrees with gcra.py (the pure reference), decision by decision."""

from __future__ import annotations

import random

import pytest
import redis

from openledger.gateway.gcra import Limit, gcra_pair
from openledger.gateway.records import AgentKeys, apikey_key
from openledger.gateway.scripts import ADMIT, AdmitCode
from tests.integration.gateway.conftest import provision_agent


@pytest.mark.parametrize(
    ("rps", "burst", "tpm", "seed"), [(50, 10, 6000, 1), (3, 1, 600, 2), (1000, 200, 10**6, 3), (0.5, 2, 90, 4)]
)
def test_admit_script_matches_the_reference(
    rds: redis.Redis, namespace: str, rps: float, burst: int, tpm: int, seed: int
) -> None:
    key = provision_agent(rds, namespace, rps=rps, burst=burst, tpm=tpm, max_concurrency=0)
    ref = f"{namespace}/agent"
    keys = AgentKeys(ref)
    config = {k.decode(): v.decode() for k, v in rds.hgetall(keys.config).items()}
    script = rds.register_script(ADMIT.source)
    rng = random.Random(seed)
    now = 1_700_000_000_000_000
    tat_r = tat_t = None
    requests, tokens = Limit(rps, burst), Limit(tpm / 60, tpm)
    agreed = allowed = 0
    for i in range(400):
        now += int(rng.expovariate(rps * 1.5) * 1e6)
        cost = rng.randint(1, max(1, tpm // 20))
        reply = script(
            keys=[
                apikey_key(config["key_hash"]),
                keys.config,
                keys.inflight,
                keys.reserved,
                keys.spend,
                keys.rate_requests,
                keys.rate_tokens,
                keys.queue,
                keys.stats,
            ],
            args=[
                ref,
                config["version"],
                f"r{i}",
                str(now),
                repr(float(rps)),
                str(burst),
                repr(tpm / 60),
                str(tpm),
                str(cost),
                "0",
                str(10**12),
                "0",
                "",
                "1",
                "x",
                "0",
                "",
                "0",
            ],
        )
        req, tok = gcra_pair(tat_r, tat_t, now, requests, tokens, cost)
        expected_ok = req.allowed and tok.allowed
        if expected_ok:
            assert reply[0] == AdmitCode.ADMITTED, (i, reply, req, tok)
            allowed += 1
        elif tok.retry_after_us == -1:
            assert reply[0] == AdmitCode.TOO_MANY_TOKENS
        else:
            assert reply[0] == AdmitCode.RATE_LIMITED, (i, reply, req, tok)
            which = 1 if not req.allowed else 2
            wait = req.retry_after_us if which == 1 else tok.retry_after_us
            assert (reply[1], reply[2]) == (wait, which)
        tat_r, tat_t = req.tat_us, tok.tat_us
        agreed += 1
        # The script stores exactly the reference's TATs.
        if expected_ok and not requests.unlimited:
            assert int(rds.get(keys.rate_requests)) == tat_r
    assert agreed == 400 and 0 < allowed < 400
    assert key

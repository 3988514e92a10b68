"""The doctor's runner: a hung probe fails in time, a missing setting warns, an error fails, secrets never show."""

from __future__ import annotations

import threading
import time

from openledger.doctor import _run_all
from openledger.doctor.decisions import Check, Status
from openledger.doctor.probes import Context, NotConfigured, Probe
from openledger.settings import Settings


def _ctx() -> Context:
    return Context(Settings(database_url="postgresql://app:db-pass-1234@db:5432/ledger"), timeout_s=0.2)


def test_a_hung_probe_fails_at_its_deadline_while_the_others_answer() -> None:
    release = threading.Event()

    def hangs(ctx: Context) -> list[Check]:
        release.wait(30)
        return []

    probes = (
        Probe("stuck", hangs, "look at it"),
        Probe("fine", lambda ctx: [Check("fine", Status.OK, "yes")], ""),
    )
    started = time.monotonic()
    checks = _run_all(_ctx(), probes, budget_s=0.5)
    elapsed_s = time.monotonic() - started
    release.set()

    assert elapsed_s < 2
    assert checks == [
        Check("stuck", Status.FAIL, "no answer within 0.5 s", "look at it"),
        Check("fine", Status.OK, "yes"),
    ]


def test_a_missing_setting_warns_and_an_error_fails_with_the_probes_hint() -> None:
    def unset(ctx: Context) -> list[Check]:
        raise NotConfigured("REDIS_URL is not set")

    def broken(ctx: Context) -> list[Check]:
        raise ConnectionRefusedError(111, "Connection refused")

    checks = _run_all(_ctx(), (Probe("redis", unset, "h1"), Probe("db", broken, "check DATABASE_URL")), budget_s=5)

    assert checks[0].status is Status.WARN and checks[0].detail == "skipped: REDIS_URL is not set"
    assert checks[1] == Check("db", Status.FAIL, "ConnectionRefusedError: [Errno 111] Connection refused",
                              "check DATABASE_URL")  # fmt: skip


def test_passwords_of_the_configured_urls_are_secrets() -> None:
    ctx = _ctx()
    ctx.add_secret_url("https://user:rpc-pass-99@rpc.example.com/v3/abcdef0123456789")
    assert {"db-pass-1234", "rpc-pass-99", "/v3/abcdef0123456789"} <= ctx.secrets


def test_database_and_redis_urls_keep_their_paths_visible() -> None:
    ctx = Context(Settings(database_url="postgresql://app@db:5432/ledger_main", redis_url="redis://r:6379/0"))
    assert ctx.secrets == set()

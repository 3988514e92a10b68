"""``openledger doctor``: the one command an SRE runs first.

- ``decisions``: pure, facts in, ``Check`` (ok | warn | fail, detail, hint) out;
- ``probes``: the I/O that reads the facts (API server, Redis, PostgreSQL, chains);
- here, ``run_doctor``: every probe in its own thread, each bounded by a deadline
  (a dead dependency fails its check in about ``timeout_s``, it never hangs the
  command), then ``ledger verify`` with the chains that answered, then every
  line scrubbed of the secrets the probes saw.

Exit code 0 when nothing failed (warnings allowed), 1 otherwise (``Report.exit_code``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from openledger.doctor.decisions import Check, Report, Status, redact
from openledger.doctor.probes import PROBES, VERIFY_PROBE, Context, NotConfigured, Probe
from openledger.settings import Settings

__all__ = ["Check", "Report", "Status", "run_doctor"]

# A probe makes a few calls in a row (e.g. the pools' Secrets, then their chains); each call has
# the timeout itself, so the probe as a whole gets a few of them before it counts as hung.
_CALLS_PER_PROBE = 3


def run_doctor(
    settings: Settings, *, timeout_s: float = 5.0, verify_timeout_s: float = 30.0, full_verify: bool = False
) -> Report:
    """Run every check; the report lists them in a fixed order."""
    ctx = Context(settings, timeout_s=timeout_s, verify_timeout_s=verify_timeout_s, full_verify=full_verify)
    checks = _run_all(ctx, PROBES, timeout_s * _CALLS_PER_PROBE)
    checks += _run_all(ctx, (VERIFY_PROBE,), verify_timeout_s + timeout_s)
    with ctx.lock:
        secrets = set(ctx.secrets)
    return Report(tuple(replace(c, detail=redact(c.detail, secrets), hint=redact(c.hint, secrets)) for c in checks))


def _run_all(ctx: Context, probes: Sequence[Probe], budget_s: float) -> list[Check]:
    results: list[list[Check] | None] = [None] * len(probes)
    errors: list[BaseException | None] = [None] * len(probes)

    def work(i: int, probe: Probe) -> None:
        try:
            results[i] = probe.run(ctx)
        except BaseException as exc:  # noqa: BLE001 - reported as the check's outcome
            errors[i] = exc

    # Daemon threads: a probe stuck past its deadline must not keep the process alive.
    threads = [
        threading.Thread(target=work, args=(i, p), daemon=True, name=f"doctor-{p.name}") for i, p in enumerate(probes)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + budget_s
    checks: list[Check] = []
    for i, (probe, thread) in enumerate(zip(probes, threads, strict=True)):
        thread.join(max(0.0, deadline - time.monotonic()))
        checks += _outcome(probe, results[i], errors[i], thread.is_alive(), budget_s)
    return checks


def _outcome(
    probe: Probe, result: list[Check] | None, error: BaseException | None, hung: bool, budget_s: float
) -> list[Check]:
    if hung:
        return [Check(probe.name, Status.FAIL, f"no answer within {budget_s:g} s", probe.hint)]
    if isinstance(error, NotConfigured):
        return [Check(probe.name, Status.WARN, f"skipped: {error}", "set it to run this check")]
    if error is not None:
        message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        return [Check(probe.name, Status.FAIL, f"{type(error).__name__}: {message}".rstrip(": "), probe.hint)]
    return result or []

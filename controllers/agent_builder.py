"""Pure decisions of the Agent controller: no I/O, no client library.

- ``agent_config(ref, spec, key_hash, version)``: the Redis record the gateway
  enforces (``openledger.gateway.records.AgentConfig``), money in base units.
- ``credentials_secret(agent, api_key)``: the Secret that delivers the key once,
  owned by the Agent (``ownerReferences`` for real clusters; the finalizer
  deletes it locally, where there is no garbage collector).
- ``agent_status(...)``: phase, counters and conditions from what Redis reports
  (the rate-limited count is in the ``LimitsApplied`` message: the CRD's status
  schema has no field for it yet).
- ``secret_owned_by(secret, agent)``: whether the Agent may use (and write) a
  Secret: only one it owns (``ownerReferences`` uid) or that carries its label
  ``openledger.io/agent: <agent name>``, never another Agent's.
- ``spend_of(fields, period)``, ``stream_usage(ref, fields)``, ``rebuilt_spend(...)``:
  the Agent's spend in its budget period, from Redis's spend record, and rebuilt
  from the ledger plus the stream's events the ledger has not ingested yet.
- ``new_api_key()``: ``olk_`` + 43 url-safe characters (256 random bits).
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from openledger.controllers.conditions import Condition, condition, merge_conditions
from openledger.gateway.records import MONEY_LIMIT, AgentConfig, period_bounds_s
from openledger.money import MoneyError, to_base_units, to_decimal_string
from openledger.wire import usage_values

AGENT_LABEL = "openledger.io/agent"
API_KEY_FIELD = "apiKey"
DEFAULT_DECIMALS = 18


class AgentSpecError(ValueError):
    """The Agent's spec cannot be enforced; the message names the field."""


def new_api_key() -> str:
    return "olk_" + secrets.token_urlsafe(32)


def secret_name(name: str, spec: Mapping[str, Any]) -> str:
    return str(spec.get("credentialsSecretName") or f"{name}-credentials")


def agent_config(ref: str, spec: Mapping[str, Any], key_hash: str, version: int = 0) -> AgentConfig:
    """The enforced configuration. Defaults match the CRD's; raises ``AgentSpecError`` naming the field."""
    account = spec.get("account")
    if not isinstance(account, str) or len(account) != 42 or not account.startswith("0x"):
        raise AgentSpecError("spec.account: must be 0x followed by 40 hex digits")
    models = spec.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise AgentSpecError("spec.models: must be a non-empty list of Model names")
    limits = spec.get("limits") or {}
    queue = spec.get("queue") or {}
    budget = spec.get("budget")
    amount: int | None = None
    period, enforcement = "Day", "Hard"
    if budget:
        try:
            amount = to_base_units(str(budget.get("amount")), DEFAULT_DECIMALS, field="spec.budget.amount")
        except MoneyError as exc:
            raise AgentSpecError(str(exc)) from None
        if amount >= MONEY_LIMIT:
            raise AgentSpecError("spec.budget.amount: must be below 10**78 base units (the ledger's NUMERIC(78,0))")
        period = str(budget.get("period", "Day"))
        enforcement = str(budget.get("enforcement", "Hard"))
        if period not in ("Hour", "Day", "Month"):
            raise AgentSpecError(f"spec.budget.period: must be Hour, Day or Month, got {period!r}")
        if enforcement not in ("Hard", "Soft"):
            raise AgentSpecError(f"spec.budget.enforcement: must be Hard or Soft, got {enforcement!r}")

    def number(section: Mapping[str, Any], key: str, default: int, path: str) -> int:
        value = section.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise AgentSpecError(f"{path}.{key}: must be a non-negative integer, got {value!r}")
        return value

    return AgentConfig(
        ref=ref,
        account=account.lower(),
        models=tuple(sorted(set(models))),
        requests_per_second=float(number(limits, "requestsPerSecond", 10, "spec.limits")),
        burst=max(1, number(limits, "burst", 20, "spec.limits")),
        tokens_per_minute=number(limits, "tokensPerMinute", 100000, "spec.limits"),
        max_concurrency=number(limits, "maxConcurrency", 8, "spec.limits"),
        budget_base_units=amount,
        budget_period=period,
        budget_enforcement=enforcement,
        queue_max_depth=number(queue, "maxDepth", 1000, "spec.queue"),
        queue_max_wait_ms=number(queue, "maxWaitSeconds", 30, "spec.queue") * 1000,
        priority=number(spec, "priority", 0, "spec") if "priority" in spec else 0,
        key_hash=key_hash,
        version=version,
    )


def same_config(a: AgentConfig, b: AgentConfig) -> bool:
    """Equal apart from the version (no need to bump it and make gateways reload)."""
    fa, fb = a.to_fields(), b.to_fields()
    fa.pop("version")
    fb.pop("version")
    return fa == fb


def credentials_secret(agent: Mapping[str, Any], api_key: str) -> dict[str, Any]:
    """The Secret delivering the key, owned by the Agent."""
    meta = agent["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(meta["name"], agent.get("spec") or {}),
            "namespace": meta["namespace"],
            "labels": {AGENT_LABEL: meta["name"], "app.kubernetes.io/managed-by": "openledger"},
            "ownerReferences": [
                {
                    "apiVersion": agent.get("apiVersion", "openledger.io/v1alpha1"),
                    "kind": "Agent",
                    "name": meta["name"],
                    "uid": meta.get("uid", ""),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "data": {API_KEY_FIELD: base64.b64encode(api_key.encode()).decode()},
    }


def api_key_from_secret(secret: Mapping[str, Any] | None) -> str | None:
    data = (secret or {}).get("data") or {}
    raw = data.get(API_KEY_FIELD)
    if not raw:
        return None
    try:
        key = base64.b64decode(raw).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return key or None


def secret_owned_by(secret: Mapping[str, Any], agent: Mapping[str, Any]) -> bool:
    """May ``agent`` use (and write) ``secret``? Only if the Agent owns it or it carries the Agent's label.

    Anything else, another Agent's Secret above all, is not the Agent's to read: naming a
    Secret in ``credentialsSecretName`` must not be a way to borrow somebody's key. A Secret
    owned by another Agent stays that Agent's whatever its labels say.
    """
    meta = agent.get("metadata") or {}
    secret_meta = secret.get("metadata") or {}
    owners = {ref.get("uid") for ref in secret_meta.get("ownerReferences") or () if ref.get("kind") == "Agent"}
    if owners:
        return bool(meta.get("uid")) and meta.get("uid") in owners
    labels = secret_meta.get("labels") or {}
    return bool(meta.get("name")) and labels.get(AGENT_LABEL) == meta.get("name")


# ------------------------------------------------------------------ spend


def spend_of(fields: Mapping[str, str], current_period: str) -> int | None:
    """Base units spent in ``current_period`` from the Agent's spend record (``AgentKeys.spend``).

    ``None`` when there is no record (the spend is unknown until the operator rebuilds it);
    0 when the record is of an earlier period (the gateway resets it on its next settle).
    """
    if not fields:
        return None
    if fields.get("period") != current_period:
        return 0
    spent = fields.get("spent", "")
    if not spent.isdigit():
        raise ValueError(f"agent spend record: field 'spent' must be decimal base units, got {spent!r}")
    return int(spent)


@dataclass(frozen=True)
class StreamUsage:
    """One of an Agent's usage events still in the Redis stream, as the spend rebuild needs it."""

    event_id: str  # canonical UUID text, as the ledger's usage_events.event_id prints it
    cost_base_units: int
    finished_at_ms: int


def stream_usage(agent_ref: str, fields: Mapping[str, str] | Mapping[bytes, bytes]) -> StreamUsage | None:
    """The entry's event if it is ``agent_ref``'s (either wire format); ``None`` for another Agent's.

    Raises ``ValueError`` naming the field when the entry cannot be read (the ledger
    dead-letters such an entry: it is never charged, so the rebuild leaves it out).
    """
    values = usage_values(fields)
    if values.get("agent") != agent_ref:
        return None
    cost, finished = values.get("cost", ""), values.get("finished_at_ms", "")
    if not cost.isdigit():
        raise ValueError(f"usage event: field 'cost' must be decimal base units, got {cost!r}")
    if not finished.isdigit():
        raise ValueError(f"usage event: field 'finished_at_ms' must be an integer, got {finished!r}")
    try:
        event_id = str(uuid.UUID(values.get("id", "")))
    except ValueError:
        raise ValueError(f"usage event: field 'id' is not a UUID: {values.get('id')!r}") from None
    return StreamUsage(event_id, int(cost), int(finished))


def period_window_ms(period: str, now_s: float) -> tuple[int, int]:
    """The budget period containing ``now_s`` as [start, end) in Unix ms.

    Periods start on whole UTC hours, so the ledger's hourly spend sums to exactly this window.
    """
    start, end = period_bounds_s(period, now_s)
    return start * 1000, end * 1000


def rebuilt_spend(
    ledger_spent: int,
    stream: Iterable[StreamUsage],
    ingested: Collection[str],
    window_ms: tuple[int, int],
) -> int:
    """The period's spend: the ledger's, plus each stream event of the period it has not ingested.

    The period of an event is that of its ``finished_at_ms``, as in the ledger's
    ``agent_spend_hourly``. ``ingested``: the ids among ``stream`` that the ledger holds
    (read in the same snapshot as ``ledger_spent``), so no event counts twice; an event
    that appears twice in the stream counts once.
    """
    start_ms, end_ms = window_ms
    seen: set[str] = set()
    total = ledger_spent
    for event in stream:
        if event.event_id in seen or event.event_id in ingested or not start_ms <= event.finished_at_ms < end_ms:
            continue
        seen.add(event.event_id)
        total += event.cost_base_units
    return total


@dataclass(frozen=True)
class Usage:
    """What Redis says about an Agent right now (read by the status timer)."""

    queue_depth: int = 0
    in_flight: int = 0
    spent_base_units: int | None = 0  # None: no spend record (being rebuilt from the ledger)
    reserved_base_units: int = 0
    rate_limited: int = 0
    period_start: str = ""


def agent_status(
    config: AgentConfig,
    usage: Usage,
    previous: Mapping[str, Any] | None,
    generation: int | None,
    secret: str,
    rotated: bool = False,
    throttled: bool = False,
    spend_problem: str = "",
) -> dict[str, Any]:
    """The status subresource for an Agent whose config is applied.

    While the spend is unknown (``usage.spent_base_units is None``) a budgeted Agent is
    ``Degraded``: the gateway answers its requests 503 until the operator has rebuilt the
    spend; ``spend_problem`` says what holds the rebuild up (PostgreSQL unreachable…).
    """
    spent = usage.spent_base_units
    budget = config.budget_base_units
    phase = "Ready"
    if spent is None and budget is not None:
        phase = "Degraded"
    elif spent is not None and budget is not None and spent >= budget:
        phase = "OverBudget"
    if phase == "Ready" and throttled:
        phase = "Throttled"
    limits = f"config version {config.version} in Redis; {usage.rate_limited} requests rate limited"
    conditions: list[Condition] = [
        condition(
            "CredentialsIssued",
            True,
            "KeyRotated" if rotated else "KeyIssued",
            f"API key in Secret {secret}",
            generation=generation,
        ),
    ]
    if phase == "Degraded":
        restoring = "rebuilding this period's spend from the ledger" + (f" ({spend_problem})" if spend_problem else "")
        conditions += [
            condition("LimitsApplied", False, "SpendRestoring", f"{limits}; {restoring}", generation=generation),
            condition(
                "Ready",
                False,
                "SpendRestoring",
                "the gateway answers 503 until the spend is known",
                generation=generation,
            ),
        ]
    else:
        conditions += [
            condition("LimitsApplied", True, "Applied", limits, generation=generation),
            condition("Ready", True, phase, "the gateway accepts this Agent's key", generation=generation),
        ]
    status: dict[str, Any] = {
        "phase": phase,
        "secretName": secret,
        "queueDepth": usage.queue_depth,
        "inFlight": usage.in_flight,
        "rateLimited": usage.rate_limited,
        "conditions": merge_conditions((previous or {}).get("conditions"), conditions),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    if spent is not None:  # unknown: leave the last known figures
        status["spentThisPeriod"] = to_decimal_string(spent, DEFAULT_DECIMALS)
        if budget is not None:
            status["budgetRemaining"] = to_decimal_string(max(0, budget - spent), DEFAULT_DECIMALS)
    if usage.period_start:
        status["periodStart"] = usage.period_start
    return status


def secret_not_owned_status(previous: Mapping[str, Any] | None, generation: int | None, secret: str) -> dict[str, Any]:
    """The Agent names a Secret it does not own: no key is read from it or written to it."""
    message = (
        f"Secret {secret} exists and is not this Agent's (no ownerReference to it, no label "
        f"{AGENT_LABEL}=<agent name>); name another Secret, or label this one if it is meant for this Agent"
    )
    conditions = [
        condition("CredentialsIssued", False, "SecretNotOwned", message, generation=generation),
        condition("Ready", False, "SecretNotOwned", message, generation=generation),
    ]
    status: dict[str, Any] = {
        "phase": "Failed",
        "secretName": secret,
        "conditions": merge_conditions((previous or {}).get("conditions"), conditions),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def failed_status(previous: Mapping[str, Any] | None, generation: int | None, message: str) -> dict[str, Any]:
    conditions = [
        condition("LimitsApplied", False, "InvalidSpec", message, generation=generation),
        condition("Ready", False, "InvalidSpec", message, generation=generation),
    ]
    status: dict[str, Any] = {
        "phase": "Failed",
        "conditions": merge_conditions((previous or {}).get("conditions"), conditions),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status

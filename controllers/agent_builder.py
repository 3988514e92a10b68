"""Pure decisions of the Agent controller: no I/O, no client library.

- ``agent_config(ref, spec, key_hash, version)``: the Redis record the gateway
  enforces (``openledger.gateway.records.AgentConfig``), money in base units.
- ``credentials_secret(agent, api_key)``: the Secret that delivers the key once,
  owned by the Agent (``ownerReferences`` for real clusters; the finalizer
  deletes it locally, where there is no garbage collector).
- ``agent_status(...)``: phase, counters and conditions from what Redis reports
  (the rate-limited count is in the ``LimitsApplied`` message: the CRD's status
  schema has no field for it yet).
- ``new_api_key()``: ``olk_`` + 43 url-safe characters (256 random bits).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from openledger.controllers.conditions import Condition, condition, merge_conditions
from openledger.gateway.records import AgentConfig, choose_quantum
from openledger.money import MoneyError, to_base_units, to_decimal_string

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
        budget_quantum=choose_quantum(amount),
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


@dataclass(frozen=True)
class Usage:
    """What Redis says about an Agent right now (read by the status timer)."""

    queue_depth: int = 0
    in_flight: int = 0
    spent_quanta: int = 0
    reserved_quanta: int = 0
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
) -> dict[str, Any]:
    """The status subresource for an Agent whose config is applied."""
    spent = usage.spent_quanta * config.budget_quantum
    remaining: int | None = None
    phase = "Ready"
    if config.budget_base_units is not None:
        remaining = max(0, config.budget_base_units - spent)
        if spent >= config.budget_base_units:
            phase = "OverBudget"
    if phase == "Ready" and throttled:
        phase = "Throttled"
    conditions: list[Condition] = [
        condition(
            "CredentialsIssued",
            True,
            "KeyRotated" if rotated else "KeyIssued",
            f"API key in Secret {secret}",
            generation=generation,
        ),
        condition(
            "LimitsApplied",
            True,
            "Applied",
            f"config version {config.version} in Redis; {usage.rate_limited} requests rate limited",
            generation=generation,
        ),
        condition("Ready", True, phase, "the gateway accepts this Agent's key", generation=generation),
    ]
    status: dict[str, Any] = {
        "phase": phase,
        "secretName": secret,
        "queueDepth": usage.queue_depth,
        "inFlight": usage.in_flight,
        "rateLimited": usage.rate_limited,
        "spentThisPeriod": to_decimal_string(spent, DEFAULT_DECIMALS),
        "conditions": merge_conditions((previous or {}).get("conditions"), conditions),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    if remaining is not None:
        status["budgetRemaining"] = to_decimal_string(remaining, DEFAULT_DECIMALS)
    if usage.period_start:
        status["periodStart"] = usage.period_start
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

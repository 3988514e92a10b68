"""Pure pieces of the RewardPool controller: spec → settler config, selector, bindings, status.

No I/O here; ``rewardpool.py`` is the Kopf shell. Every error names the field.
Specs are read through ``api.defaulted_spec``: the defaults live in the CRD
schema only.

Binding rules (``binding_plan``), decided before any usage is metered so that
no configuration error is discovered at ingest:

* a Model belongs to at most one pool: among the valid pools of its namespace
  that select it, the oldest (creationTimestamp, then name) binds it; the others
  report it refused (``ModelClaimed``), so two pools never flip its binding;
* a Model priced in other units than the pool's token (``pricing.decimals`` ≠
  ``spec.chain.tokenDecimals``) is refused (``DecimalsMismatch``);
* a Model whose price could overflow the distributor's amounts is refused
  (``PriceOverflow``): the contract stores cumulative amounts as ``uint104``, and
  ``PRICE_HEADROOM`` (2^32) requests or tokens at any one price must fit in it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from openledger.controllers import model_builder as mb
from openledger.controllers.api import defaulted_spec
from openledger.controllers.conditions import condition, merge_conditions, now_rfc3339
from openledger.money import MoneyError, to_base_units, to_decimal_string
from openledger.settlement.errors import ConfigError
from openledger.settlement.pool import PoolConfig, PoolStatus
from openledger.wire import PoolBinding, object_ref

AMOUNT_MAX = 2**104 - 1  # RewardDistributor.sol keeps cumulative amounts in uint104
PRICE_HEADROOM = 2**32  # requests (or tokens) at one price that must fit in AMOUNT_MAX
# Settled-condition reasons that are a refusal by configuration, not an operational backlog.
REFUSALS = ("IdentityChanged", "DistributorInUse", "ContractStateMismatch")


class RewardPoolSpecError(ValueError):
    """A RewardPool spec that cannot be settled; the message names the field."""


def _secret_ref(chain: Mapping[str, Any], field: str) -> tuple[str, str]:
    ref = chain.get(field) or {}
    name, key = ref.get("name"), ref.get("key")
    if not name or not key:
        raise RewardPoolSpecError(f"spec.chain.{field}: name and key are required")
    return str(name), str(key)


def secret_refs(spec: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """``{"rpcUrl": (secret, key), "signerKey": (secret, key)}``."""
    chain = spec.get("chain") or {}
    return {"rpcUrl": _secret_ref(chain, "rpcUrlSecretRef"), "signerKey": _secret_ref(chain, "signerKeySecretRef")}


_KEY_RE = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


def check_secrets(rpc_url: str, signer_key: str) -> None:
    """Shape checks of the Secret values; messages name the field, never the value."""
    if not rpc_url.startswith(("http://", "https://")):
        raise RewardPoolSpecError("spec.chain.rpcUrlSecretRef: the value is not an http(s):// URL")
    if not _KEY_RE.match(signer_key):
        raise RewardPoolSpecError("spec.chain.signerKeySecretRef: the value is not a private key (0x + 64 hex)")


# Unset ``spec.chain.tokenDecimals`` means this (the ERC-20 convention). Not a schema default:
# a default would make the field immutable at 18 for pools created before it existed.
DEFAULT_TOKEN_DECIMALS = 18


def token_decimals(spec: Mapping[str, Any]) -> int:
    """Decimals of the pool's token (``spec.chain.tokenDecimals``; unset means 18)."""
    chain = spec.get("chain") or {}
    value = chain.get("tokenDecimals") if isinstance(chain, Mapping) else None
    return DEFAULT_TOKEN_DECIMALS if value is None else int(value)


def pool_config(namespace: str, name: str, raw_spec: Mapping[str, Any]) -> PoolConfig:
    """The settler's view of a RewardPool spec (no secrets)."""
    spec = defaulted_spec("RewardPool", raw_spec)
    chain = spec.get("chain")
    if not isinstance(chain, Mapping):
        raise RewardPoolSpecError("spec.chain: required")
    try:
        min_payout = to_base_units(str(spec["minPayout"]), token_decimals(spec), "spec.minPayout")
    except MoneyError as exc:
        raise RewardPoolSpecError(str(exc)) from None
    if "chainId" not in chain:
        raise RewardPoolSpecError("spec.chain.chainId: required")
    if not chain.get("distributorAddress"):
        raise RewardPoolSpecError("spec.chain.distributorAddress: required")
    secret_refs(spec)
    try:
        return PoolConfig(
            pool=object_ref(namespace, name),
            epoch_seconds=int(spec["epochSeconds"]),
            min_payout=min_payout,
            chain_id=int(chain["chainId"]),
            distributor=str(chain["distributorAddress"]),
            # N confirmations: the inclusion block counts as the first; 0 means "mined".
            confirmations=max(int(chain["confirmations"]), 1),
            paused=bool(spec["paused"]),
            token=str(chain.get("tokenAddress") or ""),
        )
    except ConfigError as exc:
        raise RewardPoolSpecError(str(exc)) from None


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str] | None) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND matchExpressions); empty selects all."""
    labels = labels or {}
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def selected_models(spec: Mapping[str, Any], models: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the Models (same namespace) the pool's modelSelector selects, sorted."""
    selector = spec.get("modelSelector")
    return sorted(
        str(m["metadata"]["name"]) for m in models if selects(selector, (m.get("metadata") or {}).get("labels"))
    )


def model_selection_changed(
    previous: Mapping[str, str] | None, labels: Mapping[str, str] | None, *, deleted: bool
) -> bool:
    """Whether a Model event can change which pools select it (so its namespace's bindings need a resync).

    ``previous`` is the Model's labels as last seen (None: not seen yet, e.g. just created or the
    operator restarted); a deletion or any label change counts, other changes (status, spec) do not.
    """
    if deleted or previous is None:
        return True
    return dict(previous) != dict(labels or {})


def resync_targets(pools: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(name, spec)`` of the RewardPools whose bindings a Model change must re-sync.

    Pools being deleted are left to their delete handler; pools whose spec is invalid
    are skipped (their reconcile reports the error), as the pool's own reconcile does.
    """
    out: list[tuple[str, Mapping[str, Any]]] = []
    for pool in pools:
        if _eligible(pool):
            out.append((str(pool["metadata"]["name"]), pool.get("spec") or {}))
    return sorted(out, key=lambda item: item[0])


def binding(namespace: str, name: str, spec: Mapping[str, Any]) -> PoolBinding:
    return PoolBinding(
        pool=object_ref(namespace, name), fee_bps=int(defaulted_spec("RewardPool", spec)["protocolFeeBps"])
    )


@dataclass(frozen=True)
class Refusal:
    """A Model the pool selects but does not bind, and why (reason CamelCase, message names the fields)."""

    model: str
    reason: str
    message: str


@dataclass(frozen=True)
class BindingPlan:
    bound: list[str]  # Model names to bind, sorted
    refused: list[Refusal]


def model_refusal(spec: Mapping[str, Any], model: Mapping[str, Any]) -> Refusal | None:
    """Why a selected Model cannot be settled by a pool with ``spec`` (None: it can)."""
    name = str((model.get("metadata") or {}).get("name"))
    try:
        price = mb.price_of(model)
    except MoneyError:
        return None  # not routed at all (the Model's Priced=False says why), so nothing to settle
    decimals = token_decimals(spec)
    if price.decimals != decimals:
        return Refusal(
            name,
            "DecimalsMismatch",
            f"Model {name}: spec.pricing.decimals {price.decimals} differs from the pool's"
            f" spec.chain.tokenDecimals {decimals}; its amounts would be settled in the wrong unit",
        )
    prices = {"perRequest": price.per_request, "perInputToken": price.per_input_token,
              "perOutputToken": price.per_output_token}  # fmt: skip
    for field, amount in prices.items():
        if amount * PRICE_HEADROOM > AMOUNT_MAX:
            return Refusal(
                name,
                "PriceOverflow",
                f"Model {name}: spec.pricing.{field} is {amount} base units; {PRICE_HEADROOM} requests or"
                f" tokens at that price exceed the distributor's uint104 amount range ({AMOUNT_MAX})",
            )
    return None


def _age_key(pool: Mapping[str, Any]) -> tuple[str, str]:
    meta = pool.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))


def binding_plan(
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    models: Sequence[Mapping[str, Any]],
    pools: Sequence[Mapping[str, Any]],
) -> BindingPlan:
    """Which of the Models this pool selects it binds, and which it refuses (see the module docstring).

    ``pools`` are the RewardPools of the namespace (this one included or not); only
    valid pools that are not being deleted can hold a Model.
    """
    rivals = sorted(
        (p for p in pools if str((p.get("metadata") or {}).get("name")) != name and _eligible(p)), key=_age_key
    )
    me = next((p for p in pools if str((p.get("metadata") or {}).get("name")) == name), {"metadata": {"name": name}})
    bound: list[str] = []
    refused: list[Refusal] = []
    for model in sorted(models, key=lambda m: str(m["metadata"]["name"])):
        model_name = str(model["metadata"]["name"])
        if not selects(spec.get("modelSelector"), (model.get("metadata") or {}).get("labels")):
            continue
        holder = next(
            (p for p in rivals if _age_key(p) < _age_key(me) and selects(
                (p.get("spec") or {}).get("modelSelector"), (model.get("metadata") or {}).get("labels"))),
            None,
        )  # fmt: skip
        if holder is not None:
            other = object_ref(namespace, str(holder["metadata"]["name"]))
            refused.append(Refusal(model_name, "ModelClaimed",
                                   f"Model {model_name} already belongs to RewardPool {other} (the older pool"
                                   " selecting it); a Model belongs to at most one pool"))  # fmt: skip
            continue
        refusal = model_refusal(spec, model)
        if refusal is not None:
            refused.append(refusal)
        else:
            bound.append(model_name)
    return BindingPlan(bound, refused)


def _eligible(pool: Mapping[str, Any]) -> bool:
    meta = pool.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    try:
        pool_config(str(meta.get("namespace", "")), str(meta.get("name", "")), pool.get("spec") or {})
    except RewardPoolSpecError:
        return False
    return True


def models_bound_condition(plan: BindingPlan, *, generation: int | None, now: str) -> dict[str, Any]:
    """The ``ModelsBound`` condition: True when every selected Model is bound."""
    if not plan.refused:
        return condition("ModelsBound", True, "AllBound", "", generation=generation, now=now)
    reason = plan.refused[0].reason if len({r.reason for r in plan.refused}) == 1 else "ModelsRefused"
    message = "; ".join(r.message for r in plan.refused)[:4000]
    return condition("ModelsBound", False, reason, message, generation=generation, now=now)


def pool_status(
    previous: Mapping[str, Any] | None,
    *,
    generation: int | None,
    models: int,
    paused: bool,
    epoch_seconds: int,
    decimals: int = 18,
    settled: PoolStatus | None = None,
    plan: BindingPlan | None = None,
    error: str = "",
    now: str | None = None,
) -> dict[str, Any]:
    """The status document (merge-patched). ``settled`` is the settler's pass, ``error`` a spec/secret problem."""
    previous = previous or {}
    now = now or now_rfc3339()
    status: dict[str, Any] = {"observedGeneration": generation, "models": models}
    conds = []
    if plan is not None:
        conds.append(models_bound_condition(plan, generation=generation, now=now))
    if error:
        status["phase"] = "Failed"
        conds.append(condition("Ready", False, "InvalidSpec", error, generation=generation, now=now))
        status["conditions"] = merge_conditions(previous.get("conditions"), conds)
        return status
    if settled is not None and not settled.database_available:
        # Nothing fresh from the ledger: keep the last figures, say why they are stale.
        status["phase"] = "Degraded"
        for type_ in ("Settled", "Ready"):
            conds.append(
                condition(type_, False, "DatabaseUnavailable", settled.blocked_message, generation=generation, now=now)
            )
        status["conditions"] = merge_conditions(previous.get("conditions"), conds)
        return status
    if settled is not None:
        status.update(
            currentEpoch=settled.current_epoch,
            lastSettledEpoch=settled.last_settled_epoch,
            lastRoot=settled.last_root,
            pendingAmount=to_decimal_string(settled.pending_amount, decimals),
            settledTotal=to_decimal_string(settled.settled_total, decimals),
            nextEpochAt=_rfc3339((settled.current_epoch + 1) * epoch_seconds),
        )
        if settled.last_tx_hash:
            status["lastTxHash"] = settled.last_tx_hash
        if settled.last_settled_epoch and settled.last_settled_epoch != previous.get("lastSettledEpoch"):
            status["lastSettledAt"] = now
        reachable = settled.chain_reachable
        conds.append(
            condition(
                "ChainReachable",
                reachable,
                "RpcOk" if reachable else "RpcUnavailable",
                "" if reachable else settled.chain_message,
                generation=generation,
                now=now,
            )
        )
        conds.append(_settled_condition(settled, generation=generation, now=now))
        if paused:
            phase = "Paused"
        elif settled.blocked_reason in REFUSALS:
            phase = "Failed"
        elif not reachable:
            phase = "Degraded"
        elif settled.publishing_epoch:
            phase = "Settling"
        else:
            phase = "Ready"
    else:
        phase = "Paused" if paused else "Pending"
    status["phase"] = phase
    ready_reason = settled.blocked_reason if settled is not None and phase == "Failed" else phase
    conds.append(
        condition("Ready", phase in ("Ready", "Settling", "Paused"), ready_reason, "", generation=generation, now=now)
    )
    status["conditions"] = merge_conditions(previous.get("conditions"), conds)
    return status


def _settled_condition(settled: PoolStatus, *, generation: int | None, now: str) -> dict[str, Any]:
    """``Settled``: UpToDate only when nothing is closed-and-unsettled AND nothing is refused or blocked."""
    backlog = f"{settled.lag_epochs} closed epoch(s) not yet settled"
    if settled.blocked_reason in REFUSALS:
        return condition("Settled", False, settled.blocked_reason, settled.blocked_message,
                         generation=generation, now=now)  # fmt: skip
    if settled.lag_epochs == 0:
        return condition("Settled", True, "UpToDate", "", generation=generation, now=now)
    if settled.blocked_message:
        reason = settled.blocked_reason or "PublicationBlocked"
        return condition("Settled", False, reason, f"{backlog}: {settled.blocked_message}",
                         generation=generation, now=now)  # fmt: skip
    return condition("Settled", False, "Backlog", backlog, generation=generation, now=now)


def _rfc3339(unix_s: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = [
    "AMOUNT_MAX",
    "PRICE_HEADROOM",
    "BindingPlan",
    "Refusal",
    "RewardPoolSpecError",
    "binding",
    "binding_plan",
    "check_secrets",
    "model_refusal",
    "model_selection_changed",
    "models_bound_condition",
    "pool_config",
    "pool_status",
    "resync_targets",
    "secret_refs",
    "selected_models",
    "selects",
    "token_decimals",
]

"""Pure pieces of the RewardPool controller: spec → settler config, selector, bindings, status.

No I/O here; ``rewardpool.py`` is the Kopf shell. Every error names the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from openledger.controllers.conditions import condition, merge_conditions, now_rfc3339
from openledger.money import MoneyError, to_base_units, to_decimal_string
from openledger.settlement.errors import ConfigError
from openledger.settlement.pool import PoolConfig, PoolStatus
from openledger.wire import PoolBinding, object_ref

DECIMALS = 18  # RewardPool amounts are in the pool token's units; the API default


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


def pool_config(namespace: str, name: str, spec: Mapping[str, Any]) -> PoolConfig:
    """The settler's view of a RewardPool spec (no secrets)."""
    chain = spec.get("chain")
    if not isinstance(chain, Mapping):
        raise RewardPoolSpecError("spec.chain: required")
    try:
        min_payout = to_base_units(str(spec.get("minPayout", "0")), DECIMALS, "spec.minPayout")
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
            epoch_seconds=int(spec.get("epochSeconds", 3600)),
            min_payout=min_payout,
            chain_id=int(chain["chainId"]),
            distributor=str(chain["distributorAddress"]),
            # N confirmations: the inclusion block counts as the first; 0 means "mined".
            confirmations=max(int(chain.get("confirmations", 2)), 1),
            paused=bool(spec.get("paused", False)),
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
        meta = pool.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        spec = pool.get("spec") or {}
        try:
            pool_config(str(meta.get("namespace", "")), str(meta.get("name", "")), spec)
        except RewardPoolSpecError:
            continue
        out.append((str(meta["name"]), spec))
    return sorted(out, key=lambda item: item[0])


def binding(namespace: str, name: str, spec: Mapping[str, Any]) -> PoolBinding:
    return PoolBinding(pool=object_ref(namespace, name), fee_bps=int(spec.get("protocolFeeBps", 0)))


def _money(base_units: int) -> str:
    return to_decimal_string(base_units, DECIMALS)


def pool_status(
    previous: Mapping[str, Any] | None,
    *,
    generation: int | None,
    models: int,
    paused: bool,
    epoch_seconds: int,
    settled: PoolStatus | None = None,
    error: str = "",
    now: str | None = None,
) -> dict[str, Any]:
    """The status document (merge-patched). ``settled`` is the settler's pass, ``error`` a spec/secret problem."""
    previous = previous or {}
    now = now or now_rfc3339()
    status: dict[str, Any] = {"observedGeneration": generation, "models": models}
    conds = []
    if error:
        status["phase"] = "Failed"
        conds.append(condition("Ready", False, "InvalidSpec", error, generation=generation, now=now))
        status["conditions"] = merge_conditions(previous.get("conditions"), conds)
        return status
    if settled is not None:
        status.update(
            currentEpoch=settled.current_epoch,
            lastSettledEpoch=settled.last_settled_epoch,
            lastRoot=settled.last_root,
            pendingAmount=_money(settled.pending_amount),
            settledTotal=_money(settled.settled_total),
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
        caught_up = settled.lag_epochs == 0
        backlog = f"{settled.lag_epochs} closed epoch(s) not yet settled"
        conds.append(
            condition(
                "Settled",
                caught_up,
                "UpToDate" if caught_up else ("PublicationBlocked" if settled.blocked_message else "Backlog"),
                "" if caught_up else (f"{backlog}: {settled.blocked_message}" if settled.blocked_message else backlog),
                generation=generation,
                now=now,
            )
        )
        if paused:
            phase = "Paused"
        elif not reachable:
            phase = "Degraded"
        elif settled.publishing_epoch:
            phase = "Settling"
        else:
            phase = "Ready"
    else:
        phase = "Paused" if paused else "Pending"
    status["phase"] = phase
    conds.append(
        condition("Ready", phase in ("Ready", "Settling", "Paused"), phase, "", generation=generation, now=now)
    )
    status["conditions"] = merge_conditions(previous.get("conditions"), conds)
    return status


def _rfc3339(unix_s: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = [
    "RewardPoolSpecError",
    "binding",
    "check_secrets",
    "model_selection_changed",
    "pool_config",
    "pool_status",
    "resync_targets",
    "secret_refs",
    "selected_models",
    "selects",
]

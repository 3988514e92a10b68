"""Status conditions: pure helpers every controller shares.

A condition is the standard Kubernetes shape ``{type, status, reason, message,
lastTransitionTime, observedGeneration}``. ``set_condition`` keeps
``lastTransitionTime`` while ``status`` does not change, so re-running a
reconcile (which may happen any number of times) never churns the status.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

Condition = dict[str, Any]

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


def now_rfc3339() -> str:
    """The current time as Kubernetes writes it (second precision, UTC, ``Z``)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str,
    status: str | bool,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: str | None = None,
) -> Condition:
    """Build one condition (``status`` may be a bool)."""
    if isinstance(status, bool):
        status = TRUE if status else FALSE
    if status not in (TRUE, FALSE, UNKNOWN):
        raise ValueError(f"condition {type_}: status must be True, False or Unknown, got {status!r}")
    out: Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:4096],
        "lastTransitionTime": now or now_rfc3339(),
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def set_condition(existing: Iterable[Mapping[str, Any]] | None, new: Condition) -> list[Condition]:
    """``existing`` with ``new`` replacing the condition of its type.

    The old ``lastTransitionTime`` is kept when the status did not change.
    Order is stable: a replaced condition keeps its position, a new one is appended.
    """
    result: list[Condition] = []
    placed = False
    for old in existing or ():
        if old.get("type") != new["type"]:
            result.append(dict(old))
            continue
        merged = dict(new)
        if old.get("status") == new["status"] and old.get("lastTransitionTime"):
            merged["lastTransitionTime"] = old["lastTransitionTime"]
        result.append(merged)
        placed = True
    if not placed:
        result.append(dict(new))
    return result


def merge_conditions(existing: Iterable[Mapping[str, Any]] | None, new: Iterable[Condition]) -> list[Condition]:
    """``set_condition`` for each of ``new`` in turn."""
    result = [dict(c) for c in existing or ()]
    for cond in new:
        result = set_condition(result, cond)
    return result


def find_condition(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == type_:
            return cond
    return None


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    cond = find_condition(conditions, type_)
    return cond is not None and cond.get("status") == TRUE

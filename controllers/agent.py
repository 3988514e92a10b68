"""Agent controller (Kopf handlers): credentials, limits and budget in Redis, status.

Every handler may run more than once (Kopf retries, operator restarts, resume):
- ``reconcile_agent`` is level-based: it adopts the key already in the Agent's
  Secret (only its SHA-256 hash goes to Redis) or issues a new one, and writes
  the configuration with one Lua call that bumps the version only when
  something changed. Running it twice changes nothing.
- ``delete_agent`` (finalizer) deletes the key's hash first (the gateway's
  admission script checks it on every request, so access ends at once), then
  the Agent's Redis records and the Secret. Deleting what is gone is a no-op.
- ``secret_deleted``: deleting the Secret rotates the key: a new key, a new
  Secret, and the old hash removed in the same Lua call.
- ``agent_usage`` (timer): queue depth, in-flight, spend and rate-limited count
  from Redis into the status.

The key itself is never logged, put in status, Events or metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
import redis.asyncio as aioredis
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from openledger.controllers import kube
from openledger.controllers.agent_builder import (
    AGENT_LABEL,
    AgentSpecError,
    Usage,
    agent_config,
    agent_status,
    api_key_from_secret,
    credentials_secret,
    failed_status,
    new_api_key,
    same_config,
    secret_name,
)
from openledger.controllers.api import GROUP, VERSION
from openledger.controllers.metrics import reconcile_pass
from openledger.gateway.records import (
    QUEUE_GROUP,
    AgentConfig,
    AgentKeys,
    apikey_key,
    hash_api_key,
    period_bounds_s,
    period_id,
)
from openledger.settings import get_settings

log = logging.getLogger(__name__)

PLURAL = "agents"
STATUS_INTERVAL_S = 2.0

# Replace the config, map the new key hash, drop the old one, ensure the queue
# and its consumer group — atomically. KEYS: config, new apikey, old apikey (or
# the new one again), queue, this period's spent counter.
# ARGV: ref, expected old hash ("" = none), field, value…
_APPLY = """
local current = redis.call('HGET', KEYS[1], 'key_hash') or ''
if current ~= ARGV[2] then return -1 end
-- Budget counters are in quanta: when the quantum changes, rescale this period's spend
-- (rounding up, capped below 2^50) so the gateway keeps counting in one unit.
local old_q = tonumber(redis.call('HGET', KEYS[1], 'quantum') or '0')
local new_q = tonumber(ARGV[ARGV_QUANTUM])
if old_q > 0 and old_q ~= new_q then
  local spent = tonumber(redis.call('GET', KEYS[5]) or '0')
  if spent > 0 then
    local scaled = math.min(math.ceil(spent * old_q / new_q), 1125899906842623)
    redis.call('SET', KEYS[5], string.format('%.0f', scaled), 'KEEPTTL')
  end
end
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') + 1
redis.call('DEL', KEYS[1])
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'version', tostring(version), unpack(fields))
redis.call('SET', KEYS[2], ARGV[1])
if KEYS[3] ~= KEYS[2] then redis.call('DEL', KEYS[3]) end
redis.pcall('XGROUP', 'CREATE', KEYS[4], '@GROUP@', '$', 'MKSTREAM')
return version
""".replace("@GROUP@", QUEUE_GROUP)

# Shared clients: the operator runner's (``memo.kube``, ``memo.redis``) when present,
# else our own (``kopf run -m openledger.controllers.agent``).
_state: dict[str, Any] = {}
_rate_limited: dict[str, int] = {}  # last count seen per Agent (Throttled = it grew since the last tick)
_owned: set[str] = set()


def _adopt(memo: Any) -> None:
    for name, attr in (("api", "kube"), ("redis", "redis")):
        shared = getattr(memo, attr, None)
        if name not in _state and shared is not None:
            _state[name] = shared


async def _api() -> ApiClient:
    if "api" not in _state:
        _state["api"] = await kube.new_api_client()
        _owned.add("api")
    api: ApiClient = _state["api"]
    return api


def _redis() -> aioredis.Redis:
    if "redis" not in _state:
        _state["redis"] = aioredis.Redis.from_url(get_settings().redis_url, socket_timeout=5, socket_connect_timeout=5)
        _owned.add("redis")
    r: aioredis.Redis = _state["redis"]
    return r


@kopf.on.cleanup()
async def _close(**_: Any) -> None:
    redis_client, api = _state.pop("redis", None), _state.pop("api", None)
    if "redis" in _owned and redis_client is not None:
        await redis_client.aclose()
    if "api" in _owned and api is not None:
        await api.close()
    _owned.clear()


# ------------------------------------------------------------------ Redis edge


async def read_config(ref: str) -> AgentConfig | None:
    raw = await _redis().hgetall(AgentKeys(ref).config)
    return AgentConfig.from_fields({_text(k): _text(v) for k, v in raw.items()}) if raw else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def write_config(config: AgentConfig, previous: AgentConfig | None) -> int:
    """Apply ``config`` atomically; returns the version now in Redis."""
    if previous is not None and same_config(config, previous):
        return previous.version
    keys = AgentKeys(config.ref)
    old_hash = previous.key_hash if previous else ""
    fields = config.to_fields()
    fields.pop("version")
    argv: list[str] = [config.ref, old_hash]
    for k, v in fields.items():
        argv += [k, v]
    old_key = apikey_key(old_hash) if old_hash else apikey_key(config.key_hash)
    spent = keys.spent(period_id(config.budget_period, datetime.now(UTC).timestamp()))
    script = _APPLY.replace("ARGV_QUANTUM", str(argv.index("quantum") + 2))
    version = await _redis().eval(
        script, 5, keys.config, apikey_key(config.key_hash), old_key, keys.queue, spent, *argv
    )
    if int(version) < 0:
        raise kopf.TemporaryError("agent config changed concurrently; retrying", delay=1)
    return int(version)


async def revoke(ref: str) -> None:
    """Remove the key hash first (access ends with it), then every record of the Agent."""
    r = _redis()
    keys = AgentKeys(ref)
    key_hash = await r.hget(keys.config, "key_hash")
    async with r.pipeline(transaction=True) as pipe:
        if key_hash:
            pipe.delete(apikey_key(_text(key_hash)))
        pipe.delete(*keys.all_static())
        await pipe.execute()


async def read_usage(config: AgentConfig) -> Usage:
    keys = AgentKeys(config.ref)
    now = datetime.now(UTC).timestamp()
    async with _redis().pipeline(transaction=False) as pipe:
        pipe.xlen(keys.queue)
        pipe.zcard(keys.inflight)
        pipe.get(keys.spent(period_id(config.budget_period, now)))
        pipe.hget(keys.reserved, "_total")
        pipe.hget(keys.stats, "rate_limited")
        depth, in_flight, spent, reserved, limited = await pipe.execute()
    start, _ = period_bounds_s(config.budget_period, now)
    return Usage(
        queue_depth=int(depth or 0),
        in_flight=int(in_flight or 0),
        spent_quanta=int(spent or 0),
        reserved_quanta=int(reserved or 0),
        rate_limited=int(limited or 0),
        period_start=datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


# ------------------------------------------------------------- Kubernetes edge


async def _read_secret(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        secret = await client.CoreV1Api(await _api()).read_namespaced_secret(name, namespace, _request_timeout=10)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return dict(client.ApiClient().sanitize_for_serialization(secret))


async def _ensure_key(agent: Mapping[str, Any]) -> tuple[str, bool]:
    """The hash of the key in the Agent's Secret, issuing a new key and Secret when there is none.

    Returns (key hash, issued now). The key never leaves this function except into the Secret.
    """
    meta = agent["metadata"]
    name = secret_name(meta["name"], agent.get("spec") or {})
    existing = api_key_from_secret(await _read_secret(meta["namespace"], name))
    if existing is not None:
        return hash_api_key(existing), False
    key = new_api_key()
    try:
        await client.CoreV1Api(await _api()).create_namespaced_secret(
            meta["namespace"],
            credentials_secret(agent, key),  # type: ignore[arg-type]
            _request_timeout=10,
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
        # Someone (an earlier run of this handler) created it meanwhile: adopt that key.
        existing = api_key_from_secret(await _read_secret(meta["namespace"], name))
        if existing is None:
            raise kopf.TemporaryError(f"Secret {name} exists without {'apiKey'!r}; retrying", delay=2) from None
        return hash_api_key(existing), False
    return hash_api_key(key), True


async def apply_agent(agent: Mapping[str, Any], *, rotated: bool = False) -> dict[str, Any]:
    """Reconcile one Agent; returns the status to patch."""
    meta = agent["metadata"]
    spec = agent.get("spec") or {}
    ref = f"{meta['namespace']}/{meta['name']}"
    generation = meta.get("generation")
    previous_status = agent.get("status") or {}
    try:
        agent_config(ref, spec, "")  # validate before touching anything
    except AgentSpecError as exc:
        raise _Invalid(failed_status(previous_status, generation, str(exc))) from None
    try:
        previous = await read_config(ref)
        key_hash, issued = await _ensure_key(agent)
        config = agent_config(ref, spec, key_hash, previous.version if previous else 0)
        version = await write_config(config, previous)
        config = agent_config(ref, spec, key_hash, version)
        usage = await read_usage(config)
    except aioredis.RedisError as exc:
        raise kopf.TemporaryError(f"Redis unavailable: {exc}", delay=2) from None
    if issued:
        await kube.emit_event(
            await _api(),
            agent,
            "KeyRotated" if rotated else "KeyIssued",
            f"API key delivered in Secret {secret_name(meta['name'], spec)}",
        )
    log.info("agent applied", extra={"action": "apply", "agent": ref, "version": version, "key_issued": issued})
    return agent_status(config, usage, previous_status, generation, secret_name(meta["name"], spec), rotated and issued)


class _Invalid(Exception):
    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__(status["conditions"][-1]["message"])
        self.status = status


# -------------------------------------------------------------------- handlers


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile_agent(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    _adopt(memo)
    async with reconcile_pass("Agent"):
        try:
            status = await apply_agent(dict(body))
        except _Invalid as exc:
            patch.status.update(exc.status)
            await kube.emit_event(await _api(), dict(body), "InvalidSpec", str(exc), type_="Warning")
            raise kopf.PermanentError(str(exc)) from None
        patch.status.update(status)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_agent(name: str, namespace: str | None, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    _adopt(memo)
    assert namespace is not None, "Agents are namespaced"
    ref = f"{namespace}/{name}"
    _rate_limited.pop(ref, None)
    try:
        await revoke(ref)
    except aioredis.RedisError as exc:
        raise kopf.TemporaryError(f"Redis unavailable: {exc}", delay=1) from None
    try:
        await client.CoreV1Api(await _api()).delete_namespaced_secret(
            secret_name(name, dict(spec)), namespace, _request_timeout=10
        )
    except ApiException as exc:
        if exc.status == 403:
            # Not allowed to delete Secrets here: its ownerReference lets the garbage collector do it.
            log.warning("credentials Secret left to the garbage collector", extra={"action": "revoke", "agent": ref})
        elif exc.status != 404:
            raise
    log.info("agent revoked", extra={"action": "revoke", "agent": ref})


@kopf.on.event("", "v1", "secrets", labels={AGENT_LABEL: kopf.PRESENT})
async def secret_deleted(
    event: kopf.RawEvent, name: str, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any
) -> None:
    """Deleting an Agent's Secret rotates its key (a raw watch event: Secrets carry no finalizer)."""
    if event.get("type") != "DELETED":
        return
    _adopt(memo)
    agent_name = labels.get(AGENT_LABEL)
    if namespace is None or not agent_name:
        return
    try:
        agent = await client.CustomObjectsApi(await _api()).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, agent_name, _request_timeout=10
        )
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    if agent["metadata"].get("deletionTimestamp") or secret_name(agent_name, agent.get("spec") or {}) != name:
        return
    status = await apply_agent(agent, rotated=True)
    await kube.patch_status(await _api(), GROUP, VERSION, PLURAL, namespace, agent_name, status)


@kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_INTERVAL_S, initial_delay=STATUS_INTERVAL_S)
async def agent_usage(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Mirror queue depth, in-flight, spend and rate-limited count into the status.

    Also the repair loop for Redis: a restarted (empty) Redis has lost the Agent's records,
    so they are written again from the spec and the Secret's key (``apply_agent`` is idempotent).
    """
    _adopt(memo)
    ref = f"{namespace}/{name}"
    if status.get("phase") in (None, "Failed", "Pending"):
        return
    try:
        config = await read_config(ref)
        if config is None:
            log.warning("agent records missing in Redis; restoring", extra={"action": "restore", "agent": ref})
            patch.status.update(await apply_agent(dict(body)))
            return
        usage = await read_usage(config)
    except aioredis.RedisError:
        return  # the next tick tries again
    last = _rate_limited.get(ref)
    _rate_limited[ref] = usage.rate_limited
    throttled = last is not None and usage.rate_limited > last
    new = agent_status(
        config,
        usage,
        dict(status),
        status.get("observedGeneration"),
        str(status.get("secretName", "")),
        throttled=throttled,
    )
    changed = {k: v for k, v in new.items() if k != "conditions" and status.get(k) != v}
    if changed or last != usage.rate_limited:
        patch.status.update(changed)
        patch.status["conditions"] = new["conditions"]

"""Agent controller (Kopf handlers): credentials, limits and budget in Redis, status.

Every handler may run more than once (Kopf retries, operator restarts, resume):
- ``reconcile_agent`` is level-based: it adopts the key already in the Agent's
  Secret (only its SHA-256 hash goes to Redis) or issues a new one, and writes
  the configuration with one Lua call that bumps the version only when
  something changed. Running it twice changes nothing. The Secret must be the
  Agent's own (its ownerReference or its label ``openledger.io/agent: <name>``):
  naming another Agent's Secret gets ``CredentialsIssued=False``/``SecretNotOwned``
  and a Warning Event, and that Secret is neither read for a key nor written.
- Spend: the gateway enforces budgets against ``AgentKeys.spend`` (period id and
  base units spent) and answers a budgeted Agent 503 while that record is absent.
  Whenever it is absent (a new Agent, an emptied or failed-over Redis, eviction)
  ``rebuild_spend`` writes it: the ledger's spend in the current period plus the
  usage events in the stream that the ledger has not ingested yet (deduplicated by
  event id). Race-free: it reads ``AgentKeys.spend_gen`` first (the gateway bumps it
  for every request settled while the record is absent), scans, queries, and writes
  with one Lua call only if the record is still absent and the counter unchanged;
  otherwise it scans again. PostgreSQL unreachable: the record stays absent (503s,
  never an unbounded budget), the status says ``SpendRestoring``, the next tick retries.
  An event belongs to the period of its ``finished_at_ms`` (as in the ledger's
  ``agent_spend_hourly``); the gateway counts it in the period of its settle, a few
  milliseconds later, so an event finishing within that time of a period boundary
  may count in the neighbouring period after a rebuild.
- ``delete_agent`` (finalizer) deletes the key's hash first (the gateway's
  admission script checks it on every request, so access ends at once), then
  the Agent's Redis records and its own Secret (never one it does not own).
  Reservations of requests in flight (and the spend record they settle into) are
  left to expire after the gateway's in-flight lifetime, so those requests still
  settle and are metered.
  Deleting what is gone is a no-op.
- ``secret_deleted``: deleting the Secret rotates the key: a new key, a new
  Secret, and the old hash removed in the same Lua call.
- ``agent_usage`` (timer, every ``STATUS_INTERVAL_S``): queue depth, in-flight,
  spend and rate-limited count from Redis into the status; also the repair loop
  that writes back the records and rebuilds the spend after Redis lost them.

The key itself is never logged, put in status, Events or metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import kopf
import psycopg
import redis.asyncio as aioredis
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from openledger.controllers import kube
from openledger.controllers.agent_builder import (
    AGENT_LABEL,
    API_KEY_FIELD,
    AgentSpecError,
    StreamUsage,
    Usage,
    agent_config,
    agent_status,
    api_key_from_secret,
    credentials_secret,
    failed_status,
    new_api_key,
    period_window_ms,
    rebuilt_spend,
    same_config,
    secret_name,
    secret_not_owned_status,
    secret_owned_by,
    spend_of,
    stream_usage,
)
from openledger.controllers.api import GROUP, VERSION
from openledger.controllers.conditions import find_condition
from openledger.controllers.metrics import reconcile_pass
from openledger.gateway.lifetimes import inflight_ttl_s
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
from openledger.settlement.ledger.spend import LedgerSpend, read_ledger_spend

log = logging.getLogger(__name__)

PLURAL = "agents"
STATUS_INTERVAL_S = 2.0
NOT_OWNED_RETRY_S = 60  # an Agent naming a Secret it does not own checks again this often

# Replace the config, map the new key hash, drop the old one, ensure the queue
# and its consumer group — atomically. A new budget period kind (Day -> Hour) drops
# the spend record: its period id would not compare with the gateway's; the
# operator rebuilds it for the new period. No money passes through this script.
# KEYS: config, new apikey, old apikey (or the new one again), queue, spend, spend_gen,
# inflight, reserved.
# ARGV: ref, expected old hash ("" = none), budget period, field, value…
_APPLY = """
local current = redis.call('HGET', KEYS[1], 'key_hash') or ''
if current ~= ARGV[2] then return -1 end
local old_period = redis.call('HGET', KEYS[1], 'period')
if old_period and old_period ~= ARGV[3] then redis.call('DEL', KEYS[5]) end
-- A revoked Agent created again: its expiring records (spend, its counter, in-flight slots and
-- reservations, which revoke left to expire) are live again.
for i = 5, 8 do redis.call('PERSIST', KEYS[i]) end
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') + 1
redis.call('DEL', KEYS[1])
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'version', tostring(version), unpack(fields))
redis.call('SET', KEYS[2], ARGV[1])
if KEYS[3] ~= KEYS[2] then redis.call('DEL', KEYS[3]) end
redis.pcall('XGROUP', 'CREATE', KEYS[4], '@GROUP@', '$', 'MKSTREAM')
return version
""".replace("@GROUP@", QUEUE_GROUP)

# Create the spend record from a rebuild, only if it is still absent, no request settled
# since the rebuild began (the counter the gateway bumps is unchanged) and the config
# still has the period kind the rebuild summed. The amount stays a string.
# KEYS: spend, spend_gen, config. ARGV: counter seen at the start ("" = none),
# period kind, period id, spent (decimal base units).
# Returns 1 written, 0 already there, -1 usage settled meanwhile, -2 config changed or gone.
_SPEND_INIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[3], 'period') ~= ARGV[2] then return -2 end
redis.call('HSET', KEYS[1], 'period', ARGV[3], 'spent', ARGV[4])
return 1
"""

# Stream ids are Redis's clock at XADD and an event's period is the gateway's clock at its
# finish: the scan starts this much before the period to absorb skew between the two.
STREAM_CLOCK_SKEW_MS = 300_000
STREAM_PAGE = 1000
# Attempts per rebuild, then the next status tick tries again. An Agent without a budget is
# admitted meanwhile, so under load its usage may settle during every attempt: one attempt
# a tick bounds what it costs PostgreSQL (its record only feeds the status).
REBUILD_ATTEMPTS = 5
REBUILD_ATTEMPTS_UNBUDGETED = 1
DATABASE_RETRY_S = 2.0  # after PostgreSQL failed a rebuild, others wait this long before trying

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
    argv: list[str] = [config.ref, old_hash, config.budget_period]
    for k, v in fields.items():
        argv += [k, v]
    old_key = apikey_key(old_hash) if old_hash else apikey_key(config.key_hash)
    version = await _redis().eval(
        _APPLY,
        8,
        keys.config,
        apikey_key(config.key_hash),
        old_key,
        keys.queue,
        keys.spend,
        keys.spend_gen,
        *keys.in_flight_keys(),
        *argv,
    )
    if int(version) < 0:
        raise kopf.TemporaryError("agent config changed concurrently; retrying", delay=1)
    return int(version)


def revoked_in_flight_ttl_ms() -> int:
    """How long a revoked Agent's in-flight slots and reservations live on: as long as the
    gateway lets an admitted request live (``gateway.lifetimes``), so every request admitted
    before the revocation still settles and is metered, and nothing lingers after."""
    s = get_settings()
    ttl_s = inflight_ttl_s(
        s.gateway_upstream_timeout_s, s.gateway_redis_timeout_s, s.gateway_durability_timeout_ms / 1000
    )
    return math.ceil(ttl_s * 1000)


async def revoke(ref: str) -> None:
    """End access (the key hash first), remove the Agent's records, let in-flight requests settle.

    The in-flight slots and reservations, the spend record and its counter expire after
    ``revoked_in_flight_ttl_ms()`` instead of going now: a request admitted before the
    revocation still finds its reservation and settles into the spend. (An Agent created
    again under the same name makes its spend record permanent again: ``_APPLY``.)
    """
    ttl_ms = revoked_in_flight_ttl_ms()
    r = _redis()
    keys = AgentKeys(ref)
    key_hash = await r.hget(keys.config, "key_hash")
    async with r.pipeline(transaction=True) as pipe:
        if key_hash:
            pipe.delete(apikey_key(_text(key_hash)))
        pipe.delete(*keys.all_static())
        for key in (*keys.in_flight_keys(), keys.spend, keys.spend_gen):
            pipe.pexpire(key, ttl_ms)
        await pipe.execute()


async def read_usage(config: AgentConfig) -> Usage:
    keys = AgentKeys(config.ref)
    now = time.time()
    async with _redis().pipeline(transaction=False) as pipe:
        pipe.xlen(keys.queue)
        pipe.zcard(keys.inflight)
        pipe.hgetall(keys.spend)
        pipe.hget(keys.reserved, "_total")
        pipe.hget(keys.stats, "rate_limited")
        depth, in_flight, spend, reserved, limited = await pipe.execute()
    start, _ = period_bounds_s(config.budget_period, now)
    return Usage(
        queue_depth=int(depth or 0),
        in_flight=int(in_flight or 0),
        spent_base_units=spend_of({_text(k): _text(v) for k, v in spend.items()}, period_id(config.budget_period, now)),
        reserved_base_units=int(reserved or 0),
        rate_limited=int(limited or 0),
        period_start=datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


class _StreamScan:
    """An Agent's usage events in the stream from just before its budget period; resumable.

    A retry of the rebuild reads only the entries added since the last page.
    """

    def __init__(self, ref: str, stream: str, window_ms: tuple[int, int]) -> None:
        self.ref = ref
        self.stream = stream
        self.events: list[StreamUsage] = []
        self.unreadable = 0
        self._next = f"{max(0, window_ms[0] - STREAM_CLOCK_SKEW_MS)}-0"

    async def advance(self, r: aioredis.Redis) -> None:
        while True:
            page: list[tuple[bytes, dict[bytes, bytes]]] = cast(
                Any, await r.xrange(self.stream, min=self._next, max="+", count=STREAM_PAGE)
            )
            for _, fields in page:
                try:
                    event = stream_usage(self.ref, fields)
                except (ValueError, UnicodeDecodeError):
                    self.unreadable += 1  # the ledger dead-letters it: never charged
                    continue
                if event is not None and event.cost_base_units:
                    self.events.append(event)
            if page:
                self._next = "(" + _text(page[-1][0])
            if len(page) < STREAM_PAGE:
                return


_database_retry_at = 0.0  # monotonic time before which no rebuild asks PostgreSQL again


async def rebuild_spend(config: AgentConfig) -> str:
    """Make sure the Agent's spend record exists; ``""`` when it does, else what holds it up.

    Idempotent and safe beside the gateway and other rebuilds (see the module docstring).
    """
    r = _redis()
    keys = AgentKeys(config.ref)
    settings = get_settings()
    now_s = time.time()
    window = period_window_ms(config.budget_period, now_s)
    scan = _StreamScan(config.ref, settings.usage_stream, window)
    for _ in range(REBUILD_ATTEMPTS if config.budget_base_units is not None else REBUILD_ATTEMPTS_UNBUDGETED):
        generation = await r.get(keys.spend_gen)
        if await r.exists(keys.spend):
            return ""
        await scan.advance(r)
        ledger = await _ledger_spend(settings.database_url, config.ref, window, scan)
        if ledger is None:
            return "PostgreSQL unavailable; retrying"
        spent = rebuilt_spend(ledger.spent_base_units, scan.events, ledger.ingested, window)
        period = period_id(config.budget_period, now_s)
        argv = [_text(generation) if generation is not None else "", config.budget_period, period, str(spent)]
        written = int(await r.eval(_SPEND_INIT, 3, keys.spend, keys.spend_gen, keys.config, *argv))
        if written == 1:
            log.info(
                "agent spend rebuilt",
                extra={
                    "action": "rebuild_spend",
                    "agent": config.ref,
                    "period": period,
                    "spent": str(spent),
                    "from_stream": str(spent - ledger.spent_base_units),
                    "unreadable_entries": scan.unreadable,
                },
            )
        if written >= 0:
            return ""
        if written == -2:
            return "the Agent's config changed during the rebuild; retrying"
    return "usage kept settling during the rebuild; retrying"


async def _ledger_spend(
    database_url: str, ref: str, window_ms: tuple[int, int], scan: _StreamScan
) -> LedgerSpend | None:
    """The ledger's answer for the rebuild, or ``None`` when PostgreSQL cannot give it (logged)."""
    global _database_retry_at
    if time.monotonic() < _database_retry_at:
        return None
    ids = sorted({e.event_id for e in scan.events})
    try:
        return await asyncio.to_thread(read_ledger_spend, database_url, ref, window_ms, ids)
    except psycopg.Error as exc:
        _database_retry_at = time.monotonic() + DATABASE_RETRY_S
        log.warning(
            "agent spend not rebuilt: PostgreSQL unavailable",
            extra={"action": "rebuild_spend", "agent": ref, "error": str(exc)[:200]},
        )
        return None


# ------------------------------------------------------------- Kubernetes edge


async def _read_secret(namespace: str, name: str) -> dict[str, Any] | None:
    api = await _api()
    try:
        secret = await client.CoreV1Api(api).read_namespaced_secret(name, namespace, _request_timeout=10)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return dict(api.sanitize_for_serialization(secret))  # (a new ApiClient here would leak its session)


async def _ensure_key(agent: Mapping[str, Any]) -> tuple[str, bool]:
    """The hash of the key in the Agent's Secret, issuing a new key (and Secret) when there is none.

    Returns (key hash, issued now). Raises ``_NotOwned`` when the Secret exists and is not
    the Agent's: its key is not read, the Secret not written. The key never leaves this
    function except into the Secret.
    """
    meta = agent["metadata"]
    namespace, name = meta["namespace"], secret_name(meta["name"], agent.get("spec") or {})
    secret = await _read_secret(namespace, name)
    if secret is None:
        key = new_api_key()
        try:
            await client.CoreV1Api(await _api()).create_namespaced_secret(
                namespace,
                credentials_secret(agent, key),  # type: ignore[arg-type]
                _request_timeout=10,
            )
            return hash_api_key(key), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        # Created meanwhile (an earlier run of this handler, or someone else): judge that one.
        secret = await _read_secret(namespace, name)
        if secret is None:
            raise kopf.TemporaryError(f"Secret {name} came and went; retrying", delay=2)
    if not secret_owned_by(secret, agent):
        raise _NotOwned(name)
    existing = api_key_from_secret(secret)
    if existing is not None:
        return hash_api_key(existing), False
    # The Agent's own Secret without a key (made for it in advance): put one in, unless
    # it changed since we read it (the precondition), so a key there is never replaced.
    key = new_api_key()
    body = {
        "metadata": {"resourceVersion": secret["metadata"]["resourceVersion"]},
        "data": {API_KEY_FIELD: credentials_secret(agent, key)["data"][API_KEY_FIELD]},
    }
    try:
        core: Any = client.CoreV1Api(await _api())  # the generated signature lacks _content_type
        await core.patch_namespaced_secret(name, namespace, body, _content_type=kube.MERGE_PATCH, _request_timeout=10)
    except ApiException as exc:
        if exc.status in (404, 409):
            raise kopf.TemporaryError(f"Secret {name} changed while a key was put in; retrying", delay=1) from None
        raise
    return hash_api_key(key), True


async def _ensure_spend(config: AgentConfig) -> tuple[Usage, str]:
    """The Agent's usage, with its spend record rebuilt first when Redis has none."""
    usage = await read_usage(config)
    if usage.spent_base_units is not None:
        return usage, ""
    problem = await rebuild_spend(config)
    return (usage, problem) if problem else (await read_usage(config), "")


async def apply_agent(agent: Mapping[str, Any], *, rotated: bool = False) -> dict[str, Any]:
    """Reconcile one Agent; returns the status to patch."""
    meta = agent["metadata"]
    spec = agent.get("spec") or {}
    ref = f"{meta['namespace']}/{meta['name']}"
    generation = meta.get("generation")
    previous_status = agent.get("status") or {}
    secret = secret_name(meta["name"], spec)
    try:
        agent_config(ref, spec, "")  # validate before touching anything
    except AgentSpecError as exc:
        raise _Invalid(failed_status(previous_status, generation, str(exc))) from None
    try:
        previous = await read_config(ref)
        try:
            key_hash, issued = await _ensure_key(agent)
        except _NotOwned:
            raise _Invalid(secret_not_owned_status(previous_status, generation, secret), "SecretNotOwned") from None
        config = agent_config(ref, spec, key_hash, previous.version if previous else 0)
        version = await write_config(config, previous)
        config = agent_config(ref, spec, key_hash, version)
        usage, spend_problem = await _ensure_spend(config)
    except aioredis.RedisError as exc:
        raise kopf.TemporaryError(f"Redis unavailable: {exc}", delay=2) from None
    if issued:
        await kube.emit_event(
            await _api(),
            agent,
            "KeyRotated" if rotated else "KeyIssued",
            f"API key delivered in Secret {secret}",
        )
    log.info("agent applied", extra={"action": "apply", "agent": ref, "version": version, "key_issued": issued})
    return agent_status(
        config, usage, previous_status, generation, secret, rotated and issued, spend_problem=spend_problem
    )


class _NotOwned(Exception):
    def __init__(self, secret: str) -> None:
        super().__init__(f"Secret {secret} is not this Agent's")


class _Invalid(Exception):
    """The Agent cannot be applied as it stands; ``status`` says why (``reason`` for the Event)."""

    def __init__(self, status: dict[str, Any], reason: str = "InvalidSpec") -> None:
        super().__init__(status["conditions"][-1]["message"])
        self.status = status
        self.reason = reason


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
            if exc.reason != "SecretNotOwned":
                await kube.emit_event(await _api(), dict(body), exc.reason, str(exc), type_="Warning")
                raise kopf.PermanentError(str(exc)) from None
            # Labelling the Secret for this Agent resolves it: check again now and then,
            # with one Warning when it starts (not one per check).
            before = find_condition((body.get("status") or {}).get("conditions"), "CredentialsIssued") or {}
            if before.get("reason") != exc.reason:
                await kube.emit_event(await _api(), dict(body), exc.reason, str(exc), type_="Warning")
            raise kopf.TemporaryError(str(exc), delay=NOT_OWNED_RETRY_S) from None
        patch.status.update(status)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_agent(
    name: str, namespace: str | None, spec: kopf.Spec, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    _adopt(memo)
    assert namespace is not None, "Agents are namespaced"
    ref = f"{namespace}/{name}"
    _rate_limited.pop(ref, None)
    try:
        await revoke(ref)
    except aioredis.RedisError as exc:
        raise kopf.TemporaryError(f"Redis unavailable: {exc}", delay=1) from None
    await _delete_own_secret(dict(body), secret_name(name, dict(spec)))
    log.info("agent revoked", extra={"action": "revoke", "agent": ref})


async def _delete_own_secret(agent: Mapping[str, Any], name: str) -> None:
    """Delete the Agent's Secret, only if it is the Agent's (never a Secret it merely names)."""
    namespace = agent["metadata"]["namespace"]
    secret = await _read_secret(namespace, name)
    if secret is None or not secret_owned_by(secret, agent):
        return
    try:
        await client.CoreV1Api(await _api()).delete_namespaced_secret(
            name,
            namespace,
            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=secret["metadata"]["uid"])),
            _request_timeout=10,
        )
    except ApiException as exc:
        if exc.status == 403:
            # Not allowed to delete Secrets here: its ownerReference lets the garbage collector do it.
            log.warning(
                "credentials Secret left to the garbage collector",
                extra={"action": "revoke", "agent": f"{namespace}/{agent['metadata']['name']}"},
            )
        elif exc.status not in (404, 409):  # 409: replaced meanwhile by a Secret that is judged anew
            raise


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
    so they are written again from the spec and the Secret's key (``apply_agent`` is idempotent),
    and a lost spend record is rebuilt from the ledger and the stream (``rebuild_spend``).
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
        usage, spend_problem = await _ensure_spend(config)
    except _Invalid as exc:
        patch.status.update(exc.status)
        return
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
        spend_problem=spend_problem,
    )
    changed = {k: v for k, v in new.items() if k != "conditions" and status.get(k) != v}
    if changed or last != usage.rate_limited:
        patch.status.update(changed)
        patch.status["conditions"] = new["conditions"]

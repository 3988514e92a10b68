"""``openledger doctor``'s I/O: read the facts, hand them to ``decisions``.

Every probe takes the ``Context`` and returns its checks; it may raise
``NotConfigured`` (the dependency has no setting: a warning, not a crash) or
any error (the runner turns it into a failed check). Every call out has its own
timeout of ``ctx.timeout_s``; the runner also bounds each probe as a whole.

Secrets: the RPC URLs read from the pools' Secrets and the passwords in
``DATABASE_URL`` / ``REDIS_URL`` are added to ``ctx.secrets``, which the runner
removes from every line it prints; details name endpoints as
``scheme://host:port`` only. The signer key Secret is never read.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from openledger.doctor import decisions as d
from openledger.settings import Settings

T = TypeVar("T")

__all__ = ["PROBES", "VERIFY_PROBE", "Context", "NotConfigured", "Probe"]


class NotConfigured(Exception):
    """The dependency of a check has no setting; the message says which."""


@dataclass
class Context:
    settings: Settings
    timeout_s: float = 5.0
    verify_timeout_s: float = 30.0
    full_verify: bool = False
    secrets: set[str] = field(default_factory=set)
    # chain id -> an RPC URL that answered for it (the chain part of `ledger verify` uses them)
    chains: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for url in (self.settings.database_url, self.settings.redis_url):
            self.add_secret_url(url, path_is_secret=False)

    def add_secret_url(self, url: str, *, path_is_secret: bool = True) -> None:
        """Remember a URL's password; for RPC URLs also the URL, its path and query (API keys live there)."""
        parsed = urlparse(url)
        parts = [parsed.password or ""]
        if path_is_secret:
            parts += [url, parsed.path + (f"?{parsed.query}" if parsed.query else "")]
        with self.lock:
            self.secrets.update(p for p in parts if p and (p == parsed.password or len(p) >= 8))

    def configured(self, field_name: str) -> bool:
        return field_name in self.settings.model_fields_set


@dataclass(frozen=True)
class Probe:
    name: str  # the check's name when the probe itself fails
    run: Callable[[Context], list[d.Check]]
    hint: str  # what to do when it fails or hangs


# ------------------------------------------------------------------ Kubernetes


def _kube(ctx: Context, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(api_client)`` on a fresh client, bounded by the timeout."""
    s = ctx.settings
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if not (s.kubeconfig or in_cluster or Path("~/.kube/config").expanduser().is_file()):
        raise NotConfigured("KUBECONFIG is not set, not in a pod, no ~/.kube/config")

    async def call() -> T:
        from openledger.controllers.kube import new_api_client

        async with await new_api_client(s) as api:
            return await asyncio.wait_for(fn(api), ctx.timeout_s)

    return asyncio.run(call())


def _missing(exc: BaseException) -> bool:
    return getattr(exc, "status", None) == 404


def api_server(ctx: Context) -> list[d.Check]:
    async def read(api: Any) -> tuple[str, str]:
        from kubernetes_asyncio import client

        info = await client.VersionApi(api).get_code(_request_timeout=ctx.timeout_s)
        return str(info.git_version), str(api.configuration.host)

    version, host = _kube(ctx, read)
    return [d.Check("api server", d.Status.OK, f"{version} at {d.redact_url(host)}")]


def _crd_state(doc: dict[str, Any]) -> d.CrdState:
    versions = doc.get("spec", {}).get("versions", [])
    conditions = doc.get("status", {}).get("conditions") or []
    return d.CrdState(
        versions=tuple((str(v["name"]), bool(v.get("served")), bool(v.get("storage"))) for v in versions),
        stored_versions=tuple(doc.get("status", {}).get("storedVersions") or ()),
        established=any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions),
        schemas=tuple((str(v["name"]), v.get("schema")) for v in versions),
    )


def crds(ctx: Context) -> list[d.Check]:
    from openledger.controllers.api import KINDS, crd

    async def read(api: Any) -> list[dict[str, Any] | None]:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        objects = client.CustomObjectsApi(api)
        found: list[dict[str, Any] | None] = []
        for kind in KINDS:
            try:
                found.append(
                    await objects.get_cluster_custom_object(
                        "apiextensions.k8s.io",
                        "v1",
                        "customresourcedefinitions",
                        kind.crd_name,
                        _request_timeout=ctx.timeout_s,
                    )
                )
            except ApiException as exc:
                if not _missing(exc):
                    raise
                found.append(None)
        return found

    served = _kube(ctx, read)
    checks = []
    for kind, doc in zip(KINDS, served, strict=True):
        expected = _crd_state(crd(kind))
        wanted = d.CrdState(
            expected.versions, tuple(n for n, _, storage in expected.versions if storage), True, expected.schemas
        )
        checks.append(d.decide_crd(kind.crd_name, wanted, None if doc is None else _crd_state(doc)))
    return checks


def leader(ctx: Context) -> list[d.Check]:
    s = ctx.settings
    if not s.leader_election:
        raise NotConfigured("leader election is off (OPENLEDGER_LEADER_ELECTION=false)")

    async def read(api: Any) -> dict[str, Any] | None:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            lease: dict[str, Any] = await client.CustomObjectsApi(api).get_namespaced_custom_object(
                "coordination.k8s.io",
                "v1",
                s.operator_namespace,
                "leases",
                s.leader_lease_name,
                _request_timeout=ctx.timeout_s,
            )
        except ApiException as exc:
            if _missing(exc):
                return None
            raise
        return lease

    lease = _kube(ctx, read)
    where = f"{s.operator_namespace}/{s.leader_lease_name}"
    return [d.decide_leader(where, lease, dt.datetime.now(dt.UTC), s.leader_lease_duration_s)]


@dataclass(frozen=True)
class _PoolEndpoint:
    pool: str
    chain_id: int
    rpc_url: str | None
    problem: str = ""


def chains(ctx: Context) -> list[d.Check]:
    """Each RewardPool's RPC endpoint (from its Secret) answers eth_chainId = spec.chain.chainId."""
    endpoints = _kube(ctx, lambda api: _pool_endpoints(ctx, api))
    if not endpoints:
        return [d.Check("chain", d.Status.OK, "no RewardPool in the watched namespaces")]
    with ThreadPoolExecutor(max_workers=min(8, len(endpoints)), thread_name_prefix="doctor-chain") as pool:
        return list(pool.map(lambda e: _chain_check(ctx, e), endpoints))


async def _pool_endpoints(ctx: Context, api: Any) -> list[_PoolEndpoint]:
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    from openledger.controllers.api import GROUP, VERSION
    from openledger.controllers.rewardpool_builder import secret_refs

    listed = await client.CustomObjectsApi(api).list_cluster_custom_object(
        GROUP, VERSION, "rewardpools", _request_timeout=ctx.timeout_s
    )
    core = client.CoreV1Api(api)
    found = []
    for obj in listed.get("items", []):
        meta, spec = obj.get("metadata", {}), obj.get("spec", {})
        if ctx.settings.namespaces and not any(fnmatch(meta.get("namespace", ""), g) for g in ctx.settings.namespaces):
            continue  # the operator does not watch it (OPENLEDGER_NAMESPACES)
        pool = f"{meta.get('namespace')}/{meta.get('name')}"
        chain_id = int((spec.get("chain") or {}).get("chainId") or 0)
        secret, key = secret_refs(spec)["rpcUrl"]
        try:
            value = (await core.read_namespaced_secret(secret, meta["namespace"], _request_timeout=ctx.timeout_s)).data
        except ApiException as exc:
            if not _missing(exc):
                raise
            found.append(_PoolEndpoint(pool, chain_id, None, f"rpcUrlSecretRef: Secret {secret} not found"))
            continue
        if not value or key not in value:
            found.append(_PoolEndpoint(pool, chain_id, None, f"rpcUrlSecretRef: Secret {secret} has no key {key!r}"))
            continue
        try:
            url = base64.b64decode(value[key]).decode().strip()
        except ValueError:  # not base64 / not UTF-8: name the key, never show the value
            found.append(
                _PoolEndpoint(pool, chain_id, None, f"rpcUrlSecretRef: Secret {secret} key {key!r} is not text")
            )
            continue
        ctx.add_secret_url(url)
        found.append(_PoolEndpoint(pool, chain_id, url))
    return found


def _chain_check(ctx: Context, endpoint: _PoolEndpoint) -> d.Check:
    from openledger.settlement.chain.rpc import Chain, make_web3

    name = f"chain {endpoint.pool}"
    if endpoint.rpc_url is None:
        return d.Check(name, d.Status.FAIL, endpoint.problem, "create the Secret the RewardPool names")
    where = d.redact_url(endpoint.rpc_url)
    try:
        observed = Chain(make_web3(endpoint.rpc_url, timeout_s=ctx.timeout_s)).chain_id()
    except Exception as exc:  # noqa: BLE001 - any failure to answer is this pool's failed check
        detail = f"{where} does not answer: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return d.Check(name, d.Status.FAIL, detail, "check the chain node and the rpcUrl Secret")
    check = d.decide_chain(endpoint.pool, where, endpoint.chain_id, observed)
    if check.status is d.Status.OK:
        with ctx.lock:
            ctx.chains.setdefault(observed, endpoint.rpc_url)
    return check


# ------------------------------------------------------------------ Redis


def _redis(ctx: Context) -> Any:
    if not ctx.configured("redis_url"):
        raise NotConfigured("REDIS_URL is not set")
    from openledger.settlement.ledger.redisraw import RawRedis

    return RawRedis(ctx.settings.redis_url, timeout_s=ctx.timeout_s)


def _info(raw: object) -> dict[str, str]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def redis(ctx: Context) -> list[d.Check]:
    from openledger.settlement.ledger.redisraw import RedisReplyError

    client = _redis(ctx)
    try:
        client.execute("PING")
        info: dict[str, str] = {}
        for section in ("server", "persistence", "memory", "replication"):
            info |= _info(client.execute("INFO", section))
        try:
            reply = client.execute("CONFIG", "GET", "appendfsync")
            appendfsync: str | None = reply[1].decode() if len(reply) == 2 else None
        except RedisReplyError:  # managed Redis / ACL users may not run CONFIG
            appendfsync = None
    finally:
        client.close()
    facts = d.RedisFacts(
        where=client.target.describe(),
        version=info.get("redis_version", "?"),
        aof_enabled=info.get("aof_enabled") == "1",
        appendfsync=appendfsync,
        maxmemory_policy=info.get("maxmemory_policy", "noeviction"),
        connected_replicas=int(info.get("connected_slaves", "0") or 0),
    )
    return [d.decide_redis(facts, ctx.settings.gateway_durability)]


def _stream_ms(stream_id: bytes) -> int:
    return int(stream_id.split(b"-", 1)[0])


def ingest(ctx: Context) -> list[d.Check]:
    from openledger.settlement.ledger.redisraw import RedisReplyError

    s = ctx.settings
    client = _redis(ctx)
    try:
        seconds, micros = client.execute("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        try:
            groups = [
                dict(zip(g[0::2], g[1::2], strict=False)) for g in client.execute("XINFO", "GROUPS", s.usage_stream)
            ]
        except RedisReplyError:  # no such key
            return [d.decide_ingest(d.IngestFacts(s.usage_stream, s.usage_consumer_group, False, False))]
        group = next((g for g in groups if g.get(b"name") == s.usage_consumer_group.encode()), None)
        if group is None:
            return [d.decide_ingest(d.IngestFacts(s.usage_stream, s.usage_consumer_group, True, False))]
        length = int(client.execute("XLEN", s.usage_stream))
        after = group[b"last-delivered-id"]
        first_undelivered = client.execute("XRANGE", s.usage_stream, b"(" + after, "+", "COUNT", 1)
        summary = client.execute("XPENDING", s.usage_stream, s.usage_consumer_group)
    finally:
        client.close()
    lag = group.get(b"lag")
    pending = int(summary[0])
    facts = d.IngestFacts(
        stream=s.usage_stream,
        group=s.usage_consumer_group,
        stream_exists=True,
        group_exists=True,
        length=length,
        lag=None if lag is None else int(lag),
        pending=pending,
        consumers=int(group.get(b"consumers", 0)),
        oldest_undelivered_age_s=(now_ms - _stream_ms(first_undelivered[0][0])) / 1000 if first_undelivered else None,
        oldest_pending_age_s=(now_ms - _stream_ms(summary[1])) / 1000 if pending else None,
    )
    return [d.decide_ingest(facts)]


# ------------------------------------------------------------------ PostgreSQL


def _database(ctx: Context, statement_timeout_s: float | None = None) -> Any:
    if not ctx.configured("database_url"):
        raise NotConfigured("DATABASE_URL is not set")
    import psycopg

    from openledger.settlement.ledger.db import libpq_url

    timeout_ms = int((statement_timeout_s or ctx.timeout_s) * 1000)
    return psycopg.connect(
        libpq_url(ctx.settings.database_url),
        connect_timeout=max(1, int(ctx.timeout_s)),
        options=f"-c statement_timeout={timeout_ms}",
        autocommit=True,
    )


def _database_where(url: str) -> str:
    parsed = urlparse(url.replace("postgresql+psycopg://", "postgresql://"))
    return f"{parsed.hostname or 'localhost'}:{parsed.port or 5432}{parsed.path or ''}"


def schema(ctx: Context) -> list[d.Check]:
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic.script import ScriptDirectory

    from openledger.deploy import schema_verdict
    from openledger.settlement.ledger import db

    script = ScriptDirectory.from_config(db.alembic_config(ctx.settings.database_url))
    known = {revision.revision for revision in script.walk_revisions()}
    heads = set(script.get_heads())
    with _database(ctx) as conn:
        row = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
        rows = conn.execute("SELECT version_num FROM alembic_version").fetchall() if row and row[0] else []
    current = {str(r[0]) for r in rows}
    where = _database_where(ctx.settings.database_url)
    return [d.decide_schema(where, schema_verdict(current, heads, known), current, heads)]


def dead_letters(ctx: Context) -> list[d.Check]:
    s = ctx.settings
    if not (ctx.configured("redis_url") or ctx.configured("database_url")):
        raise NotConfigured("neither REDIS_URL nor DATABASE_URL is set")
    dead: int | None = None
    quarantined: int | None = None
    try:
        client = _redis(ctx)
        try:
            dead = int(client.execute("XLEN", s.usage_dead_letter_stream))
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - unreadable is reported as unknown; the redis check says why
        dead = None
    try:
        with _database(ctx) as conn:
            row = conn.execute("SELECT count(*) FROM usage_quarantine").fetchone()
            quarantined = int(row[0]) if row else 0
    except Exception:  # noqa: BLE001 - unreadable is reported as unknown; the schema check says why
        quarantined = None
    return [d.decide_dead_letters(s.usage_dead_letter_stream, dead, quarantined)]


_SETTLEMENT_SQL = """
SELECT p.pool,
       count(e.epoch) FILTER (WHERE e.status IN ('closed', 'publishing')),
       min(e.epoch) FILTER (WHERE e.status IN ('closed', 'publishing')),
       max(e.epoch) FILTER (WHERE e.status = 'settled')
FROM (SELECT pool FROM settlement_pools UNION SELECT pool FROM epochs) p
LEFT JOIN epochs e ON e.pool = p.pool
GROUP BY p.pool ORDER BY p.pool
"""


def settlement(ctx: Context) -> list[d.Check]:
    with _database(ctx) as conn:
        rows = conn.execute(_SETTLEMENT_SQL).fetchall()
    if not rows:
        return [d.Check("settlement", d.Status.OK, "no pool has settled or closed an epoch yet")]
    return [
        d.decide_settlement(
            d.PoolLag(str(pool), int(lag), None if oldest is None else int(oldest), None if last is None else int(last))
        )
        for pool, lag, oldest, last in rows
    ]


def verify(ctx: Context) -> list[d.Check]:
    """``ledger verify`` (quick unless ``full_verify``), plus its chain part for each chain that answered."""
    from openledger.settlement.ledger.verify import VerifyReport, verify_chain
    from openledger.settlement.ledger.verify import verify as run_verify

    s = ctx.settings
    with _database(ctx, statement_timeout_s=ctx.verify_timeout_s) as conn:
        report: VerifyReport = run_verify(
            conn,
            full=ctx.full_verify,
            redis_url=s.redis_url if ctx.full_verify and ctx.configured("redis_url") else None,
            stream=s.usage_stream,
            group=s.usage_consumer_group,
            dead_letter_stream=s.usage_dead_letter_stream,
        )
        with ctx.lock:
            urls = dict(ctx.chains)
        for url in urls.values():
            with conn.transaction():
                verify_chain(conn, report, url)
    summary = d.VerifySummary(
        drifts=[(x.check, x.where, x.detail) for x in report.drifts],
        stats=report.stats,
        chain_urls_checked=len(urls),
        chain_skipped="" if urls else "no pool's chain answered",
    )
    return [d.decide_verify(summary)]


_KUBE_HINT = "check KUBECONFIG / the pod's service account and that the API server answers"
_REDIS_HINT = 'check REDIS_URL and that Redis answers (redis-cli -u "$REDIS_URL" ping)'
_DB_HINT = "check DATABASE_URL and that PostgreSQL answers (psql \"$DATABASE_URL\" -c 'select 1')"

PROBES: tuple[Probe, ...] = (
    Probe("api server", api_server, _KUBE_HINT),
    Probe("crds", crds, _KUBE_HINT),
    Probe("operator leader", leader, _KUBE_HINT),
    Probe("redis", redis, _REDIS_HINT),
    Probe("postgresql schema", schema, _DB_HINT),
    Probe("ingest lag", ingest, _REDIS_HINT),
    Probe("dead letters", dead_letters, _REDIS_HINT),
    Probe("settlement", settlement, _DB_HINT),
    Probe("chain", chains, _KUBE_HINT + "; and the pools' chain nodes"),
)
# Runs after PROBES: its chain part uses the chains that answered.
VERIFY_PROBE = Probe("ledger verify", verify, _DB_HINT)

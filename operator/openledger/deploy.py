"""Commands the Helm chart runs in its pods (image: ``Containerfile``; chart: ``charts/openledger``).

- ``openledger crds apply``: server-side apply of this version's CRDs (the pre-upgrade hook;
  ``helm upgrade`` never updates a chart's ``crds/``), then a replace of whatever another
  field manager still holds, then a wait until they are Established.
- ``openledger db wait``: the init container of every pod that reads PostgreSQL; no process
  starts against an older schema (the migration hook runs ``openledger db upgrade``).
- ``openledger claims-server``: the claims pods (proofs from PostgreSQL, in every replica).
- ``openledger check gateway|leader|database|redis``: the ``helm test`` pods.
"""

from __future__ import annotations

import time
from typing import Any

import click

from openledger.settings import get_settings


@click.command("apply")
@click.option("--dry-run", is_flag=True, help="Server-side dry run: validate against the API server, change nothing.")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True, help="Wait for Established.")
def crds_apply(dry_run: bool, timeout_s: float) -> None:
    """Server-side apply this version's CRDs and wait until they are served.

    `helm upgrade` never updates a chart's crds/; the chart runs this as a
    pre-upgrade hook (crds.apply), and it is the manual path with --skip-crds.
    """
    import asyncio

    from openledger.controllers.api import crd_documents

    documents = list(crd_documents().values())
    try:
        names = asyncio.run(_apply_crds(documents, dry_run=dry_run, timeout_s=timeout_s))
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(("validated (dry run): " if dry_run else "applied and established: ") + ", ".join(names))


async def _apply_crds(documents: list[dict[str, Any]], *, dry_run: bool, timeout_s: float) -> list[str]:
    import asyncio

    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    from openledger.controllers.kube import new_api_client

    names = [str(doc["metadata"]["name"]) for doc in documents]
    # Server-side apply: fields this manager set before and no longer sets are removed too.
    options: dict[str, Any] = {"field_manager": "openledger", "force": True}
    options["_content_type"] = "application/apply-patch+yaml"
    if dry_run:
        options["dry_run"] = "All"
    async with await new_api_client() as api_client:
        api = client.ApiextensionsV1Api(api_client)
        for name, doc in zip(names, documents, strict=True):
            try:
                await api.patch_custom_resource_definition(name, doc, **options)
            except ApiException as exc:
                body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body)
                raise RuntimeError(f"CRD {name}: the API server refused it ({exc.status}): {body}") from None
        if dry_run:
            return names
        for name, doc in zip(names, documents, strict=True):
            served = await api.read_custom_resource_definition(name)
            if _schemas(api_client.sanitize_for_serialization(served)) != _schemas(doc):
                # Fields another manager owns (helm's first install) survive an apply: replace them.
                replacement: Any = {
                    **doc,
                    "metadata": {**doc["metadata"], "resourceVersion": served.metadata.resource_version},
                }
                await api.replace_custom_resource_definition(name, replacement, field_manager="openledger")
        deadline = asyncio.get_running_loop().time() + timeout_s
        for name in names:
            while not _established(await api.read_custom_resource_definition(name)):
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"CRD {name} is not Established after {timeout_s:.0f} s")
                await asyncio.sleep(0.5)
    return names


def _schemas(crd: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(v["name"], v.get("schema")) for v in crd["spec"]["versions"]]


def _established(crd: object) -> bool:
    conditions = getattr(getattr(crd, "status", None), "conditions", None) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


@click.command("wait")
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True)
@click.option("--database-url", default=None, help="Default: DATABASE_URL / settings.")
def db_wait(timeout_s: float, database_url: str | None) -> None:
    """Wait until the schema is this version's (migrated by `db upgrade`); exit 1 after the timeout.

    The chart runs it before the operator and the ledger worker start, so no
    process of the product runs against an older schema. A schema newer than
    this version (a later release migrated it) is accepted.
    """
    url = database_url or get_settings().database_url
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            state = _schema_state(url)
        except Exception as exc:  # noqa: BLE001 - any failure to read it is a reason to wait and say why
            state = f"unreadable: {exc}".splitlines()[0]
        if state in ("current", "newer"):
            click.echo(f"database schema is {state}")
            return
        if state != last:
            click.echo(f"waiting for the database schema ({state}); `openledger db upgrade` migrates it", err=True)
            last = state
        if time.monotonic() > deadline:
            raise click.ClickException(f"database schema still {state} after {timeout_s:.0f} s")
        time.sleep(2)


def _schema_state(url: str) -> str:
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin registry logs at import

    from alembic.script import ScriptDirectory

    from openledger.settlement.ledger import db

    script = ScriptDirectory.from_config(db.alembic_config(url))
    known = {revision.revision for revision in script.walk_revisions()}
    with db.connect(url) as conn:
        row = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
        rows = conn.execute("SELECT version_num FROM alembic_version").fetchall() if row and row[0] else []
    return schema_verdict({str(r[0]) for r in rows}, set(script.get_heads()), known)


def schema_verdict(current: set[str], heads: set[str], known: set[str]) -> str:
    """``current``, ``newer`` (a later release migrated it), or why the schema is not ready."""
    if not current:
        return "empty: no migration applied"
    if current - known:
        return "newer"
    if current == heads:
        return "current"
    return f"old: at {', '.join(sorted(current))}, this version needs {', '.join(sorted(heads))}"


@click.command("claims-server")
def claims_server_command() -> None:
    """Serve claim proofs from PostgreSQL on OPENLEDGER_CLAIMS_PORT until SIGTERM (the chart's claims pods)."""
    import signal
    import threading

    from openledger.settlement.claims import ClaimsServer

    settings = get_settings()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = ClaimsServer(settings.database_url, settings.bind_host, settings.claims_port)
    server.start()
    click.echo(f"claims server listening on {settings.bind_host}:{settings.claims_port}")
    stop.wait()
    server.stop()


# ---------------------------------------------------------------- helm test


@click.group("check")
def check_group() -> None:
    """In-cluster checks (`helm test`): exit 0 when the dependency works, 1 saying why not."""


@check_group.command("gateway")
@click.argument("url")
@click.option("--timeout", "timeout_s", type=float, default=5.0, show_default=True, help="Per request.")
def check_gateway(url: str, timeout_s: float) -> None:
    """GET URL/readyz is 200, and an unknown API key gets 401 (the key lookup in Redis works).

    /readyz alone says only that the process serves HTTP; the 401 needs the gateway's
    Redis: without it the gateway answers 503 and this check fails.
    """
    base = url.rstrip("/")
    try:
        ready = _http_status(base + "/readyz", timeout_s)
        lookup = _http_status(base + "/v1/models", timeout_s, {"Authorization": f"Bearer {_UNKNOWN_KEY}"})
    except OSError as exc:
        raise click.ClickException(f"gateway {url}: {exc}") from None
    problem = gateway_problem(ready, lookup)
    if problem:
        raise click.ClickException(f"gateway {url}: {problem}")
    click.echo(f"gateway {url} is ready and looks API keys up in Redis (an unknown key got 401)")


# Well formed (olk_ + 43 URL-safe characters, as the Agent controller mints them), never issued.
_UNKNOWN_KEY = "olk_" + "0" * 43


def gateway_problem(readyz_status: int, unknown_key_status: int) -> str:
    """Why the gateway fails its helm test, or "" when /readyz is 200 and an unknown key gets 401."""
    if readyz_status != 200:
        return f"/readyz answered {readyz_status}, not 200"
    if unknown_key_status == 401:
        return ""
    if unknown_key_status == 503:
        return "an unknown API key got 503: the gateway cannot read its Redis (key lookup)"
    return f"an unknown API key got {unknown_key_status}, not 401"


@check_group.command("redis")
@click.option("--durability", type=click.Choice(["none", "aof", "waitaof", "wait"]), default="aof", show_default=True)
def check_redis(durability: str) -> None:
    """PING as the configured user; the server keeps what the gateway's durability policy needs."""
    from openledger.settlement.ledger.redisraw import RawRedis

    client = RawRedis(get_settings().redis_url, timeout_s=5)
    try:
        client.execute("PING")
        info = _info(client.execute("INFO", "persistence")) | _info(client.execute("INFO", "memory"))
    except (OSError, ConnectionError) as exc:
        raise click.ClickException(f"redis {client.target.describe()}: {exc}") from None
    finally:
        client.close()
    problems = redis_problems(info, durability)
    if problems:
        raise click.ClickException(f"redis {client.target.describe()}: " + "; ".join(problems))
    click.echo(f"redis {client.target.describe()} answers and keeps usage events ({durability})")


def _info(raw: object) -> dict[str, str]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def redis_problems(info: dict[str, str], durability: str) -> list[str]:
    """What the server's INFO says against the chart's prerequisites (README)."""
    problems = []
    if info.get("maxmemory_policy", "noeviction") != "noeviction":
        problems.append(
            f"maxmemory-policy is {info['maxmemory_policy']}: it must be noeviction (evicted keys lose money)"
        )
    if durability in ("aof", "waitaof") and info.get("aof_enabled") != "1":
        problems.append(f"appendonly is off: gateway durability {durability!r} needs appendonly yes")
    return problems


@check_group.command("database")
def check_database() -> None:
    """PostgreSQL answers and its schema is this version's."""
    try:
        state = _schema_state(get_settings().database_url)
    except Exception as exc:  # noqa: BLE001 - the message is the answer
        raise click.ClickException(f"database: {exc}".splitlines()[0]) from None
    if state not in ("current", "newer"):
        raise click.ClickException(f"database schema is {state}")
    click.echo(f"database answers; schema is {state}")


@check_group.command("leader")
@click.option("--lease", required=True, help="The operator's Lease name.")
@click.option("--namespace", required=True)
def check_leader(lease: str, namespace: str) -> None:
    """The operator's Lease has a holder that renewed it within its duration."""
    import asyncio

    holder, age_s, duration_s = asyncio.run(_lease(lease, namespace))
    if not holder:
        raise click.ClickException(f"Lease {namespace}/{lease} has no holder: no operator leads")
    if age_s > duration_s:
        raise click.ClickException(
            f"Lease {namespace}/{lease}: {holder} last renewed {age_s:.0f} s ago (> {duration_s} s)"
        )
    click.echo(f"operator leader {holder} renewed {age_s:.1f} s ago")


async def _lease(name: str, namespace: str) -> tuple[str, float, int]:
    import datetime

    from kubernetes_asyncio import client

    from openledger.controllers.kube import new_api_client

    async with await new_api_client() as api_client:
        lease = await client.CoordinationV1Api(api_client).read_namespaced_lease(name, namespace)
    spec = lease.spec
    renewed = spec.renew_time or spec.acquire_time
    age = (datetime.datetime.now(datetime.UTC) - renewed).total_seconds() if renewed else float("inf")
    return str(spec.holder_identity or ""), age, int(spec.lease_duration_seconds or 15)


def _http_status(url: str, timeout_s: float, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of a GET; an error status is an answer too (OSError only when none came)."""
    import urllib.error

    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)

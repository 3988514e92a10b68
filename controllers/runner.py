"""The operator process (``openledger operator``).

Wiring, in order:

1. structured logs (``openledger.logs``), Prometheus ``/metrics`` on
   ``OPENLEDGER_METRICS_PORT`` and ``/healthz`` + ``/readyz`` on
   ``OPENLEDGER_HEALTH_PORT``;
2. leader election on a ``coordination.k8s.io/v1`` Lease, so with two replicas
   exactly one runs the controllers; the other waits, ready to take over when
   the leader's Lease expires (``OPENLEDGER_LEADER_LEASE_DURATION_S``). A leader
   that cannot renew in time stops acting and exits (its pod restarts as a
   standby): it never keeps acting on a lost Lease;
3. Kopf, in standalone mode (the Lease, not Kopf's peering, decides who acts),
   with the handler modules of ``controllers/registry.py``, watching the
   namespaces of ``OPENLEDGER_NAMESPACES`` (empty: the whole cluster).

Handlers find the shared clients in Kopf's ``memo``: ``memo.kube`` (a
kubernetes_asyncio ``ApiClient``) and ``memo.redis`` (``redis.asyncio.Redis``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
from typing import Any, cast

from aiohttp import web
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from openledger.controllers.kube import identity, new_api_client
from openledger.controllers.metrics import LEADER
from openledger.controllers.registry import load_handlers
from openledger.metrics import start_metrics_server
from openledger.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _micro(ts: dt.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(ts: Any) -> dt.datetime | None:
    if isinstance(ts, dt.datetime):
        return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)
    if isinstance(ts, str) and ts:
        return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return None


def lease_is_free(spec: dict[str, Any], me: str, now: dt.datetime, default_duration_s: float) -> bool:
    """Pure decision: may ``me`` take (or keep) the Lease described by ``spec``?"""
    holder = spec.get("holderIdentity") or ""
    if not holder or holder == me:
        return True
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    duration = float(spec.get("leaseDurationSeconds") or default_duration_s)
    return renewed is None or (now - renewed).total_seconds() > duration


class LeaderElector:
    """Acquire and renew one Lease; ``leading`` is set while we hold it."""

    def __init__(self, api: ApiClient, settings: Settings, me: str) -> None:
        self.api = api
        self.coordination = client.CoordinationV1Api(api)
        self.settings = settings
        self.me = me
        self.namespace = settings.operator_namespace
        self.name = settings.leader_lease_name
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()
        self._last_renew: float = 0.0

    def _body(self, resource_version: str | None, acquire: bool, old: dict[str, Any] | None) -> dict[str, Any]:
        now = _micro(_now())
        spec = {
            "holderIdentity": self.me,
            "leaseDurationSeconds": int(self.settings.leader_lease_duration_s),
            "renewTime": now,
            "acquireTime": now if acquire else (old or {}).get("acquireTime") or now,
            "leaseTransitions": int((old or {}).get("leaseTransitions") or 0) + (1 if acquire and old else 0),
        }
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version:
            meta["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    async def try_acquire_or_renew(self) -> bool:
        timeout = min(self.settings.kube_request_timeout_s, self.settings.leader_renew_period_s)
        try:
            lease = await self.coordination.read_namespaced_lease(self.name, self.namespace, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                await self.coordination.create_namespaced_lease(
                    self.namespace, cast(Any, self._body(None, True, None)), _request_timeout=timeout
                )
                return True
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
        raw = self.api.sanitize_for_serialization(lease.spec) or {}
        if not lease_is_free(raw, self.me, _now(), self.settings.leader_lease_duration_s):
            return False
        acquire = raw.get("holderIdentity") != self.me
        body = self._body(lease.metadata.resource_version, acquire, raw)
        try:
            await self.coordination.replace_namespaced_lease(
                self.name, self.namespace, cast(Any, body), _request_timeout=timeout
            )
        except ApiException as exc:
            if exc.status == 409:  # somebody else wrote first
                return False
            raise
        return True

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        period = self.settings.leader_renew_period_s
        while not stop.is_set():
            try:
                ok = await self.try_acquire_or_renew()
            except (ApiException, OSError, TimeoutError) as exc:
                log.warning("lease renewal failed", extra={"action": "leader", "error": str(exc)[:200]})
                ok = False
            if ok:
                self._last_renew = loop.time()
                if not self.leading.is_set():
                    log.info("became leader", extra={"action": "leader", "identity": self.me, "lease": self.name})
                    LEADER.set(1)
                    self.leading.set()
            elif (
                self.leading.is_set()
                and loop.time() - self._last_renew > self.settings.leader_lease_duration_s - period
            ):
                # Keep acting only while the Lease we hold cannot have expired.
                log.error("lost leadership", extra={"action": "leader", "identity": self.me})
                LEADER.set(0)
                self.lost.set()
                return
            # A standby asks more often than a leader renews: a Lease released on a clean stop is
            # taken over within a second, before a replacement pod has even started.
            wait_s = period if self.leading.is_set() else min(period, self.settings.leader_retry_period_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):  # no helper task: Kopf would wait for it on exit
                    await stop.wait()

    async def release(self) -> None:
        """Hand the Lease over at once on a clean stop (the standby need not wait it out)."""
        if not self.leading.is_set():
            return
        try:
            lease = await self.coordination.read_namespaced_lease(self.name, self.namespace, _request_timeout=5)
            if lease.spec.holder_identity == self.me:
                lease.spec.holder_identity = cast(Any, None)
                lease.spec.lease_duration_seconds = 1
                await self.coordination.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=5)
        except (ApiException, OSError, TimeoutError) as exc:
            log.warning("lease not released", extra={"action": "leader", "error": str(exc)[:200]})
        LEADER.set(0)


class Health:
    """``/healthz`` (alive) and ``/readyz`` (leader with the controllers started, or a standby)."""

    def __init__(self) -> None:
        self.leader = False
        self.controllers_ready = False
        self.standby = False

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        ready = self.controllers_ready or self.standby
        body = {"ready": ready, "leader": self.leader, "controllers": self.controllers_ready}
        return web.json_response(body, status=200 if ready else 503)

    async def start(self, host: str, port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner


async def _new_redis(settings: Settings) -> Any:
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
    )


# Kinds the controllers follow only with level-based event handlers (no Kopf change
# handlers), so Kopf need not deep-copy every event's body to diff it.
EVENT_ONLY_KINDS = frozenset({("openledger.io", "Model"), ("serving.kserve.io", "InferenceService")})


def _lean_diffbase() -> Any:
    import kopf

    class LeanDiffBase(kopf.AnnotationsDiffBaseStorage):
        def build(self, *, body: Any, extra_fields: Any = None) -> Any:
            group = str(body.get("apiVersion", "")).partition("/")[0]
            if (group, body.get("kind")) in EVENT_ONLY_KINDS:
                return {}
            return super().build(body=body, extra_fields=extra_fields)

    return LeanDiffBase()


def kopf_settings() -> Any:
    import kopf

    s = kopf.OperatorSettings()
    s.persistence.diffbase_storage = _lean_diffbase()
    s.posting.enabled = False  # the controllers post their own, meaningful Events
    s.peering.standalone = True  # the Lease decides who acts
    s.watching.server_timeout = 300
    s.watching.client_timeout = 330
    s.networking.request_timeout = 30
    return s


async def operate(namespaces: list[str] | None = None, settings: Settings | None = None) -> int:
    """Run until SIGTERM/SIGINT (0) or a lost Lease (1)."""
    import kopf

    settings = settings or get_settings()
    if settings.kubeconfig:
        os.environ["KUBECONFIG"] = settings.kubeconfig  # Kopf's own login reads it
    namespaces = namespaces if namespaces is not None else list(settings.namespaces)
    loaded = load_handlers()
    # Kopf logs every handler success at INFO with its whole settings object; ours log what matters.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    me = identity()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    health = Health()
    start_metrics_server(settings.metrics_port, settings.bind_host)
    health_runner = await health.start(settings.bind_host, settings.health_port)
    api = await new_api_client(settings)
    redis = await _new_redis(settings)
    log.info(
        "operator starting",
        extra={"action": "start", "identity": me, "handlers": loaded, "namespaces": namespaces or ["*"]},
    )
    elector = LeaderElector(api, settings, me)
    election: asyncio.Task[None] | None = None
    code = 0
    try:
        if settings.leader_election:
            election = loop.create_task(elector.run(stop), name="leader-election")
            health.standby = True
            waiter = loop.create_task(elector.leading.wait())
            stopper = loop.create_task(stop.wait())
            await asyncio.wait({waiter, stopper, election}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if not elector.leading.is_set():
                return 0
            health.standby = False
        health.leader = True
        kopf_stop: asyncio.Future[Any] = loop.create_future()
        kopf_ready = asyncio.Event()

        async def watch_flags() -> None:
            waits = [loop.create_task(stop.wait()), loop.create_task(elector.lost.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if not kopf_stop.done():
                kopf_stop.set_result(None)

        async def mark_ready() -> None:
            await kopf_ready.wait()
            # Kopf installed its own SIGTERM/SIGINT handlers; ours stop everything at once
            # (the Lease loop included), then stop Kopf through its stop flag.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            health.controllers_ready = True
            log.info("controllers running", extra={"action": "ready", "identity": me})

        watcher = loop.create_task(watch_flags(), name="stop-watcher")
        marker = loop.create_task(mark_ready(), name="ready-marker")
        memo = kopf.Memo(kube=api, redis=redis, settings=settings)
        await kopf.operator(
            settings=kopf_settings(),
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces or (),
            stop_flag=kopf_stop,
            ready_flag=kopf_ready,
            memo=memo,
            # Our own identity: Kopf's default asks getpass.getuser(), which fails for a UID
            # without a passwd entry (the image runs as 65532).
            identity=me,  # type: ignore[arg-type]  # kopf's Identity is a NewType of str, not exported
        )
        watcher.cancel()
        marker.cancel()
        code = 1 if elector.lost.is_set() else 0
    finally:
        stop.set()
        if election is not None:
            election.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await election
        if code == 0:
            await elector.release()
        await redis.aclose()
        await api.close()
        await health_runner.cleanup()
        log.info("operator stopped", extra={"action": "stop", "identity": me, "exit_code": code})
    return code


def run_operator(namespaces: list[str] | None = None) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        pass
    return asyncio.run(operate(namespaces))

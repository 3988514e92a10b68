"""The RewardPool controller (Kopf): bindings for the gateway, the settler per pool, status, Events.

Per RewardPool:

- on create/update/resume and on every timer tick: validate the spec, select the
  Models of its namespace with ``modelSelector`` and write a ``PoolBinding`` JSON to
  ``wire.model_pool_key(ns, model)`` for each (the gateway snapshots it into usage
  events, which is how the ledger knows the pool and its fee); bindings of Models
  no longer selected are removed. A selected Model that an older pool holds, or
  whose pricing the pool cannot settle (decimals, overflow), is refused: condition
  ``ModelsBound`` False and a ``ModelRefused`` Event on the pool and the Model
  (``rewardpool_builder.binding_plan``);
- on the timer (``OPENLEDGER_SETTLE_INTERVAL_S``): read ``rpcUrlSecretRef`` and
  ``signerKeySecretRef`` from their Secrets and run one ``Settler.step`` in a
  thread (close the due epoch, publish / confirm / commit), then patch
  ``status`` (currentEpoch, lastSettledEpoch, lastRoot, lastTxHash, pendingAmount,
  settledTotal; conditions Ready / ChainReachable / Settled) and post an Event per
  epoch transition;
- on every Model event that can change a selection (a Model created, relabelled,
  deleted, or first seen after a restart): re-sync the bindings of the pools of
  that namespace at once, so a Model created after its pool is never served
  unbound until the next settle tick (its usage would carry no pool);
- after an empty Redis restart (the Model controller's sentinel): ``restore_bindings``
  re-syncs every namespace's pools in the same pass that restores the routes;
- on delete: remove its bindings (a finalizer, since nothing collects garbage locally)
  and re-sync the namespace, so a Model this pool held passes to the next pool.

PostgreSQL: every settler borrows its connection per pass from one bounded
``ConnectionPool`` (``SETTLER_DB_POOL_SIZE``), whatever the number of pools.

Secrets: their values go only into the Settler (RPC URL, key) — never into logs,
status, Events or metrics; error messages name the Secret and key, not the value.
The operator also serves claim proofs over HTTP (``OPENLEDGER_CLAIMS_PORT``).

Idempotency: every handler may run any number of times; bindings are SETs of
the same value, the settler pass is idempotent (see ``settlement.settler``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from openledger.controllers import rewardpool_builder as rb
from openledger.controllers.api import defaulted_spec
from openledger.controllers.conditions import find_condition, merge_conditions, now_rfc3339
from openledger.controllers.kube import emit_event, patch_status
from openledger.controllers.metrics import reconcile_pass
from openledger.settings import get_settings
from openledger.settlement.connections import DEFAULT_MAX_SIZE, ConnectionPool
from openledger.settlement.settler import ChainSecrets, PoolConfig, PoolStatus, Settler
from openledger.wire import PoolBinding, model_pool_key, object_ref

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "openledger.io", "v1alpha1", "rewardpools"
MODEL_PLURAL = "models"
SETTLER_DB_POOL_SIZE = DEFAULT_MAX_SIZE  # PostgreSQL connections shared by all the pools' settlers


def pool_models_key(namespace: str, name: str) -> str:
    """Redis set of the Model names this pool has bound (to remove stale bindings)."""
    return f"openledger:pool-models:{namespace}/{name}"


@dataclass
class _Runtime:
    fingerprint: str
    settler: Settler


@dataclass
class RewardPools:
    """Shared state of the controller (in Kopf's memo): one Settler per pool."""

    api: ApiClient
    redis: Any | None
    database_url: str
    db_pool_size: int = SETTLER_DB_POOL_SIZE
    settlers: dict[str, _Runtime] = field(default_factory=dict)
    # pool -> distributor address, shared with the claims server (its answers name the contract).
    distributors: dict[str, str] = field(default_factory=dict)
    # Model "ns/name" -> labels as last seen (to tell label changes from status churn).
    model_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    _pool_locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False, repr=False)
    _ns_locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False, repr=False)
    _ns_dirty: set[str] = field(default_factory=set, init=False, repr=False)
    _refused_models: dict[str, list[dict[str, Any]]] = field(default_factory=dict, init=False, repr=False)
    db: ConnectionPool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.db = ConnectionPool(self.database_url, max_size=self.db_pool_size)  # connects lazily

    def close(self) -> None:
        for runtime in self.settlers.values():
            runtime.settler.close()
        self.settlers.clear()
        self.db.close()

    # -------------------------------------------------------------- bindings

    async def sync_bindings(self, namespace: str, name: str, spec: Mapping[str, Any]) -> rb.BindingPlan:
        # One sync per pool at a time (its reconcile and a Model event may overlap).
        async with self._pool_locks.setdefault(object_ref(namespace, name), asyncio.Lock()):
            return await self._sync_bindings(namespace, name, spec)

    async def _list(self, namespace: str, plural: str) -> list[dict[str, Any]]:
        listing = await client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, _request_timeout=get_settings().kube_request_timeout_s
        )
        return list(listing.get("items") or [])

    async def _sync_bindings(self, namespace: str, name: str, spec: Mapping[str, Any]) -> rb.BindingPlan:
        models = await self._list(namespace, MODEL_PLURAL)
        plan = rb.binding_plan(namespace, name, spec, models, await self._list(namespace, PLURAL))
        self._refused_models[object_ref(namespace, name)] = [
            m for m in models if str(m["metadata"]["name"]) in {r.model for r in plan.refused}
        ]
        if self.redis is None:
            return plan
        value = rb.binding(namespace, name, spec).to_json()
        index = pool_models_key(namespace, name)
        previous = {m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(index)}
        pipe = self.redis.pipeline(transaction=True)
        for model in plan.bound:
            pipe.set(model_pool_key(namespace, model), value)
        for model in previous - set(plan.bound):
            await self._drop_binding(namespace, name, model)
        pipe.delete(index)
        if plan.bound:
            pipe.sadd(index, *plan.bound)
        await pipe.execute()
        return plan

    async def report_refusals(self, pool: Mapping[str, Any], plan: rb.BindingPlan) -> None:
        """An Event on the pool and on each refused Model, once per change of the ModelsBound condition."""
        meta = pool.get("metadata") or {}
        was = find_condition((pool.get("status") or {}).get("conditions"), "ModelsBound") or {}
        now = rb.models_bound_condition(plan, generation=None, now="")
        if (was.get("status"), was.get("message", "")) == (now["status"], now.get("message", "")):
            return
        refused = {m["metadata"]["name"]: m for m in self._refused_models.get(object_ref(
            str(meta.get("namespace")), str(meta.get("name"))), [])}  # fmt: skip
        for refusal in plan.refused:
            await emit_event(self.api, pool, "ModelRefused", refusal.message, type_="Warning", action="Bind")
            if refusal.model in refused:
                await emit_event(self.api, refused[refusal.model], "ModelRefused", refusal.message,
                                 type_="Warning", action="Bind")  # fmt: skip

    async def observe_model(self, obj: Mapping[str, Any], *, deleted: bool) -> None:
        """A Model event: when it can change a selection (new, relabelled, deleted), re-sync its namespace."""
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        key = object_ref(namespace, name)
        labels = dict(meta.get("labels") or {})
        previous = self.model_labels.get(key)
        if deleted:
            self.model_labels.pop(key, None)
        else:
            self.model_labels[key] = labels
        if rb.model_selection_changed(previous, labels, deleted=deleted):
            await self.models_changed(namespace)

    async def models_changed(self, namespace: str) -> None:
        """Re-sync the bindings of every pool of ``namespace``; a burst of Model events coalesces into few passes."""
        self._ns_dirty.add(namespace)
        lock = self._ns_locks.setdefault(namespace, asyncio.Lock())
        if lock.locked():  # the running pass loops once more and sees this change
            return
        async with lock:
            while namespace in self._ns_dirty:
                self._ns_dirty.discard(namespace)
                await self.resync_namespace(namespace)

    async def resync_namespace(self, namespace: str) -> None:
        for pool in await self._list(namespace, PLURAL):
            name = str(pool["metadata"]["name"])
            if not rb.resync_targets([pool]):  # being deleted, or invalid (its reconcile reports it)
                continue
            plan = await self.sync_bindings(namespace, name, pool.get("spec") or {})
            log.info(
                "pool bindings re-synced after a Model change",
                extra={"action": "rewardpool.models", "pool": object_ref(namespace, name), "models": len(plan.bound)},
            )
            await self.report_refusals(pool, plan)
            previous = pool.get("status") or {}
            ready = rb.models_bound_condition(plan, generation=previous.get("observedGeneration"), now=now_rfc3339())
            was = find_condition(previous.get("conditions"), "ModelsBound") or {}
            if (
                previous.get("models") != len(plan.bound)
                or was.get("message", "") != ready.get("message", "")
                or (was.get("status") != ready["status"])
            ):
                conditions = merge_conditions(previous.get("conditions"), [ready])
                try:
                    await patch_status(self.api, GROUP, VERSION, PLURAL, namespace, name,
                                       {"models": len(plan.bound), "conditions": conditions})  # fmt: skip
                except ApiException as exc:
                    if exc.status != 404:
                        raise

    async def restore_all(self) -> None:
        """Re-sync the bindings of every pool this operator watches (after Redis lost them)."""
        namespaces = get_settings().namespaces
        if not namespaces:
            listing = await client.CustomObjectsApi(self.api).list_cluster_custom_object(
                GROUP, VERSION, PLURAL, _request_timeout=get_settings().kube_request_timeout_s
            )
            namespaces = sorted({str(p["metadata"]["namespace"]) for p in listing.get("items") or []})
        await asyncio.gather(*(self.models_changed(ns) for ns in namespaces))

    async def _drop_binding(self, namespace: str, name: str, model: str) -> None:
        assert self.redis is not None
        key = model_pool_key(namespace, model)
        raw = await self.redis.get(key)
        if raw and PoolBinding.from_json(raw).pool == object_ref(namespace, name):
            await self.redis.delete(key)

    async def drop_all_bindings(self, namespace: str, name: str) -> None:
        self._refused_models.pop(object_ref(namespace, name), None)
        if self.redis is None:
            return
        index = pool_models_key(namespace, name)
        for model in await self.redis.smembers(index):
            await self._drop_binding(namespace, name, model.decode() if isinstance(model, bytes) else model)
        await self.redis.delete(index)

    # --------------------------------------------------------------- secrets

    async def _secret_value(self, namespace: str, secret: str, key: str, field_path: str) -> str:
        try:
            obj = await client.CoreV1Api(self.api).read_namespaced_secret(
                secret, namespace, _request_timeout=get_settings().kube_request_timeout_s
            )
        except ApiException as exc:
            if exc.status == 404:
                raise rb.RewardPoolSpecError(f"{field_path}: Secret {namespace}/{secret} not found") from None
            raise
        data = obj.data or {}
        if key not in data:
            raise rb.RewardPoolSpecError(f"{field_path}: Secret {namespace}/{secret} has no key {key!r}")
        return base64.b64decode(data[key]).decode().strip()

    async def secrets(self, namespace: str, spec: Mapping[str, Any]) -> ChainSecrets:
        refs = rb.secret_refs(spec)
        rpc = await self._secret_value(namespace, *refs["rpcUrl"], "spec.chain.rpcUrlSecretRef")
        key = await self._secret_value(namespace, *refs["signerKey"], "spec.chain.signerKeySecretRef")
        rb.check_secrets(rpc, key)
        return ChainSecrets(rpc_url=rpc, signer_key=key)

    # ------------------------------------------------------------------ pass

    async def _settler(self, config: PoolConfig, secrets: ChainSecrets) -> Settler:
        digest = hashlib.sha256(f"{config}|{secrets.rpc_url}|{secrets.signer_key}".encode()).hexdigest()
        runtime = self.settlers.get(config.pool)
        if runtime is not None and runtime.fingerprint == digest:
            return runtime.settler
        if runtime is not None:
            runtime.settler.close()
        settler = await asyncio.to_thread(Settler, config, secrets, self.db)
        self.settlers[config.pool] = _Runtime(digest, settler)
        return settler

    async def reconcile(self, body: Mapping[str, Any], *, settle: bool) -> dict[str, Any]:
        """Bindings + (with ``settle``) one settler pass; patches and returns the status."""
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        spec = defaulted_spec("RewardPool", body.get("spec") or {})
        previous = body.get("status") or {}
        generation = meta.get("generation")
        paused, epoch_seconds, decimals = bool(spec["paused"]), int(spec["epochSeconds"]), rb.token_decimals(spec)
        settled = None
        try:
            config = rb.pool_config(namespace, name, spec)
            self.distributors[config.pool] = config.distributor
            plan = await self.sync_bindings(namespace, name, spec)
            if settle:
                secrets = await self.secrets(namespace, spec)
                settler = await self._settler(config, secrets)
                settled = await asyncio.to_thread(settler.step)
            status = rb.pool_status(
                previous,
                generation=generation,
                models=len(plan.bound),
                paused=paused,
                epoch_seconds=epoch_seconds,
                decimals=decimals,
                settled=settled,
                plan=plan,
            )
            await self.report_refusals(body, plan)
        except rb.RewardPoolSpecError as exc:
            status = rb.pool_status(
                previous,
                generation=generation,
                models=0,
                paused=paused,
                epoch_seconds=epoch_seconds,
                decimals=decimals,
                error=str(exc),
            )
            if previous.get("phase") != "Failed":
                await emit_event(self.api, body, "InvalidSpec", str(exc), type_="Warning")
        await patch_status(self.api, GROUP, VERSION, PLURAL, namespace, name, status)
        if settled is not None:
            await self._settle_events(body, previous, settled)
        return status

    async def _settle_events(self, body: Mapping[str, Any], previous: Mapping[str, Any], settled: PoolStatus) -> None:
        """The pass's Events; a Warning that repeats the reason already in ``Settled`` is not posted again."""
        was_settled = find_condition(previous.get("conditions"), "Settled") or {}
        for type_, reason, message in settled.events:
            if type_ == "Warning" and was_settled.get("reason") == reason:
                continue
            await emit_event(self.api, body, reason, message, type_=type_, action="Settle")
        if not settled.database_available and was_settled.get("reason") != "DatabaseUnavailable":
            await emit_event(self.api, body, "DatabaseUnavailable", settled.blocked_message, type_="Warning")
        if previous.get("conditions") and not settled.chain_reachable:
            was = find_condition(previous["conditions"], "ChainReachable") or {}
            if was.get("status") != "False":
                await emit_event(self.api, body, "ChainUnreachable", "the chain RPC is not answering", type_="Warning")


async def restore_bindings(memo: Any) -> None:
    """Called by the Model controller when Redis came back empty: bindings return with the routes."""
    pools: RewardPools | None = getattr(memo, "rewardpools", None)
    if pools is None:
        pools = _pools(memo)
    await pools.restore_all()


def _pools(memo: Any) -> RewardPools:
    pools: RewardPools | None = getattr(memo, "rewardpools", None)
    if pools is None:
        pools = RewardPools(memo.kube, getattr(memo, "redis", None), get_settings().database_url)
        pools.distributors = _distributors(memo)
        memo.rewardpools = pools
    return pools


def _distributors(memo: Any) -> dict[str, str]:
    shared: dict[str, str] | None = getattr(memo, "claims_distributors", None)
    if shared is None:
        shared = {}
        memo.claims_distributors = shared
    return shared


@kopf.on.startup()
async def _rewardpool_startup(memo: kopf.Memo, **_: Any) -> None:
    settings = get_settings()
    if settings.claims_port:
        from openledger.settlement.claims import ClaimsServer

        server = ClaimsServer(settings.database_url, settings.bind_host, settings.claims_port, _distributors(memo))
        try:
            await asyncio.to_thread(server.start)
        except OSError as exc:  # e.g. a second operator (standby) on the same host: proofs are optional
            log.warning("claims server not started", extra={"action": "claims.listen", "error": str(exc)[:200]})
            return
        memo.claims_server = server
        log.info("claims server listening", extra={"action": "claims.listen", "port": settings.claims_port})


@kopf.on.cleanup()
async def _rewardpool_cleanup(memo: kopf.Memo, **_: Any) -> None:
    server = getattr(memo, "claims_server", None)
    if server is not None:
        await asyncio.to_thread(server.stop)
    pools: RewardPools | None = getattr(memo, "rewardpools", None)
    if pools is not None:
        await asyncio.to_thread(pools.close)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def _rewardpool_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    async with reconcile_pass("RewardPool"):
        await _pools(memo).reconcile(body, settle=False)


@kopf.on.event(GROUP, VERSION, MODEL_PLURAL)
async def _rewardpool_model_event(event: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
    """A Model created, relabelled or deleted after its pool: bind / unbind it now, not at the next settle tick."""
    obj = event.get("object")
    if not obj:
        return
    await _pools(memo).observe_model(obj, deleted=event.get("type") == "DELETED")


@kopf.timer(GROUP, VERSION, PLURAL, interval=get_settings().settle_interval_s, initial_delay=1.0)
async def _rewardpool_settle(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    async with reconcile_pass("RewardPool"):
        await _pools(memo).reconcile(body, settle=True)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def _rewardpool_deleted(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    pools = _pools(memo)
    await pools.drop_all_bindings(str(namespace), name)
    runtime = pools.settlers.pop(object_ref(str(namespace), name), None)
    if runtime is not None:
        await asyncio.to_thread(runtime.settler.close)
    await pools.models_changed(str(namespace))  # a Model this pool held may now belong to another one


__all__ = ["SETTLER_DB_POOL_SIZE", "RewardPools", "pool_models_key", "restore_bindings"]

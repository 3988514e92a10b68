"""The RewardPool controller (Kopf): bindings for the gateway, the settler per pool, status, Events.

Per RewardPool:

- on create/update/resume and on every timer tick: validate the spec, select the
  Models of its namespace with ``modelSelector`` and write a ``PoolBinding`` JSON to
  ``wire.model_pool_key(ns, model)`` for each (the gateway snapshots it into usage
  events, which is how the ledger knows the pool and its fee); bindings of Models
  no longer selected are removed;
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
- on delete: remove its bindings (a finalizer, since nothing collects garbage locally).

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
from openledger.controllers.kube import emit_event, patch_status
from openledger.controllers.metrics import reconcile_pass
from openledger.settings import get_settings
from openledger.settlement.settler import ChainSecrets, PoolConfig, Settler
from openledger.wire import PoolBinding, model_pool_key, object_ref

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "openledger.io", "v1alpha1", "rewardpools"
MODEL_PLURAL = "models"


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
    settlers: dict[str, _Runtime] = field(default_factory=dict)
    # pool -> distributor address, shared with the claims server (its answers name the contract).
    distributors: dict[str, str] = field(default_factory=dict)
    # Model "ns/name" -> labels as last seen (to tell label changes from status churn).
    model_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    _pool_locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False, repr=False)
    _ns_locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False, repr=False)
    _ns_dirty: set[str] = field(default_factory=set, init=False, repr=False)

    def close(self) -> None:
        for runtime in self.settlers.values():
            runtime.settler.close()
        self.settlers.clear()

    # -------------------------------------------------------------- bindings

    async def sync_bindings(self, namespace: str, name: str, spec: Mapping[str, Any]) -> list[str]:
        # One sync per pool at a time (its reconcile and a Model event may overlap).
        async with self._pool_locks.setdefault(object_ref(namespace, name), asyncio.Lock()):
            return await self._sync_bindings(namespace, name, spec)

    async def _sync_bindings(self, namespace: str, name: str, spec: Mapping[str, Any]) -> list[str]:
        listing = await client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            GROUP, VERSION, namespace, MODEL_PLURAL, _request_timeout=get_settings().kube_request_timeout_s
        )
        selected = rb.selected_models(spec, listing.get("items") or [])
        if self.redis is None:
            return selected
        value = rb.binding(namespace, name, spec).to_json()
        index = pool_models_key(namespace, name)
        previous = {m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(index)}
        pipe = self.redis.pipeline(transaction=True)
        for model in selected:
            pipe.set(model_pool_key(namespace, model), value)
        for model in previous - set(selected):
            await self._drop_binding(namespace, name, model)
        pipe.delete(index)
        if selected:
            pipe.sadd(index, *selected)
        await pipe.execute()
        return selected

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
        listing = await client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, _request_timeout=get_settings().kube_request_timeout_s
        )
        items = listing.get("items") or []
        counts = {str(p["metadata"]["name"]): (p.get("status") or {}).get("models") for p in items}
        for name, spec in rb.resync_targets(items):
            models = await self.sync_bindings(namespace, name, spec)
            log.info(
                "pool bindings re-synced after a Model change",
                extra={"action": "rewardpool.models", "pool": object_ref(namespace, name), "models": len(models)},
            )
            if counts.get(name) != len(models):
                try:
                    await patch_status(self.api, GROUP, VERSION, PLURAL, namespace, name, {"models": len(models)})
                except ApiException as exc:
                    if exc.status != 404:
                        raise

    async def _drop_binding(self, namespace: str, name: str, model: str) -> None:
        assert self.redis is not None
        key = model_pool_key(namespace, model)
        raw = await self.redis.get(key)
        if raw and PoolBinding.from_json(raw).pool == object_ref(namespace, name):
            await self.redis.delete(key)

    async def drop_all_bindings(self, namespace: str, name: str) -> None:
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
        settler = await asyncio.to_thread(Settler, config, secrets, self.database_url)
        self.settlers[config.pool] = _Runtime(digest, settler)
        return settler

    async def reconcile(self, body: Mapping[str, Any], *, settle: bool) -> dict[str, Any]:
        """Bindings + (with ``settle``) one settler pass; patches and returns the status."""
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        spec = body.get("spec") or {}
        previous = body.get("status") or {}
        generation = meta.get("generation")
        paused = bool(spec.get("paused", False))
        epoch_seconds = int(spec.get("epochSeconds", 3600))
        try:
            config = rb.pool_config(namespace, name, spec)
            self.distributors[config.pool] = config.distributor
            models = await self.sync_bindings(namespace, name, spec)
            settled = None
            if settle:
                secrets = await self.secrets(namespace, spec)
                settler = await self._settler(config, secrets)
                settled = await asyncio.to_thread(settler.step)
            status = rb.pool_status(
                previous,
                generation=generation,
                models=len(models),
                paused=paused,
                epoch_seconds=epoch_seconds,
                settled=settled,
            )
        except rb.RewardPoolSpecError as exc:
            status = rb.pool_status(
                previous, generation=generation, models=0, paused=paused, epoch_seconds=epoch_seconds, error=str(exc)
            )
            if previous.get("phase") != "Failed":
                await emit_event(self.api, body, "InvalidSpec", str(exc), type_="Warning")
            settled = None
        await patch_status(self.api, GROUP, VERSION, PLURAL, namespace, name, status)
        if settled is not None:
            for type_, reason, message in settled.events:
                await emit_event(self.api, body, reason, message, type_=type_, action="Settle")
            if previous.get("conditions") and not settled.chain_reachable:
                was: dict[str, Any] = next((c for c in previous["conditions"] if c.get("type") == "ChainReachable"), {})
                if was.get("status") != "False":
                    await emit_event(
                        self.api, body, "ChainUnreachable", "the chain RPC is not answering", type_="Warning"
                    )
        return status


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


__all__ = ["RewardPools", "pool_models_key"]

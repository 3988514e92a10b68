"""The Model controller: every Model becomes a KServe InferenceService.

Level-based. Every watch event (of the Model or of its InferenceService) and the
periodic resync run the same ``reconcile(key)``, which compares the desired
state (``model_builder``) with the latest observed objects and makes only the
calls that close the gap:

1. our finalizer on the Model (so deleting a Model always removes its children);
2. the InferenceService: create it, or merge-patch the fields we own back;
3. the Model's status, mirrored from KServe (only when it changed);
4. the gateway's route in Redis (``openledger.wire.model_route_key``).

Idempotent: a reconcile may run any number of times, concurrently with a
restart of the operator, and converges to one InferenceService with the Model's
name (a second create is a 409, which is read back and patched, never
duplicated). A Model being deleted loses its InferenceService and its Redis
route before the finalizer is removed.

The handlers get the shared clients from Kopf's ``memo`` (``memo.kube``,
``memo.redis``), which ``openledger.controllers.runner`` fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from openledger.controllers import model_builder as mb
from openledger.controllers.api import GROUP, VERSION
from openledger.controllers.conditions import now_rfc3339
from openledger.controllers.kube import api_error_message, emit_event, is_missing_resource, merge_patch, patch_status
from openledger.controllers.metrics import DRIFT_REPAIRS, ERRORS, MANAGED, RECONCILE_SECONDS, RECONCILES
from openledger.money import MoneyError
from openledger.settings import Settings, get_settings
from openledger.wire import model_route_key

log = logging.getLogger(__name__)

KIND = "Model"
PLURAL = "models"
Key = tuple[str, str]
_BACKOFF_MAX_S = 60.0


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj["metadata"]
    return (str(meta["namespace"]), str(meta["name"]))


def _slim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A cached copy without managedFields (most of an object's bytes)."""
    out = dict(obj)
    meta = dict(out.get("metadata") or {})
    meta.pop("managedFields", None)
    out["metadata"] = meta
    return out


def _rv(obj: Mapping[str, Any] | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


class ModelReconciler:
    """State and reconcile loop of the Model controller (driven by Kopf's watch events)."""

    def __init__(self, api: ApiClient, redis: Any | None, settings: Settings | None = None) -> None:
        self.api = api
        self.redis = redis
        self.settings = settings or get_settings()
        self.models: dict[Key, dict[str, Any]] = {}
        self.isvcs: dict[Key, dict[str, Any]] = {}
        self.published: dict[Key, str] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        self._failures: dict[Key, int] = {}
        self._requeued: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(self.settings.operator_max_concurrent_reconciles)
        self._crd_missing_reported: set[Key] = set()
        self._rejections: dict[Key, str] = {}
        self._scaling_warnings: dict[Key, str] = {}
        # (Model resourceVersion, InferenceService resourceVersion) of the last pass that
        # converged: a pass over the same inputs would decide the same (a no-op), so skip it.
        self._converged: dict[Key, tuple[int, int]] = {}
        self._objects = client.CustomObjectsApi(api)

    # ------------------------------------------------------------ observing

    def _store(self, cache: dict[Key, dict[str, Any]], obj: Mapping[str, Any]) -> dict[str, Any]:
        """Cache ``obj`` unless the cache already holds a newer version; returns ``obj`` (slim)."""
        key = _key(obj)
        old = cache.get(key)
        slim = _slim(obj)
        # A write's response may arrive before the watch delivers older events.
        if old is None or _rv(obj) == 0 or _rv(obj) >= _rv(old):
            cache[key] = slim
        return slim

    async def observe_model(self, obj: Mapping[str, Any], deleted: bool = False) -> None:
        key = _key(obj)
        if deleted:
            self.models.pop(key, None)
            self._forget(key)
            MANAGED.labels(KIND).set(len(self.models))
            await self._drop_route(key)
            return
        self._store(self.models, obj)
        MANAGED.labels(KIND).set(len(self.models))
        await self.reconcile(key)

    async def observe_isvc(self, obj: Mapping[str, Any], deleted: bool = False) -> None:
        key = _key(obj)
        if deleted:
            self.isvcs.pop(key, None)
        else:
            self._store(self.isvcs, obj)
        if key in self.models:
            await self.reconcile(key)

    def _inputs(self, key: Key) -> tuple[int, int]:
        return (_rv(self.models.get(key)), _rv(self.isvcs.get(key)))

    def _forget(self, key: Key) -> None:
        self._converged.pop(key, None)
        self._failures.pop(key, None)
        self._locks.pop(key, None)
        self._crd_missing_reported.discard(key)
        self._rejections.pop(key, None)
        self._scaling_warnings.pop(key, None)
        handle = self._requeued.pop(key, None)
        if handle is not None:
            handle.cancel()

    # ------------------------------------------------------------- requeue

    def requeue(self, key: Key, delay_s: float) -> None:
        if key in self._requeued:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._requeued.pop(key, None)
            task = loop.create_task(self.reconcile(key), name=f"model-requeue-{key[0]}/{key[1]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._requeued[key] = loop.call_later(delay_s, fire)

    async def resync(self) -> None:
        """Reconcile every known Model and republish every route (e.g. after a Redis restart)."""
        self.published.clear()
        self._converged.clear()
        await asyncio.gather(*(self.reconcile(key) for key in list(self.models)), return_exceptions=True)

    async def close(self) -> None:
        for handle in self._requeued.values():
            handle.cancel()
        self._requeued.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------ reconcile

    async def reconcile(self, key: Key) -> None:
        """Converge one Model. Safe to run any number of times (see module docstring)."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock, self._sem:
            model = self.models.get(key)
            if model is None:
                return
            if self._converged.get(key) == self._inputs(key):
                RECONCILES.labels(KIND, "unchanged").inc()
                return
            started = time.perf_counter()
            try:
                retry_s, used = await self._reconcile(key, model)
            except (ApiException, OSError, TimeoutError) as exc:
                retry_s = self._backoff(key)
                if isinstance(exc, ApiException):
                    reason, status, message = f"ApiError{exc.status}", exc.status, api_error_message(exc)
                else:
                    reason, status, message = type(exc).__name__, None, str(exc)
                ERRORS.labels(KIND, reason).inc()
                RECONCILES.labels(KIND, "error").inc()
                log.warning(
                    "reconcile failed",
                    extra={
                        "action": "reconcile",
                        "kind": KIND,
                        "object": "/".join(key),
                        "status": status,
                        "error": message[:300],
                        "retry_s": retry_s,
                    },
                )
                self.requeue(key, retry_s)
                return
            finally:
                RECONCILE_SECONDS.labels(KIND).observe(time.perf_counter() - started)
            if retry_s:
                RECONCILES.labels(KIND, "requeued").inc()
                self.requeue(key, retry_s)
            else:
                self._failures.pop(key, None)
                if used is not None:
                    self._converged[key] = used
                RECONCILES.labels(KIND, "ok").inc()

    def _backoff(self, key: Key) -> float:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        return float(min(_BACKOFF_MAX_S, 0.5 * 2 ** (failures - 1)))

    async def _reconcile(self, key: Key, model: dict[str, Any]) -> tuple[float, tuple[int, int] | None]:
        """One pass. Returns seconds until a retry is wanted (0: converged) and the versions
        of the Model and InferenceService the pass decided on (after its own writes)."""
        namespace, name = key
        if model["metadata"].get("deletionTimestamp"):
            return await self._finalize(key, model), None

        finalizers = mb.with_finalizer(model)
        if finalizers is not None:
            model = await self._patch_model(
                key, {"metadata": {"finalizers": finalizers, "resourceVersion": model["metadata"]["resourceVersion"]}}
            )

        retry_s = 0.0
        seen = mb.Observation(isvc=self.isvcs.get(key))
        desired = mb.desired_inference_service(model)
        await self._warn_scaling(key, model)
        actual = self.isvcs.get(key)
        try:
            if actual is None:
                seen = mb.Observation(isvc=await self._create_isvc(key, model, desired))
            elif actual["metadata"].get("deletionTimestamp"):
                retry_s = 2.0  # being deleted (by hand); recreate once it is gone
            elif self._foreign_owner(actual, model):
                seen = mb.Observation(
                    isvc=actual,
                    write_error=f"InferenceService {namespace}/{name} exists and is controlled by another object",
                )
            else:
                drift = mb.drift_patch(desired, actual)
                if drift is not None:
                    seen = mb.Observation(isvc=await self._repair_isvc(key, model, drift))
            self._crd_missing_reported.discard(key)
            self._rejections.pop(key, None)
        except ApiException as exc:
            if is_missing_resource(exc):
                seen = mb.Observation(crd_missing=True)
                retry_s = self.settings.operator_crd_retry_s
                ERRORS.labels(KIND, "CRDMissing").inc()
                if key not in self._crd_missing_reported:
                    self._crd_missing_reported.add(key)
                    await emit_event(
                        self.api,
                        model,
                        "InferenceServiceCRDMissing",
                        f"{mb.ISVC_PLURAL}.{mb.ISVC_GROUP} is not installed; install KServe. "
                        f"Retrying every {retry_s:g} s.",
                        type_="Warning",
                    )
            elif exc.status in (400, 422):
                seen = mb.Observation(isvc=actual, write_error=api_error_message(exc))
                retry_s = self._backoff(key)
                ERRORS.labels(KIND, "InferenceServiceRejected").inc()
                if self._rejections.get(key) != seen.write_error:  # one Event per distinct rejection
                    self._rejections[key] = seen.write_error
                    await emit_event(self.api, model, "InferenceServiceRejected", seen.write_error, type_="Warning")
            else:
                raise

        status = mb.model_status(model, seen, now_rfc3339())
        if mb.status_changed(model, status):
            old_phase = (model.get("status") or {}).get("phase")
            model = await self._patch_model(key, {"status": status.as_patch()}, status=True)
            if old_phase != status.phase:
                await self._phase_event(model, status)

        if not await self._publish_route(key, model, status.url):
            retry_s = retry_s or self._backoff(key)
        return retry_s, (_rv(model), _rv(seen.isvc))

    async def _warn_scaling(self, key: Key, model: dict[str, Any]) -> None:
        """One Warning Event per distinct scaling problem (the condition keeps saying it)."""
        warning = mb.scaling_plan(model).warning
        if not warning:
            self._scaling_warnings.pop(key, None)
            return
        if self._scaling_warnings.get(key) == warning:
            return
        self._scaling_warnings[key] = warning
        log.warning("scaling not supported", extra={"action": "validate", "kind": KIND, "object": "/".join(key)})
        await emit_event(self.api, model, "ScalingNotSupported", warning, type_="Warning")

    # ------------------------------------------------------------- children

    def _foreign_owner(self, isvc: Mapping[str, Any], model: Mapping[str, Any]) -> bool:
        refs = (isvc.get("metadata") or {}).get("ownerReferences") or []
        uid = model["metadata"]["uid"]
        return any(r.get("controller") and r.get("uid") != uid for r in refs)

    async def _create_isvc(self, key: Key, model: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
        namespace, name = key
        try:
            created = await self._objects.create_namespaced_custom_object(
                mb.ISVC_GROUP,
                mb.ISVC_VERSION,
                namespace,
                mb.ISVC_PLURAL,
                desired,
                _request_timeout=self.settings.kube_request_timeout_s,
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            # Created by an earlier run (e.g. before a restart): read it back, repair it.
            existing = await self._objects.get_namespaced_custom_object(
                mb.ISVC_GROUP,
                mb.ISVC_VERSION,
                namespace,
                mb.ISVC_PLURAL,
                name,
                _request_timeout=self.settings.kube_request_timeout_s,
            )
            current = self._store(self.isvcs, existing)
            if self._foreign_owner(current, model):
                return current
            drift = mb.drift_patch(desired, current)
            return current if drift is None else await self._repair_isvc(key, model, drift)
        result = self._store(self.isvcs, created)
        log.info("created InferenceService", extra={"action": "create", "kind": KIND, "object": f"{namespace}/{name}"})
        await emit_event(self.api, model, "InferenceServiceCreated", f"created InferenceService {name}")
        if self.settings.operator_test_pause_after_create_s > 0:
            await asyncio.sleep(self.settings.operator_test_pause_after_create_s)
        return result

    async def _repair_isvc(self, key: Key, model: dict[str, Any], drift: mb.Drift) -> dict[str, Any]:
        namespace, name = key
        patched = await merge_patch(
            self.api, mb.ISVC_GROUP, mb.ISVC_VERSION, mb.ISVC_PLURAL, namespace, name, drift.patch
        )
        result = self._store(self.isvcs, patched)
        DRIFT_REPAIRS.labels(KIND).inc()
        fields = ", ".join(drift.fields)
        log.info(
            "updated InferenceService",
            extra={"action": "update", "kind": KIND, "object": f"{namespace}/{name}", "fields": fields},
        )
        await emit_event(self.api, model, "InferenceServiceUpdated", f"set {fields} on InferenceService {name}")
        return result

    async def _patch_model(self, key: Key, body: Mapping[str, Any], status: bool = False) -> dict[str, Any]:
        namespace, name = key
        if status:
            result = await patch_status(self.api, GROUP, VERSION, PLURAL, namespace, name, body["status"])
        else:
            result = await merge_patch(self.api, GROUP, VERSION, PLURAL, namespace, name, body)
        return self._store(self.models, result)

    async def _phase_event(self, model: dict[str, Any], status: mb.ModelStatus) -> None:
        ready = status.conditions[0] if status.conditions else {}
        for cond in status.conditions:
            if cond.get("type") == "Ready":
                ready = cond
        warning = status.phase in ("Failed", "Degraded")
        message = f"phase {status.phase}: {ready.get('reason', '')}"
        if ready.get("message"):
            message += f" - {ready['message']}"
        await emit_event(self.api, model, status.phase, message, type_="Warning" if warning else "Normal")
        log.info(
            "phase changed",
            extra={
                "action": "phase",
                "kind": KIND,
                "object": "/".join(_key(model)),
                "phase": status.phase,
                "reason": ready.get("reason"),
            },
        )

    # ---------------------------------------------------------------- redis

    async def _publish_route(self, key: Key, model: Mapping[str, Any], url: str) -> bool:
        if self.redis is None:
            return True
        try:
            payload = mb.model_route(model, url).to_json()
        except MoneyError:
            return True  # Priced=False says why; the gateway must not route an unpriced Model
        if self.published.get(key) == payload:
            return True
        try:
            await self.redis.set(model_route_key(*key), payload)
        except Exception as exc:  # noqa: BLE001 - any Redis failure: keep serving Kubernetes, retry later
            ERRORS.labels(KIND, "Redis").inc()
            log.warning(
                "route not published", extra={"action": "publish", "object": "/".join(key), "error": str(exc)[:200]}
            )
            return False
        self.published[key] = payload
        return True

    async def _drop_route(self, key: Key) -> bool:
        self.published.pop(key, None)
        if self.redis is None:
            return True
        try:
            await self.redis.delete(model_route_key(*key))
        except Exception as exc:  # noqa: BLE001 - any Redis failure: retried by the finalizer
            ERRORS.labels(KIND, "Redis").inc()
            log.warning(
                "route not deleted", extra={"action": "unpublish", "object": "/".join(key), "error": str(exc)[:200]}
            )
            return False
        return True

    # ------------------------------------------------------------- deletion

    async def _finalize(self, key: Key, model: dict[str, Any]) -> float:
        namespace, name = key
        if mb.FINALIZER not in (model["metadata"].get("finalizers") or []):
            return 0.0
        try:
            await self._objects.delete_namespaced_custom_object(
                mb.ISVC_GROUP,
                mb.ISVC_VERSION,
                namespace,
                mb.ISVC_PLURAL,
                name,
                _request_timeout=self.settings.kube_request_timeout_s,
            )
            await emit_event(self.api, model, "InferenceServiceDeleted", f"deleted InferenceService {name}")
        except ApiException as exc:
            if exc.status != 404:
                raise
        if not await self._drop_route(key):
            return self._backoff(key)
        remaining = mb.without_finalizer(model)
        if remaining is not None:
            try:
                await self._patch_model(
                    key,
                    {"metadata": {"finalizers": remaining, "resourceVersion": model["metadata"]["resourceVersion"]}},
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
        log.info("finalized", extra={"action": "delete", "kind": KIND, "object": f"{namespace}/{name}"})
        return 0.0


# ------------------------------------------------------------------ Kopf wiring


def _reconciler(memo: Any) -> ModelReconciler:
    rec = getattr(memo, "model_reconciler", None)
    if rec is None:
        rec = ModelReconciler(memo.kube, getattr(memo, "redis", None))
        memo.model_reconciler = rec
    return rec


# Present in Redis while it still holds what the operator published. Redis may restart
# empty (the local platform runs it with --save ''): its absence means "republish now".
REDIS_SENTINEL_KEY = "openledger:operator:published"


async def redis_was_reset(redis: Any | None) -> bool:
    """True when the sentinel was missing (and is now set): every route must be written again."""
    if redis is None:
        return False
    try:
        return bool(await redis.set(REDIS_SENTINEL_KEY, "1", nx=True))
    except Exception:  # noqa: BLE001 - Redis down: nothing to republish into yet; checked again soon
        return False


async def _restore_pool_bindings(memo: kopf.Memo) -> bool:
    from openledger.controllers.rewardpool import restore_bindings

    try:
        await restore_bindings(memo)
    except Exception as exc:  # noqa: BLE001 - Kubernetes or Redis down: retried on the next check
        ERRORS.labels(KIND, "PoolBindings").inc()
        log.warning("pool bindings not restored", extra={"action": "restore", "error": str(exc)[:200]})
        return False
    return True


@kopf.on.startup()
async def _model_startup(memo: kopf.Memo, **_: Any) -> None:
    rec = _reconciler(memo)

    async def resync_forever() -> None:
        loop = asyncio.get_running_loop()
        last_full = loop.time()
        while True:
            await asyncio.sleep(rec.settings.operator_redis_check_s)
            reset = await redis_was_reset(rec.redis)
            if reset and not await _restore_pool_bindings(memo):
                # Pool bindings first, then routes: a Model is never routable without its pool, so
                # no route comes back before its binding (the next check tries both again).
                with contextlib.suppress(Exception):
                    await rec.redis.delete(REDIS_SENTINEL_KEY)  # type: ignore[union-attr]  # reset implies a client
                continue
            if reset or loop.time() - last_full >= rec.settings.operator_resync_s:
                await rec.resync()
                last_full = loop.time()

    memo.model_resync_task = asyncio.get_running_loop().create_task(resync_forever(), name="model-resync")


@kopf.on.cleanup()
async def _model_cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = getattr(memo, "model_resync_task", None)
    if task is not None:
        task.cancel()
    rec = getattr(memo, "model_reconciler", None)
    if rec is not None:
        await rec.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def _model_event(event: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
    obj = event.get("object")
    if not obj:
        return
    await _reconciler(memo).observe_model(obj, deleted=event.get("type") == "DELETED")


@kopf.on.event(mb.ISVC_GROUP, mb.ISVC_VERSION, mb.ISVC_PLURAL)
async def _isvc_event(event: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
    obj = event.get("object")
    if not obj:
        return
    await _reconciler(memo).observe_isvc(obj, deleted=event.get("type") == "DELETED")

"""The Kubernetes edge shared by the controllers (kubernetes_asyncio).

- ``new_api_client()``: an ``ApiClient`` from ``KUBECONFIG`` (settings) or the
  in-cluster service account, with a bounded connection pool.
- ``emit_event(...)``: a core/v1 Event on an object (best effort: a failure to
  post an Event is logged, never raised — it must not fail a reconcile).
- ``patch_status`` / ``patch_object`` / ``merge_patch``: JSON merge patches of
  custom objects (the content type kubernetes_asyncio would not pick itself).
- ``is_missing_resource(exc)``: the API server answered 404 for the *kind*
  (a CRD that is not installed), as opposed to a missing object.

Never put secrets into Events, status or logs: callers pass only names.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any, cast

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from openledger.settings import Settings, get_settings

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
REPORTING_COMPONENT = "openledger.io/operator"


@functools.lru_cache(maxsize=1)
def identity() -> str:
    """This process, for Events and the leader Lease: pod name (hostname) and pid."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}-{os.getpid()}"


async def new_api_client(settings: Settings | None = None) -> ApiClient:
    """An API client from settings.kubeconfig, else in-cluster, else ~/.kube/config."""
    settings = settings or get_settings()
    cfg = client.Configuration()
    if settings.kubeconfig:
        await config.load_kube_config(config_file=settings.kubeconfig, client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = settings.kube_max_connections
    return ApiClient(configuration=cfg)


def is_missing_resource(exc: ApiException) -> bool:
    """404 because the resource *type* is unknown (CRD not installed), not the object."""
    if exc.status != 404:
        return False
    body = exc.body.decode() if isinstance(exc.body, bytes) else str(exc.body or "")
    # A missing object says `<plural>.<group> "name" not found`; an unknown type is
    # answered with a bare 404 page ("404 page not found") or without details.
    return '"details"' not in body or "page not found" in body


def api_error_message(exc: ApiException) -> str:
    """The API server's message (it names the field for validation errors)."""
    import json

    body = exc.body.decode() if isinstance(exc.body, bytes) else str(exc.body or "")
    try:
        return str(json.loads(body).get("message") or body)[:2000]
    except ValueError:
        return (body or str(exc.reason))[:2000]


async def emit_event(
    api: ApiClient,
    obj: Mapping[str, Any],
    reason: str,
    message: str,
    *,
    type_: str = "Normal",
    action: str = "Reconcile",
    component: str = "openledger-operator",
) -> None:
    """Post a core/v1 Event about ``obj``; logs and swallows failures."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    micro = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1_000_000:06d}Z"
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta.get('name')}.{time.time_ns():x}", "namespace": namespace},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "name": meta.get("name"),
            "namespace": namespace,
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "action": action,
        "source": {"component": component},
        "reportingComponent": REPORTING_COMPONENT,
        "reportingInstance": identity()[:128],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "eventTime": micro,
        "count": 1,
    }
    try:
        # The generated client accepts plain dicts as bodies (it serialises them as they are).
        # The reply is not needed: skip its deserialisation into a V1Event (a third of the cost).
        resp: Any = await client.CoreV1Api(api).create_namespaced_event(
            namespace, cast(Any, body), _request_timeout=10, _preload_content=False
        )
        status = int(resp.status)
        detail = (await resp.read())[:200] if status >= 300 else b""
        resp.release()
        if status >= 300:
            raise OSError(f"HTTP {status}: {detail.decode(errors='replace')}")
    except (ApiException, OSError, TimeoutError) as exc:
        log.warning(
            "event not posted",
            extra={
                "action": "event",
                "reason": reason,
                "object": f"{namespace}/{meta.get('name')}",
                "error": str(exc)[:200],
            },
        )


async def merge_patch(
    api: ApiClient,
    group: str,
    version: str,
    plural: str,
    namespace: str,
    name: str,
    body: Mapping[str, Any],
    *,
    status: bool = False,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """JSON merge patch of a custom object (or its status subresource); returns the new object."""
    objects = client.CustomObjectsApi(api)
    fn: Any = objects.patch_namespaced_custom_object_status if status else objects.patch_namespaced_custom_object
    result = await fn(
        group,
        version,
        namespace,
        plural,
        name,
        dict(body),
        _content_type=MERGE_PATCH,
        _request_timeout=timeout_s or get_settings().kube_request_timeout_s,
    )
    return dict(result)


async def patch_status(
    api: ApiClient, group: str, version: str, plural: str, namespace: str, name: str, status: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge-patch ``.status`` (the status subresource)."""
    return await merge_patch(api, group, version, plural, namespace, name, {"status": dict(status)}, status=True)

"""The Helm chart: lints, renders objects the real API server accepts, is hardened,
and its least-privilege RBAC is enough for the operator to do its work."""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from openledger.local.platform import LocalPlatform
from openledger.local.toolchain import KUBERNETES_VERSION, helm_binary
from tests.databases import fresh_database

from .conftest import Kube, Launcher, model_manifest, wait_for

CHART = Path(__file__).resolve().parents[3] / "charts" / "openledger"
KUBE_VERSION = KUBERNETES_VERSION.lstrip("v")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, check=check, timeout=120)


def render(*sets: str, namespace: str = "openledger", crds: bool = False) -> str:
    args = ["template", "ol", str(CHART), "-n", namespace, f"--kube-version={KUBE_VERSION}"]
    if crds:
        args.append("--include-crds")
    for item in sets:
        args += ["--set", item]
    return helm(*args).stdout


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_helm_lint_is_clean() -> None:
    result = helm("lint", str(CHART), "--strict", f"--kube-version={KUBE_VERSION}", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_values_schema_rejects_typos_and_bad_values() -> None:
    for bad in ("operator.replica=2", "operator.logLevel=LOUD", "metrics.port=0"):
        result = helm("template", "ol", str(CHART), f"--kube-version={KUBE_VERSION}", "--set", bad, check=False)
        assert result.returncode != 0, bad
        assert "schema" in result.stderr, result.stderr
    # The gateway section is optional and free-form (its templates own it).
    render("gateway.replicas=2")


@pytest.mark.parametrize("url", ["redis://:pw@redis:6379/0", "rediss://openledger:pw@redis:6380/0"])
def test_a_redis_password_is_refused_in_plain_values(url: str) -> None:
    """It would be rendered into every Deployment and the release: it belongs in redis.existingSecret."""
    result = helm("template", "ol", str(CHART), f"--kube-version={KUBE_VERSION}", "--set", f"redis.url={url}",
                  check=False)  # fmt: skip
    assert result.returncode != 0 and "redis" in result.stderr and "url" in result.stderr, result.stderr
    render("redis.url=rediss://openledger@redis:6380/0")  # a user without a password is fine


@pytest.mark.parametrize(
    "sets",
    [
        (),
        ("operator.watchNamespaces={ol-chart-a,ol-chart-b}", "metrics.serviceMonitor.enabled=true"),
        ("redis.existingSecret.name=redis", "operator.replicas=1", "serviceAccount.name=custom"),
        (
            "metrics.serviceMonitor.enabled=true",
            "gateway.serviceMonitor.enabled=true",
            "ledgerWorker.serviceMonitor.enabled=true",
            "redis.url=rediss://openledger@redis:6380/0?ssl_ca_certs=/etc/openledger/redis-tls/ca.crt",
            "redis.tls.caSecret.name=redis-ca",
            "redis.tls.clientSecret.name=redis-client",
            "gateway.autoscaling.enabled=false",
        ),
    ],
    ids=["defaults", "namespaced-with-servicemonitor", "secret-redis", "tls-redis-and-every-monitor"],
)
def test_rendered_chart_is_accepted_by_the_api_server(local_platform: LocalPlatform, sets: tuple[str, ...]) -> None:
    namespace = f"ol-chart-{secrets.token_hex(3)}"
    for ns in (namespace, "ol-chart-a", "ol-chart-b"):
        local_platform.kubectl("create", "namespace", ns, check=False)
    text = render(*sets, namespace=namespace, crds=True)
    result = local_platform.kubectl("apply", "--dry-run=server", "-f", "-", stdin=text, check=False)
    assert result.returncode == 0, result.stderr
    assert "deployment.apps/ol-openledger-operator created (server dry run)" in result.stdout


def test_chart_ships_the_generated_crds() -> None:
    crds = {d["metadata"]["name"] for d in objects(render(crds=True)) if d["kind"] == "CustomResourceDefinition"}
    assert crds == {"models.openledger.io", "agents.openledger.io", "rewardpools.openledger.io"}


def test_operator_deployment_is_hardened() -> None:
    [deployment] = [
        d for d in objects(render()) if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    ]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert deployment["spec"]["replicas"] == 2
    env = {e["name"]: e for e in container["env"]}
    assert env["OPENLEDGER_OPERATOR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert json.loads(env["OPENLEDGER_NAMESPACES"]["value"]) == []
    [service] = [
        d for d in objects(render()) if d["kind"] == "Service" and d["metadata"]["name"].endswith("-operator-metrics")
    ]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


@pytest.mark.parametrize("sets", [(), ("operator.watchNamespaces={team-a}",)], ids=["cluster", "namespaced"])
def test_rbac_names_every_group_resource_and_verb(sets: tuple[str, ...]) -> None:
    for obj in objects(render(*sets)):
        if obj["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in obj["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (obj["metadata"]["name"], rule)
            if "secrets" in rule["resources"]:
                # What the code does (controllers/agent.py, rewardpool.py): no update, no delete.
                assert sorted(rule["verbs"]) == ["create", "get", "list", "patch", "watch"]


def _token_kubeconfig(local_platform: LocalPlatform, namespace: str, sa: str, path: Path) -> Path:
    token = json.loads(
        local_platform.kubectl(
            "create",
            "--raw",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}),
        ).stdout
    )["status"]["token"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": local_platform.endpoints.kube_url, "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": sa, "namespace": namespace}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_charts_rbac_is_enough_for_the_operator(
    local_platform: LocalPlatform, kube: Kube, platform_env: dict[str, str], tmp_path: Path
) -> None:
    release_ns = f"ol-chart-{secrets.token_hex(3)}"
    watched = f"ol-chart-{secrets.token_hex(3)}"
    for ns in (release_ns, watched):
        local_platform.kubectl("create", "namespace", ns)
    text = render(f"operator.watchNamespaces={{{watched}}}", namespace=release_ns)
    rbac = [
        d
        for d in objects(text)
        if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    ]
    local_platform.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    sa = f"system:serviceaccount:{release_ns}:ol-openledger-operator"

    def can(verb: str, resource: str, ns: str) -> bool:
        return (
            local_platform.kubectl("auth", "can-i", verb, resource, "-n", ns, f"--as={sa}", check=False).stdout.strip()
            == "yes"
        )

    assert can("create", "inferenceservices.serving.kserve.io", watched)
    # OwnerReferencesPermissionEnforcement (on in the local API server) needs it for blockOwnerDeletion.
    assert can("update", "models.openledger.io/finalizers", watched)
    assert can("update", "agents.openledger.io/finalizers", watched)
    assert not can("update", "secrets", watched)
    assert can("patch", "models.openledger.io/status", watched)
    assert not can("create", "inferenceservices.serving.kserve.io", "default"), "only the watched namespace"
    assert not can("delete", "secrets", watched)
    assert not can("create", "pods", watched)

    kubeconfig = _token_kubeconfig(local_platform, release_ns, "ol-openledger-operator", tmp_path / "sa-kubeconfig")
    launcher = Launcher({**platform_env, "KUBECONFIG": str(kubeconfig)}, tmp_path)
    try:
        launcher(namespaces=[watched], operator_namespace=release_ns, leader_lease_name="ol-openledger-operator")
        kube.create_model(model_manifest("rbac", watched))
        wait_for(lambda: kube.isvc(watched, "rbac"), 30, "the InferenceService under the chart's RBAC")
        wait_for(lambda: kube.phase(watched, "rbac") == "Deploying", 30, "the status under the chart's RBAC")
        wait_for(lambda: any(e.reason == "InferenceServiceCreated" for e in kube.events(watched, "rbac")))
        kube.delete_model(watched, "rbac")
        wait_for(lambda: kube.model(watched, "rbac") is None, 30, "the finalizer under the chart's RBAC")
    finally:
        launcher.stop_all()


# ------------------------------------------------------------- the whole product


def _by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def _pod_specs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    specs = {n: d["spec"]["template"]["spec"] for n, d in _by_kind(objs, "Deployment").items()}
    specs |= {n: j["spec"]["template"]["spec"] for n, j in _by_kind(objs, "Job").items()}
    return specs | {n: p["spec"] for n, p in _by_kind(objs, "Pod").items()}


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_workload_of_the_product_is_in_the_chart() -> None:
    objs = objects(render())
    deployments = _by_kind(objs, "Deployment")
    assert set(deployments) == {
        "ol-openledger-operator",
        "ol-openledger-gateway",
        "ol-openledger-ledger-worker",
        "ol-openledger-claims",
    }
    assert {n: d["spec"]["template"]["spec"]["containers"][0]["args"][0] for n, d in deployments.items()} == {
        "ol-openledger-operator": "operator",
        "ol-openledger-gateway": "gateway",
        "ol-openledger-ledger-worker": "ledger-worker",
        "ol-openledger-claims": "claims-server",
    }
    pdbs = _by_kind(objs, "PodDisruptionBudget")
    assert {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for p in pdbs.values()} == {
        "operator",
        "gateway",
        "ledger-worker",
        "claims",
    }
    services = _by_kind(objs, "Service")
    assert services["ol-openledger-claims"]["spec"]["selector"]["app.kubernetes.io/component"] == "claims"
    assert services["ol-openledger-ledger-worker-metrics"]["spec"]["ports"][0]["targetPort"] == "metrics"
    monitors = _by_kind(
        objects(render("gateway.serviceMonitor.enabled=true", "ledgerWorker.serviceMonitor.enabled=true")),
        "ServiceMonitor",
    )
    assert set(monitors) == {"ol-openledger-gateway", "ol-openledger-ledger-worker"}


def test_ledger_worker_is_probed_hardened_and_leaves_the_schema_to_the_hook() -> None:
    pod = _pod_specs(objects(render()))["ol-openledger-ledger-worker"]
    [container] = pod["containers"]
    assert container["args"] == ["ledger-worker", "--no-upgrade"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8082, "metrics": 9110}
    assert _env(container)["OPENLEDGER_LEDGER_HEALTH_PORT"]["value"] == "8082"
    assert (
        container["securityContext"]["readOnlyRootFilesystem"] is True and pod["automountServiceAccountToken"] is False
    )
    assert pod["terminationGracePeriodSeconds"] > 30  # the worker drains its last batch for up to 30 s


def test_database_url_comes_only_from_a_secret() -> None:
    text = render("database.existingSecret.name=pg", "database.existingSecret.key=url")
    assert "postgresql://" not in text
    specs = _pod_specs(objects(text))
    readers = {"ol-openledger-operator", "ol-openledger-ledger-worker", "ol-openledger-claims", "ol-openledger-migrate"}
    for name in readers:
        [container] = specs[name]["containers"]
        assert _env(container)["OPENLEDGER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "pg", "key": "url"}
    result = helm(
        "template", "ol", str(CHART), f"--kube-version={KUBE_VERSION}", "--set", "database.url=x", check=False
    )
    assert result.returncode != 0 and "database" in result.stderr


def test_no_process_starts_against_an_old_schema() -> None:
    objs = objects(render())
    specs = _pod_specs(objs)
    for name in ("ol-openledger-operator", "ol-openledger-ledger-worker", "ol-openledger-claims"):
        [init] = specs[name]["initContainers"]
        assert init["args"][:2] == ["db", "wait"], name
        assert "OPENLEDGER_DATABASE_URL" in _env(init)
    migrate = _by_kind(objs, "Job")["ol-openledger-migrate"]
    assert migrate["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert migrate["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    crds = _by_kind(objs, "Job")["ol-openledger-crds"]
    # CRDs first (lower weight), then the schema, then the workloads.
    assert int(crds["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        migrate["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert not any(
        o["metadata"]["name"].endswith("-migrate") for o in objects(render("database.migrations.enabled=false"))
    )


def test_one_usage_stream_for_operator_gateway_and_worker() -> None:
    specs = _pod_specs(objects(render("usageStream=team:usage")))
    for name in ("ol-openledger-operator", "ol-openledger-gateway", "ol-openledger-ledger-worker"):
        assert _env(specs[name]["containers"][0])["OPENLEDGER_USAGE_STREAM"]["value"] == "team:usage", name


def test_redis_tls_material_is_mounted_where_the_url_points() -> None:
    objs = objects(render("redis.tls.caSecret.name=redis-ca", "redis.tls.clientSecret.name=redis-client"))
    specs = _pod_specs(objs)
    for name in (
        "ol-openledger-operator",
        "ol-openledger-gateway",
        "ol-openledger-ledger-worker",
        "ol-openledger-test-redis",
    ):
        pod = specs[name]
        [container] = pod["containers"]
        assert {"name": "redis-tls", "mountPath": "/etc/openledger/redis-tls", "readOnly": True} in container[
            "volumeMounts"
        ]
        [volume] = [v for v in pod["volumes"] if v["name"] == "redis-tls"]
        sources = [s["secret"]["name"] for s in volume["projected"]["sources"]]
        assert sources == ["redis-ca", "redis-client"], name
    assert not any(v["name"] == "redis-tls" for v in _pod_specs(objects(render()))["ol-openledger-gateway"]["volumes"])


def test_helm_test_pods_check_gateway_leader_database_and_redis() -> None:
    pods = _by_kind(objects(render()), "Pod")
    assert {n: p["spec"]["containers"][0]["args"][:2] for n, p in pods.items()} == {
        "ol-openledger-test-gateway": ["check", "gateway"],
        "ol-openledger-test-leader": ["check", "leader"],
        "ol-openledger-test-database": ["check", "database"],
        "ol-openledger-test-redis": ["check", "redis"],
    }
    assert all(p["metadata"]["annotations"]["helm.sh/hook"] == "test" for p in pods.values())
    assert (
        pods["ol-openledger-test-gateway"]["spec"]["containers"][0]["args"][2]
        == "http://ol-openledger-gateway.openledger.svc:80"
    )
    # The leader check reads one Lease under an account of its own (tests/integration/cluster covers its RBAC).
    assert pods["ol-openledger-test-leader"]["spec"]["serviceAccountName"] == "ol-openledger-test"


def test_notes_tell_the_gateway_url_the_key_and_the_prerequisites(local_platform: LocalPlatform) -> None:
    kubeconfig = f"--kubeconfig={local_platform.endpoints.kubeconfig}"
    text = helm("install", "ol", str(CHART), "-n", "openledger", "--dry-run=client", kubeconfig).stdout
    notes = text[text.index("NOTES:") :]
    assert "http://ol-openledger-gateway.openledger.svc:80/v1" in notes
    assert "get secret <agent>-credentials -o jsonpath='{.data.apiKey}' | base64 -d" in notes
    for prerequisite in ("appendonly yes", "appendfsync always", "maxmemory-policy noeviction", "PostgreSQL", "KServe"):
        assert prerequisite in notes


def test_crds_apply_restores_an_old_schema_under_the_hooks_rbac(local_platform: LocalPlatform, tmp_path: Path) -> None:
    """`helm upgrade` skips crds/; the hook's `openledger crds apply` (its own RBAC only) brings them current."""
    namespace = f"ol-crds-{secrets.token_hex(3)}"
    local_platform.kubectl("create", "namespace", namespace)
    hook = [
        o
        for o in objects(render(namespace=namespace))
        if o["metadata"]["name"] == "ol-openledger-crds" and o["kind"] != "Job"
    ]
    local_platform.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(hook))
    kubeconfig = _token_kubeconfig(local_platform, namespace, "ol-openledger-crds", tmp_path / "crds-kubeconfig")
    # An "old release": the Agent CRD without one of today's fields.
    current = json.loads(local_platform.kubectl("get", "crd", "agents.openledger.io", "-o", "json").stdout)
    props = current["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    dropped = sorted(props)[0]
    patch = [{"op": "remove", "path": f"/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/{dropped}"}]
    local_platform.kubectl("patch", "crd", "agents.openledger.io", "--type=json", "-p", json.dumps(patch))

    def served_fields() -> set[str]:
        crd = json.loads(local_platform.kubectl("get", "crd", "agents.openledger.io", "-o", "json").stdout)
        return set(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])

    assert dropped not in served_fields()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    argv = [sys.executable, "-m", "openledger.cli", "crds", "apply"]
    dry = subprocess.run([*argv, "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert dropped not in served_fields()  # a dry run changes nothing
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (
        "applied and established: models.openledger.io, agents.openledger.io, rewardpools.openledger.io" in done.stdout
    )
    assert served_fields() == set(props)
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr  # idempotent

    # A field of an older schema owned by another field manager (helm's `install` of crds/) is
    # not removed by an apply alone: the command replaces what still differs.
    legacy = json.loads(local_platform.kubectl("get", "crd", "agents.openledger.io", "-o", "json").stdout)
    legacy["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["legacyField"] = {
        "type": "string"
    }
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        legacy["metadata"].pop(key, None)
    legacy.pop("status", None)
    local_platform.kubectl(
        "apply", "--server-side", "--field-manager=helm", "--force-conflicts", "-f", "-", stdin=json.dumps(legacy)
    )
    assert "legacyField" in served_fields()
    replaced = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert replaced.returncode == 0, replaced.stderr
    assert served_fields() == set(props)


def test_helm_test_checks_pass_on_real_components_and_fail_clearly(
    local_platform: LocalPlatform, database_url: str, redis_url: str
) -> None:
    with fresh_database(database_url, "check") as migrated:
        _check_commands(local_platform, migrated, redis_url)


def _check_commands(local_platform: LocalPlatform, database_url: str, redis_url: str) -> None:
    env = {**os.environ, "OPENLEDGER_DATABASE_URL": database_url, "OPENLEDGER_REDIS_URL": redis_url}

    def check(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "openledger.cli", "check", *args]
        return subprocess.run(argv, env={**env, **extra}, capture_output=True, text=True, timeout=120)

    database = check("database")
    assert database.returncode == 0 and "schema is current" in database.stdout, database.stderr
    redis_ok = check("redis", "--durability", "none")
    assert redis_ok.returncode == 0, redis_ok.stderr
    unreachable = check("redis", OPENLEDGER_REDIS_URL="redis://127.0.0.1:1/0")
    assert unreachable.returncode == 1 and "redis://127.0.0.1:1/0" in unreachable.stderr
    gateway = check("gateway", "http://127.0.0.1:1")
    assert gateway.returncode == 1 and "gateway http://127.0.0.1:1" in gateway.stderr

    namespace = f"ol-lease-{secrets.token_hex(3)}"
    local_platform.kubectl("create", "namespace", namespace)
    kube = {"KUBECONFIG": str(local_platform.endpoints.kubeconfig)}
    missing = check("leader", "--lease", "op", "--namespace", namespace, **kube)
    assert missing.returncode != 0
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "op", "namespace": namespace},
        "spec": {"holderIdentity": "op-0-1", "leaseDurationSeconds": 15, "renewTime": now, "acquireTime": now},
    }
    local_platform.kubectl("apply", "-f", "-", stdin=json.dumps(lease))
    leading = check("leader", "--lease", "op", "--namespace", namespace, **kube)
    assert leading.returncode == 0 and "operator leader op-0-1" in leading.stdout, leading.stderr
    stale = "2020-01-01T00:00:00.000000Z"
    lease["spec"] |= {"renewTime": stale, "acquireTime": stale}
    local_platform.kubectl("apply", "-f", "-", stdin=json.dumps(lease))
    dead = check("leader", "--lease", "op", "--namespace", namespace, **kube)
    assert dead.returncode == 1 and "last renewed" in dead.stderr


def _leaf_values(values: Any, path: str = "") -> list[str]:
    if isinstance(values, dict) and values:
        return [leaf for key, sub in values.items() for leaf in _leaf_values(sub, f"{path}.{key}" if path else key)]
    return [path]


def test_chart_readme_documents_every_value() -> None:
    documented = set()
    patterns = []  # a row like `a.<name>` documents every key of every entry of the map `a`
    for line in (CHART / "README.md").read_text().splitlines():
        if line.startswith("| `"):
            name = line.split("`")[1]
            documented.add(name)
            if "<" in name:
                patterns.append(re.compile(re.sub("<[^>]+>", "[^.]+", re.escape(name)) + r"\..+"))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [
        leaf for leaf in _leaf_values(values) if leaf not in documented and not any(p.fullmatch(leaf) for p in patterns)
    ]
    assert not missing, f"charts/openledger/README.md lacks rows for {missing}"


def test_the_operator_knows_the_gateway_timeouts_its_revocations_depend_on() -> None:
    """A revoked Agent's in-flight reservations must outlive the gateway's requests."""
    docs = objects(render("gateway.upstreamTimeoutSeconds=300"))
    operator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("operator"))
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OPENLEDGER_GATEWAY_UPSTREAM_TIMEOUT_S"] == "300"
    assert {"OPENLEDGER_GATEWAY_REDIS_TIMEOUT_S", "OPENLEDGER_GATEWAY_DURABILITY_TIMEOUT_MS"} <= set(env)


def test_no_pod_gets_service_links_that_would_collide_with_settings() -> None:
    """A Service named <release>-gateway makes Kubernetes inject OPENLEDGER_GATEWAY_PORT=tcp://…,
    which the settings then refuse: every pod of the chart turns service links off."""
    checks = helm("template", "ol", str(CHART), f"--kube-version={KUBE_VERSION}", "--show-only",
                  "templates/tests/checks.yaml").stdout  # fmt: skip
    specs = _pod_specs(objects(render()) + objects(checks))
    assert len(specs) >= 6, list(specs)
    for name, spec in specs.items():
        assert spec.get("enableServiceLinks") is False, name


def test_large_numbers_render_as_integers() -> None:
    """8388608 must not become 8.388608e+06 (the settings would refuse it)."""
    gateway = next(
        d for d in objects(render()) if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("gateway")
    )
    env = {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OPENLEDGER_GATEWAY_MAX_BODY_BYTES"] == "8388608"

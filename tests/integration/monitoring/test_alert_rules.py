"""The chart's alerts (templates/prometheusrule.yaml), checked by the real tools.

``promtool check rules`` on the rule groups ``helm template`` renders; ``promtool test rules``
runs rules/*_test.yaml, where every alert has a case that fires (labels and annotations
checked) and one that stays quiet; the API server, with the Prometheus operator's real CRD,
accepts the rendered PrometheusRule; every metric a rule reads is declared on the product's
registry; each alert has its runbook in docs/runbooks/.
"""

from __future__ import annotations

import importlib
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from openledger.local.platform import LocalPlatform
from openledger.local.toolchain import prometheus_binaries
from openledger.metrics import REGISTRY
from tests.integration.model.test_chart import objects, render

RULE_TESTS = Path(__file__).parent / "rules"
RUNBOOKS = Path(__file__).resolve().parents[3] / "docs" / "runbooks"
ENABLED = "monitoring.prometheusRule.enabled=true"
METRIC_MODULES = (
    "openledger.gateway.metrics",
    "openledger.settlement.metrics",
    "openledger.settlement.ledger.metrics",
    "openledger.controllers.metrics",
)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def prometheus_rule(*sets: str) -> dict[str, Any]:
    [rule] = [d for d in objects(render(ENABLED, *sets)) if d["kind"] == "PrometheusRule"]
    return rule


def alerts(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


@pytest.fixture(scope="module")
def promtool() -> Path:
    return prometheus_binaries()["promtool"]


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rules.yaml (the rendered spec: Prometheus' rule-file format) next to copies of the unit tests."""
    folder = tmp_path_factory.mktemp("rules")
    (folder / "rules.yaml").write_text(yaml.safe_dump(prometheus_rule()["spec"], sort_keys=False))
    for test in RULE_TESTS.glob("*_test.yaml"):
        shutil.copy(test, folder / test.name)
    return folder


def promtool_run(promtool: Path, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], cwd=folder, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_accepts_the_rendered_rules(promtool: Path, rules_dir: Path) -> None:
    result = promtool_run(promtool, rules_dir, "check", "rules", "rules.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts(prometheus_rule()))} rules found" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_rule(promtool: Path, tmp_path: Path) -> None:
    """The check above can fail: a rule with bad PromQL is refused."""
    spec = prometheus_rule()["spec"]
    spec["groups"][0]["rules"][0]["expr"] = "max(openledger_ledger_ingest_lag_seconds > "
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    result = promtool_run(promtool, tmp_path, "check", "rules", "rules.yaml")
    assert result.returncode != 0 and "OpenLedgerIngestLagHigh" not in result.stdout


def test_every_alert_fires_in_one_unit_test_and_stays_quiet_in_another(promtool: Path, rules_dir: Path) -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS.glob("*_test.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case["alert_rule_test"]:
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts(prometheus_rule()))
    assert fires == names, f"no firing case: {names - fires}; unknown: {fires - names}"
    assert quiet == names, f"no quiet case: {names - quiet}; unknown: {quiet - names}"
    tests = sorted(p.name for p in rules_dir.glob("*_test.yaml"))
    result = promtool_run(promtool, rules_dir, "test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_rules_read_is_declared_by_the_product() -> None:
    for module in METRIC_MODULES:
        importlib.import_module(module)
    exposed = {family.name + suffix for family in REGISTRY.collect() for suffix in SUFFIXES.get(family.type, ("",))}
    exprs = [rule["expr"] for rule in alerts(prometheus_rule()).values()]
    used = {name for expr in exprs for name in re.findall(r"\bopenledger_\w+", expr)}
    assert len(used) >= 15
    assert used <= exposed, f"rules read metrics nobody declares: {sorted(used - exposed)}"


def test_every_alert_has_a_runbook_and_severity_summary_description() -> None:
    for name, rule in alerts(prometheus_rule()).items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        url = rule["annotations"]["runbook_url"]
        assert url == f"https://github.com/openledger/openledger/blob/main/docs/runbooks/{name}.md"
        text = (RUNBOOKS / f"{name}.md").read_text()
        for section in ("## What it means", "## How to confirm", "## What to do", "## Never"):
            assert section in text, f"{name}.md lacks {section!r}"


def test_the_rule_is_off_by_default_and_its_values_reach_it() -> None:
    assert not [d for d in objects(render()) if d["kind"] == "PrometheusRule"]
    rule = prometheus_rule(
        "monitoring.prometheusRule.labels.release=kube-prometheus-stack",
        "monitoring.prometheusRule.additionalLabels.team=payments",
        "monitoring.prometheusRule.runbookBaseUrl=https://runbooks.example/ol",
        "monitoring.prometheusRule.interval=30s",
        "monitoring.prometheusRule.alerts.OpenLedgerIngestLagHigh.threshold=1000000",
        "monitoring.prometheusRule.alerts.OpenLedgerIngestLagHigh.severity=critical",
        "monitoring.prometheusRule.alerts.OpenLedgerAgentNearHardBudget.enabled=false",
        "operator.leaderElection.leaseDurationSeconds=30",
    )
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert {g["interval"] for g in rule["spec"]["groups"]} == {"30s"}
    by_name = alerts(rule)
    assert "OpenLedgerAgentNearHardBudget" not in by_name
    lag = by_name["OpenLedgerIngestLagHigh"]
    assert lag["expr"] == "max(openledger_ledger_ingest_lag_seconds) > 1000000"  # no 1e+06
    assert lag["labels"] == {"severity": "critical", "team": "payments"}
    assert lag["annotations"]["runbook_url"] == "https://runbooks.example/ol/OpenLedgerIngestLagHigh.md"
    assert by_name["OpenLedgerOperatorNoLeader"]["for"] == "90s"  # the Lease plus two scrapes
    unelected = alerts(prometheus_rule("operator.leaderElection.enabled=false"))
    assert "OpenLedgerOperatorNoLeader" not in unelected  # a single replica without election has no leader gauge


@pytest.mark.parametrize(
    "bad",
    [
        "alerts.OpenLedgerIngestLagHigh.severity=page",
        "alerts.OpenLedgerIngestLagHig.enabled=false",  # a typo in an alert's name
        "alerts.OpenLedgerChainErrors.window=ten minutes",
        "interval=often",
    ],
)
def test_values_schema_refuses_a_bad_alert_setting(bad: str) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        render(ENABLED, f"monitoring.prometheusRule.{bad}")
    assert "schema" in failed.value.stderr, failed.value.stderr


def test_the_api_server_accepts_the_rendered_prometheusrule(local_platform: LocalPlatform, kubeconfig: Path) -> None:
    """Server-side dry run against the Prometheus operator's real CRD (applied by the local platform)."""
    namespace = f"ol-rules-{secrets.token_hex(3)}"
    local_platform.kubectl("create", "namespace", namespace)
    text = render(ENABLED, "monitoring.prometheusRule.additionalLabels.team=payments", namespace=namespace)
    rule = yaml.safe_dump(next(d for d in objects(text) if d["kind"] == "PrometheusRule"))
    result = local_platform.kubectl("apply", "--dry-run=server", "-f", "-", stdin=rule, check=False)
    assert result.returncode == 0, result.stderr
    assert "prometheusrule.monitoring.coreos.com/ol-openledger-alerts created (server dry run)" in result.stdout
    # The CRD's validation is really applied: a `for` that is no duration is refused.
    broken = rule.replace("for: 5m", "for: five minutes", 1)
    refused = local_platform.kubectl("apply", "--dry-run=server", "-f", "-", stdin=broken, check=False)
    assert refused.returncode != 0 and "for" in refused.stderr, refused.stdout + refused.stderr

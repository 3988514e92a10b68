"""The Grafana dashboards (charts/openledger/dashboards/*.json) and their ConfigMaps.

Structure only: unique ids, every panel queries through the ``${datasource}`` variable, every
variable a query uses is defined, every metric a query names is declared by the product. Whether
each query returns data from the real processes is ``tests/e2e/test_dashboards.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from openledger.local.toolchain import KUBERNETES_VERSION, helm_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "openledger"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
EXPECTED = {"gateway", "money", "operator"}
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}
# A metric name in PromQL: an identifier that is not a function, keyword or label (followed by `(` or `=`).
_NAME = re.compile(r"(?<![\w$\"{,=~])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*[(=!~])")
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "le", "inf", "nan"}  # fmt: skip


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found += panel.get("panels") or []
    return found


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    without_labels = re.sub(r"\{[^}]*\}", "", without_ranges)
    without_groupings = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_labels)
    return {
        n for n in _NAME.findall(without_groupings) if n.lower() not in _PROMQL_WORDS and not n[0].isdigit()
    }  # fmt: skip


def variable_query(query: str) -> tuple[str, str]:
    """``label_values(SELECTOR, LABEL)`` → (selector, label)."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert match, f"not a label_values(selector, label) query: {query!r}"
    return match[1], match[2]


def declared_metrics() -> set[str]:
    """Every sample name the product's registry can expose (counters with ``_total``, histograms' series)."""
    import openledger.controllers.metrics
    import openledger.gateway.metrics
    import openledger.settlement.ledger.metrics
    import openledger.settlement.metrics  # noqa: F401 - each declares its metrics on REGISTRY
    from openledger.metrics import REGISTRY

    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
        names.update(sample.name for sample in family.samples)
    return names


def test_the_three_dashboards_ship() -> None:
    assert {p.stem for p in DASHBOARDS} == EXPECTED


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_model_is_well_formed(path: Path) -> None:
    board = load(path)
    assert board["uid"] == f"openledger-{path.stem}" and board["title"].startswith("OpenLedger / ")
    assert 36 <= board["schemaVersion"] <= 41, board["schemaVersion"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids {sorted(ids)}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name, var in variables.items():
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
            _, label = variable_query(var["query"]["query"])
            assert label == name, f"variable {name} lists label {label}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_queries_prometheus_through_the_datasource_variable(path: Path) -> None:
    board = load(path)
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    queries = [p for p in panels(board) if p["type"] != "row"]
    assert len(queries) >= 8, f"{path.name}: only {len(queries)} panels"
    for panel in queries:
        where = f"{path.name} panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == datasource, where
        assert panel["targets"], f"{where}: no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["datasource"] == datasource, where
            assert target["expr"].strip(), f"{where}: empty expr"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_panels_tile_the_grid_without_overlapping(path: Path) -> None:
    taken: dict[tuple[int, int], int] = {}
    for panel in load(path)["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, (panel["id"], pos)
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{path.name}: panels {taken.get((x, y))} and {panel['id']} overlap"
                taken[(x, y)] = panel["id"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_queries_use_only_defined_variables(path: Path) -> None:
    board = load(path)
    defined = {v["name"] for v in board["templating"]["list"]} | GRAFANA_VARIABLES
    texts = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    texts += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    for text in texts:
        used = set(re.findall(r"\$\{?(\w+)", text))
        assert used <= defined, f"{path.name}: {text!r} uses undefined {sorted(used - defined)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_metric_a_query_names_is_declared_by_the_product(path: Path) -> None:
    declared = declared_metrics()
    board = load(path)
    texts = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    texts += [variable_query(v["query"]["query"])[0] for v in board["templating"]["list"] if v["type"] == "query"]
    unknown = {name: text for text in texts for name in metric_names(text) if name not in declared}
    assert not unknown, f"{path.name}: metrics no product module declares: {unknown}"


def test_metric_names_are_read_from_a_query() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{namespace=~"$namespace", code=~"5.."}[5m])))'
        " / on (job) group_left(version) b_info and ignoring (x) c_total offset 5m or vector(0)"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_info", "c_total"}


# ----------------------------------------------------------------- the chart


def helm_template(*sets: str) -> list[dict[str, Any]]:
    args = [str(helm_binary()), "template", "ol", str(CHART), "-n", "openledger"]
    args.append(f"--kube-version={KUBERNETES_VERSION.lstrip('v')}")
    for item in sets:
        args += ["--set", item]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def dashboard_config_maps(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap" and "-dashboard-" in o["metadata"]["name"]
    }


def test_dashboards_are_not_rendered_by_default() -> None:
    assert dashboard_config_maps(helm_template()) == {}


def test_each_dashboard_is_a_config_map_with_the_sidecar_label() -> None:
    maps = dashboard_config_maps(helm_template("monitoring.dashboards.enabled=true"))
    assert set(maps) == {f"ol-openledger-dashboard-{name}" for name in EXPECTED}
    for path in DASHBOARDS:
        config_map = maps[f"ol-openledger-dashboard-{path.stem}"]
        assert config_map["metadata"]["namespace"] == "openledger"
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert "annotations" not in config_map["metadata"]
        (key, text), *rest = config_map["data"].items()
        assert not rest and key == f"openledger-{path.stem}.json"
        assert json.loads(text) == load(path), f"{key}: not the file as it is"


def test_sidecar_label_namespace_labels_and_annotations_are_configurable() -> None:
    maps = dashboard_config_maps(
        helm_template(
            "monitoring.dashboards.enabled=true",
            "monitoring.dashboards.label.key=example.com/dashboard",
            "monitoring.dashboards.label.value=yes",
            "monitoring.dashboards.namespace=grafana",
            "monitoring.dashboards.labels.team=sre",
            "monitoring.dashboards.annotations.grafana_folder=OpenLedger",
        )
    )
    assert len(maps) == len(EXPECTED)
    for config_map in maps.values():
        meta = config_map["metadata"]
        assert meta["namespace"] == "grafana"
        assert meta["labels"]["example.com/dashboard"] == "yes" and "grafana_dashboard" not in meta["labels"]
        assert meta["labels"]["team"] == "sre" and meta["labels"]["app.kubernetes.io/part-of"] == "openledger"
        assert meta["annotations"] == {"grafana_folder": "OpenLedger"}


def test_an_invalid_sidecar_label_key_is_refused_naming_the_field() -> None:
    args = [str(helm_binary()), "template", "ol", str(CHART), f"--kube-version={KUBERNETES_VERSION.lstrip('v')}"]
    args += ["--set", "monitoring.dashboards.enabled=true", "--set", "monitoring.dashboards.label.key=not a key"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0 and "/monitoring/dashboards/label/key" in out.stderr, out.stderr

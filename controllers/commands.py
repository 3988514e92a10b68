"""CLI commands of the control plane: ``openledger crds …`` and ``openledger operator``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from openledger.local.platform import Endpoints
    from openledger.local.product import ProductProcess

# controllers/ sits at the project root; crds/ beside it. The Helm chart ships the same files.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CRD_DIR = PROJECT_ROOT / "crds"
CHART_CRD_DIR = PROJECT_ROOT / "charts" / "openledger" / "crds"


def generated_files() -> dict[str, str]:
    """File name → YAML text of every generated CRD."""
    from openledger.controllers.api import crd_documents, render_yaml

    return {name: render_yaml(doc) for name, doc in crd_documents().items()}


def stale_files(out_dir: Path) -> list[str]:
    """Generated files that are missing or differ in ``out_dir``."""
    stale = []
    for name, text in generated_files().items():
        path = out_dir / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
    return stale


@click.group()
def crds() -> None:
    """The CustomResourceDefinitions (generated from controllers/api.py)."""


@crds.command("generate")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=DEFAULT_CRD_DIR, show_default=True)
@click.option("--check", is_flag=True, help="Only check that the files are up to date; exit 1 when stale.")
@click.option("--chart/--no-chart", default=True, help="Also write the Helm chart's copy (charts/openledger/crds).")
def crds_generate(out_dir: Path, check: bool, chart: bool) -> None:
    """Write crds/*.yaml (and the chart's copy) from the API definition in code."""
    dirs = [out_dir, *([CHART_CRD_DIR] if chart else [])]
    if check:
        stale = [str(d / name) for d in dirs for name in stale_files(d)]
        if stale:
            click.echo("stale CRD files (run `openledger crds generate`): " + ", ".join(stale), err=True)
            sys.exit(1)
        click.echo("CRDs are up to date")
        return
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in generated_files().items():
            (directory / name).write_text(text)
            click.echo(f"wrote {directory / name}")


@click.command("operator")
@click.option("--namespace", "-n", "namespaces", multiple=True, help="Watch only these namespaces (repeatable).")
def operator_command(namespaces: tuple[str, ...]) -> None:
    """Run the operator (Model, Agent and RewardPool controllers)."""
    from openledger.controllers.runner import run_operator

    sys.exit(run_operator(list(namespaces) or None))


def operator_process(endpoints: Endpoints, port: Callable[[str], int]) -> ProductProcess:
    """``make up``: the operator as a product process (``openledger.local.product``)."""
    from openledger.local.product import ProductProcess

    health = port("operator-health")
    metrics = port("operator-metrics")
    claims = port("operator-claims")
    return ProductProcess(
        name="operator",
        args=["operator"],
        env={
            "OPENLEDGER_HEALTH_PORT": str(health),
            "OPENLEDGER_METRICS_PORT": str(metrics),
            "OPENLEDGER_CLAIMS_PORT": str(claims),
            "OPENLEDGER_OPERATOR_NAMESPACE": "default",
        },
        ready_url=f"http://127.0.0.1:{health}/readyz",
        exports={
            "OPERATOR_METRICS_URL": f"http://127.0.0.1:{metrics}/metrics",
            "OPERATOR_HEALTH_URL": f"http://127.0.0.1:{health}/healthz",
            "CLAIMS_URL": f"http://127.0.0.1:{claims}",
        },
    )

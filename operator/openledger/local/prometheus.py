"""A private Prometheus server that scrapes the local product's processes.

Used by the dashboard tests: it runs the ``prometheus`` binary built from its Go module
(:func:`openledger.local.toolchain.prometheus_binaries`) as one more process of a
:class:`~openledger.local.platform.LocalPlatform` — on a free loopback port, its data
under the platform's folder, readiness checked by a real request, stopped with the
platform (and killed with pytest through ``PR_SET_PDEATHSIG``).

The scrape configuration is generated from the targets given (pure: :func:`scrape_config`);
:func:`query` and :func:`label_values` are thin clients of Prometheus' HTTP API.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openledger.local import toolchain
from openledger.local.platform import LocalPlatform
from openledger.local.processes import ManagedProcess, wait_ready
from openledger.local.product import ProductProcess

# A series a process creates at its first increment (a labelled counter, a histogram) has no
# earlier sample, so rate() and increase() cannot see that first increment; with this feature
# Prometheus stores a 0 at the series' creation time (prometheus-client's `_created`), as a
# long-running Prometheus would have seen it before: what a test of a few seconds needs.
DEFAULT_FEATURES = ("created-timestamp-zero-ingestion",)


class PrometheusError(RuntimeError):
    """Prometheus refused a query (bad expression) or could not be reached; the message says which."""


@dataclass(frozen=True)
class ScrapeTarget:
    """One ``/metrics`` endpoint: its job name and ``host:port``."""

    job: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PrometheusServer:
    url: str
    process: ManagedProcess
    config_path: Path


def product_targets(processes: Iterable[ProductProcess], labels: Mapping[str, str] | None = None) -> list[ScrapeTarget]:
    """A target per product process that exports a ``*METRICS_URL`` (job = the process's name).

    ``labels`` are added to every series, as Kubernetes service discovery adds ``namespace``.
    """
    targets = []
    for process in processes:
        urls = sorted({v for k, v in process.exports.items() if k.endswith("METRICS_URL")})
        for url in urls:
            parsed = urllib.parse.urlsplit(url)
            if parsed.hostname is None or parsed.port is None:
                raise ValueError(f"{process.name}: metrics URL {url!r} has no host:port")
            address = f"{parsed.hostname}:{parsed.port}"
            targets.append(ScrapeTarget(job=process.name, address=address, labels=dict(labels or {})))
    return targets


def scrape_config(targets: Iterable[ScrapeTarget], interval_s: float) -> dict[str, Any]:
    """Prometheus' configuration: one job per target name, scraped every ``interval_s``."""
    if interval_s <= 0:
        raise ValueError(f"interval_s: must be positive, got {interval_s}")
    interval = f"{int(interval_s * 1000)}ms"
    jobs: dict[str, list[ScrapeTarget]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append(target)
    if not jobs:
        raise ValueError("targets: at least one scrape target is needed")
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": [t.address], "labels": t.labels} for t in members],
            }
            for job, members in jobs.items()
        ],
    }


def start_prometheus(
    platform: LocalPlatform,
    targets: Iterable[ScrapeTarget],
    *,
    interval_s: float = 1.0,
    name: str = "prometheus",
    timeout_s: float = 60.0,
    features: Sequence[str] = DEFAULT_FEATURES,
) -> PrometheusServer:
    """Start Prometheus as a process of ``platform``; returns once ``/-/ready`` answers.

    Stop it with ``platform.stop_component(name)`` (or with the platform). ``features`` are
    Prometheus' ``--enable-feature`` names.
    """
    binary = toolchain.prometheus_binaries()["prometheus"]
    home = platform.base_dir / name
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / "prometheus.yml"
    # JSON is YAML: no YAML library needed for a generated file.
    config_path.write_text(json.dumps(scrape_config(targets, interval_s), indent=2))
    port = platform.port(name)
    argv = [
        str(binary),
        f"--config.file={config_path}",
        f"--storage.tsdb.path={home / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
        *(f"--enable-feature={feature}" for feature in features),
    ]
    process = platform.spawn(name, argv)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, lambda: _get(url + "/-/ready", 1.0).startswith("Prometheus Server is Ready"), timeout_s)
    return PrometheusServer(url=url, process=process, config_path=config_path)


def _get(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return str(resp.read().decode())


def _api(url: str, timeout_s: float) -> Any:
    """GET an ``/api/v1`` URL; a refused expression raises PrometheusError with Prometheus' own message."""
    try:
        body = _get(url, timeout_s)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            message = json.loads(detail).get("error", detail)
        except ValueError:
            message = detail
        raise PrometheusError(f"HTTP {exc.code}: {message}") from None
    except OSError as exc:
        raise PrometheusError(f"Prometheus unreachable at {url.split('/api/')[0]}: {exc}") from None
    reply = json.loads(body)
    if reply.get("status") != "success":
        raise PrometheusError(str(reply.get("error") or reply))
    return reply["data"]


def query(url: str, expr: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Evaluate ``expr`` now (``/api/v1/query``); the result as a list of series (a scalar is one)."""
    data = _api(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout_s)
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return list(data["result"])


def label_values(url: str, label: str, match: str, timeout_s: float = 10.0) -> list[str]:
    """Values of ``label`` on the series ``match`` selects (Grafana's ``label_values(match, label)``)."""
    params = urllib.parse.urlencode({"match[]": match})
    return [str(v) for v in _api(f"{url}/api/v1/label/{urllib.parse.quote(label)}/values?{params}", timeout_s)]


def targets_up(url: str, timeout_s: float = 10.0) -> dict[str, bool]:
    """``job/instance`` → whether its last scrape succeeded."""
    data = _api(f"{url}/api/v1/targets?state=active", timeout_s)
    return {f"{t['labels']['job']}/{t['labels']['instance']}": t["health"] == "up" for t in data["activeTargets"]}


__all__ = [
    "DEFAULT_FEATURES",
    "PrometheusError",
    "PrometheusServer",
    "ScrapeTarget",
    "label_values",
    "product_targets",
    "query",
    "scrape_config",
    "start_prometheus",
    "targets_up",
]

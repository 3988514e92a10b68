"""The local Prometheus (``openledger.local.prometheus``): a real server scraping a real endpoint.

Each test runs its own bare ``LocalPlatform`` (no components: only Prometheus is spawned through it).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from openledger.local import prometheus
from openledger.local.platform import LocalPlatform
from openledger.local.processes import ComponentError, free_port, pid_alive
from tests.waiting import wait_for


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[LocalPlatform]:
    local = LocalPlatform(tmp_path, detached=False, components=[])
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def exporter() -> Iterator[prometheus.ScrapeTarget]:
    registry = CollectorRegistry()
    Counter("demo_requests", "Requests.", ["code"], registry=registry).labels("200").inc(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield prometheus.ScrapeTarget("demo", f"127.0.0.1:{port}", {"namespace": "ol"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_prometheus_scrapes_the_targets_and_answers_queries(
    platform: LocalPlatform, exporter: prometheus.ScrapeTarget
) -> None:
    server = prometheus.start_prometheus(platform, [exporter], interval_s=0.5)
    assert server.url.startswith("http://127.0.0.1:")
    wait_for(lambda: prometheus.targets_up(server.url) == {f"demo/{exporter.address}": True}, 20, "a scrape")
    series = wait_for(lambda: prometheus.query(server.url, 'demo_requests_total{namespace="ol"}'), 20, "the series")
    assert [(s["metric"]["code"], s["value"][1]) for s in series] == [("200", "3")]
    assert prometheus.label_values(server.url, "code", "demo_requests_total") == ["200"]
    assert prometheus.query(server.url, "1 + 1")[0]["value"][1] == "2"
    assert prometheus.query(server.url, "demo_requests_total{code='404'}") == []


def test_a_query_that_does_not_parse_is_refused_with_prometheus_reason(
    platform: LocalPlatform, exporter: prometheus.ScrapeTarget
) -> None:
    server = prometheus.start_prometheus(platform, [exporter])
    with pytest.raises(prometheus.PrometheusError, match=r"HTTP 400: .*parse error"):
        prometheus.query(server.url, "sum by (code (demo_requests_total)")


def test_an_unreachable_prometheus_is_reported_as_such() -> None:
    with pytest.raises(prometheus.PrometheusError, match=re.escape("Prometheus unreachable at http://127.0.0.1:")):
        prometheus.query(f"http://127.0.0.1:{free_port()}", "up", timeout_s=2)


def test_a_prometheus_that_cannot_start_says_why(platform: LocalPlatform, exporter: prometheus.ScrapeTarget) -> None:
    with socket.socket() as taken:  # its port is already in use
        taken.bind(("127.0.0.1", platform.port("prometheus")))
        taken.listen()
        with pytest.raises(ComponentError, match="prometheus exited during start-up") as failed:
            prometheus.start_prometheus(platform, [exporter])
    assert "address already in use" in str(failed.value)


def test_prometheus_stops_with_the_platform(platform: LocalPlatform, exporter: prometheus.ScrapeTarget) -> None:
    server = prometheus.start_prometheus(platform, [exporter])
    assert pid_alive(server.process.pid)
    platform.stop()
    assert not pid_alive(server.process.pid)

"""The generated scrape configuration of the local Prometheus (``openledger.local.prometheus``)."""

from __future__ import annotations

import pytest

from openledger.local.product import ProductProcess
from openledger.local.prometheus import ScrapeTarget, product_targets, scrape_config


def test_one_job_per_name_scraped_at_the_interval() -> None:
    config = scrape_config(
        [ScrapeTarget("gateway", "127.0.0.1:1"), ScrapeTarget("gateway", "127.0.0.1:2", {"namespace": "a"})], 1.0
    )
    assert config["global"] == {
        "scrape_interval": "1000ms",
        "evaluation_interval": "1000ms",
        "scrape_timeout": "1000ms",
    }
    assert config["scrape_configs"] == [
        {
            "job_name": "gateway",
            "static_configs": [
                {"targets": ["127.0.0.1:1"], "labels": {}},
                {"targets": ["127.0.0.1:2"], "labels": {"namespace": "a"}},
            ],
        }
    ]


@pytest.mark.parametrize(
    ("targets", "interval_s", "field"), [([], 1.0, "targets"), ([ScrapeTarget("a", "h:1")], 0, "interval_s")]
)
def test_a_config_without_targets_or_interval_is_refused_naming_the_field(
    targets: list[ScrapeTarget], interval_s: float, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        scrape_config(targets, interval_s)


def test_product_processes_with_a_metrics_url_become_targets() -> None:
    processes = [
        ProductProcess("gateway", [], exports={"GATEWAY_URL": "http://127.0.0.1:8080",
                                               "GATEWAY_METRICS_URL": "http://127.0.0.1:9109/metrics",
                                               "METRICS_URL": "http://127.0.0.1:9109/metrics"}),
        ProductProcess("serving-standin", []),
        ProductProcess("ledger-worker", [], exports={"LEDGER_METRICS_URL": "http://127.0.0.1:9110/metrics"}),
    ]  # fmt: skip
    assert product_targets(processes, {"namespace": "ol"}) == [
        ScrapeTarget("gateway", "127.0.0.1:9109", {"namespace": "ol"}),
        ScrapeTarget("ledger-worker", "127.0.0.1:9110", {"namespace": "ol"}),
    ]


def test_a_metrics_url_without_a_port_is_refused_naming_the_process() -> None:
    with pytest.raises(ValueError, match="gateway: metrics URL"):
        product_targets([ProductProcess("gateway", [], exports={"METRICS_URL": "http://localhost/metrics"})])

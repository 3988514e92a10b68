"""The 2-minute version of ``make soak``: every fault kind once under load, zero losses."""

from __future__ import annotations

import os

import pytest

from tests.soak.harness import FAULTS, run_soak, soak_dir

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]


def test_two_minute_seeded_soak_loses_nothing() -> None:
    seed = int(os.environ.get("OPENLEDGER_SOAK_SEED", "20261202"))
    with soak_dir(keep=False) as base:
        report = run_soak(seed, duration_s=120, rate=12, base_dir=base)
        print(report.summary())
    assert set(report.faults) == set(FAULTS), report.summary()
    assert report.answered_ok > 100, report.summary()
    assert report.losses == 0, report.summary()

"""Benchmarks use the same fixtures (the same local platform) as the tests."""

from tests.conftest import *  # noqa: F403
from tests.conftest import pytest_collection_modifyitems  # noqa: F401

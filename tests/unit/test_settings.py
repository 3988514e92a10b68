import pytest

from openledger.settings import Settings


def test_unprefixed_urls_from_local_env_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1234/openledger")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    settings = Settings()
    assert settings.redis_url == "redis://127.0.0.1:9/0"
    assert settings.sqlalchemy_url == "postgresql+psycopg://postgres@127.0.0.1:1234/openledger"


def test_prefixed_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    monkeypatch.setenv("OPENLEDGER_REDIS_URL", "redis://127.0.0.1:10/0")
    assert Settings().redis_url == "redis://127.0.0.1:10/0"


def test_local_mode_binds_to_loopback() -> None:
    assert Settings().bind_host == "127.0.0.1"

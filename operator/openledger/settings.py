"""The one settings object: every knob is an ``OPENLEDGER_*`` environment variable.

``DATABASE_URL``, ``REDIS_URL``, ``ETH_RPC_URL`` and ``KUBECONFIG`` are also read
without the prefix, because ``.local/env`` and most tools use those names.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPENLEDGER_", extra="ignore")

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/openledger",
        validation_alias=AliasChoices("OPENLEDGER_DATABASE_URL", "DATABASE_URL"),
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("OPENLEDGER_REDIS_URL", "REDIS_URL"),
    )
    eth_rpc_url: str = Field(
        default="http://127.0.0.1:8545",
        validation_alias=AliasChoices("OPENLEDGER_ETH_RPC_URL", "ETH_RPC_URL"),
    )
    kubeconfig: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENLEDGER_KUBECONFIG", "KUBECONFIG"),
    )

    # Which namespaces the operator watches; empty means the whole cluster.
    namespaces: list[str] = Field(default_factory=list)
    # Where processes bind. Local mode never leaves loopback.
    bind_host: str = "127.0.0.1"
    metrics_port: int = 9108
    health_port: int = 8081
    gateway_port: int = 8080

    log_level: str = "INFO"
    log_format: str = "json"  # json | text

    # Local platform (make up and the test fixtures).
    local_dir: Path = Path(".local")
    shared_dir: Path = Path("../shared")

    @property
    def sqlalchemy_url(self) -> str:
        """``DATABASE_URL`` with the psycopg 3 driver named, as SQLAlchemy wants it."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

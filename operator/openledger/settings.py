"""The one settings object: every knob is an ``OPENLEDGER_*`` environment variable.

``DATABASE_URL``, ``REDIS_URL``, ``ETH_RPC_URL`` and ``KUBECONFIG`` are also read
without the prefix, because ``.local/env`` and most tools use those names.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

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
    # Settlement (issue 6): the operator's claim-proof server (0 = off) and settle cadence.
    claims_port: int = 8091
    settle_interval_s: float = 5.0

    # Gateway (`openledger gateway`); it writes `usage_stream` (below).
    gateway_metrics_port: int = 9109
    gateway_upstream_timeout_s: float = 60.0  # bounds a whole streamed answer too (the in-flight ttl outlives it)
    gateway_upstream_connections: int = 256
    gateway_default_max_tokens: int = 256  # reserved for output when an OpenAI request names no max_tokens
    gateway_max_body_bytes: int = 8 * 1024 * 1024
    gateway_breaker_failures: int = 5
    gateway_breaker_cooldown_s: float = 5.0
    gateway_retry_ratio: float = 0.1
    # How long a request waits for a model that refuses connections (no endpoint yet: just Ready,
    # rolling, kube-proxy not synced). The model never saw it: not metered, no retry budget spent.
    gateway_connect_retry_s: float = Field(default=3.0, ge=0)
    gateway_route_cache_s: float = 1.0
    gateway_agent_cache_s: float = 30.0
    gateway_redis_timeout_s: float = 5.0  # per Redis command; a reply later than this counts as lost
    # When a usage event counts as durable before the answer leaves (issue 10): none (Redis
    # memory only) | aof (the server runs appendfsync always) | waitaof (WAITAOF 1 0, Redis
    # 7.2+) | wait (WAIT 1: one replica has it). Figures behind the default: README.
    gateway_durability: Literal["none", "aof", "waitaof", "wait"] = "aof"
    gateway_durability_timeout_ms: int = Field(default=1000, ge=1)
    gateway_idempotency_window_s: int = Field(default=86400, ge=1)  # Idempotency-Key outcomes kept
    # uvicorn's graceful shutdown; None = derived from the timeouts (gateway/lifetimes.py).
    gateway_shutdown_timeout_s: float | None = None

    # Operator (controllers/runner.py). Leader election: one replica acts, others wait.
    operator_namespace: str = "default"  # where the leader-election Lease lives (the pod's namespace)
    leader_election: bool = True
    leader_lease_name: str = "openledger-operator"
    leader_lease_duration_s: float = 15.0
    leader_renew_period_s: float = 5.0
    leader_retry_period_s: float = 1.0  # how often a standby tries to take the Lease
    operator_resync_s: float = 300.0  # full level-based pass over every cached object
    operator_redis_check_s: float = 2.0  # how often to check whether Redis lost what was published
    operator_crd_retry_s: float = 30.0  # how often to retry while a needed CRD (KServe) is missing
    operator_max_concurrent_reconciles: int = 32
    kube_max_connections: int = 64  # HTTP connection pool of the operator's API client
    kube_request_timeout_s: float = 30.0
    # Testing only: pause this long right after creating a child object (kill -9 window).
    operator_test_pause_after_create_s: float = 0.0

    # The usage stream: the gateway writes it, the ledger worker reads it. The names default
    # to openledger.wire's; tests override them to isolate themselves.
    usage_stream: str = "openledger:usage"
    usage_dead_letter_stream: str = "openledger:usage:dead"
    usage_consumer_group: str = "ledger"
    ledger_batch_size: int = 5000  # entries per XREADGROUP / transaction (max)
    ledger_writers: int = Field(default=2, ge=1)  # writer threads (PostgreSQL connections) per worker
    ledger_block_ms: int = 200  # XREADGROUP BLOCK
    ledger_claim_idle_ms: int = 30_000  # reclaim a dead consumer's entries after this idle time
    ledger_claim_interval_s: float = 1.0
    ledger_max_deliveries: int = 5  # a message failing this many deliveries goes to the dead-letter stream
    ledger_metrics_port: int = 9110  # 0: no metrics server
    ledger_health_port: int = 0  # /healthz and /readyz of the worker (0: none; the chart sets one)
    ledger_verify_interval_s: float = 300.0  # quick verify in the worker; 0 disables
    ledger_trim_interval_s: float = 10.0  # XTRIM MINID of what every consumer group acknowledged; 0 disables
    ledger_upgrade_on_start: bool = True  # the worker runs `db upgrade` before consuming
    # Testing only: pause this long before COMMIT or between COMMIT and XACK (crash windows).
    ledger_test_pause_s: float = 0.0
    ledger_test_pause_at: str = "after_commit"  # before_commit | after_commit

    log_level: str = "INFO"
    log_format: str = "json"  # json | text

    # Local platform (make up and the test fixtures).
    local_dir: Path = Path(".local")
    # Third-party CRDs to install (default: ../shared/third_party/crds beside the project).
    third_party_crds: Path | None = None

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

"""One meaning of ``REDIS_URL`` for the product's three Redis clients.

The operator uses redis-py (``Redis.from_url``); the gateway
(``gateway/redisproto.py``) and the ledger worker (``settlement/ledger/redisraw.py``)
have their own hiredis clients. All three read the same URL the same way:

    redis://[[user]:password@]host[:port][/db]
    rediss://user:password@host:6380/0?ssl_ca_certs=/etc/openledger/redis-tls/ca.crt

``rediss://`` is TLS. The query parameters are redis-py's names: ``ssl_ca_certs``
(CA bundle; the system's when absent), ``ssl_certfile`` and ``ssl_keyfile``
(client certificate, for servers with ``tls-auth-clients yes``), ``ssl_cert_reqs``
(``required``, the default, ``optional`` or ``none``) and ``ssl_check_hostname``.
A user name is an ACL user (``AUTH user password``); a password alone is
``AUTH password`` (the ``default`` user).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlparse

__all__ = ["RedisTarget", "parse_redis_url"]

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_FALSE = {"0", "f", "false", "n", "no", "off"}
_TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")


@dataclass(frozen=True)
class RedisTarget:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cert_reqs: str = "required"
    check_hostname: bool = True

    def auth_command(self) -> tuple[str, ...] | None:
        """``AUTH`` for this target (ACL user or default user), or None without a password."""
        if self.password is None:
            return None
        return ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context for ``rediss://`` (None for plain ``redis://``)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca_certs)
        context.check_hostname = self.check_hostname and self.cert_reqs != "none"
        context.verify_mode = _CERT_REQS[self.cert_reqs]
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        return context

    def describe(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``url``; a bad scheme, database or TLS parameter raises ``ValueError`` naming it."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"redis url: scheme {parsed.scheme!r} is not supported (use redis:// or rediss://)")
    query = {key: values[-1] for key, values in parse_qs(parsed.query).items()}
    tls = parsed.scheme == "rediss"
    if not tls and any(key in query for key in _TLS_PARAMS):
        raise ValueError("redis url: ssl_* parameters need the rediss:// scheme")
    db_text = parsed.path.lstrip("/") or query.get("db", "0")
    if not db_text.isdigit():
        raise ValueError(f"redis url: database {db_text!r} is not a number")
    cert_reqs = query.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise ValueError(f"redis url: ssl_cert_reqs {cert_reqs!r} is not one of none, optional, required")
    try:
        port = parsed.port or 6379
    except ValueError as exc:
        raise ValueError(f"redis url: port: {exc}") from None
    return RedisTarget(
        host=parsed.hostname or "127.0.0.1",
        port=port,
        db=int(db_text),
        username=unquote(parsed.username) if parsed.username else None,
        password=unquote(parsed.password) if parsed.password else None,
        tls=tls,
        ca_certs=query.get("ssl_ca_certs"),
        certfile=query.get("ssl_certfile"),
        keyfile=query.get("ssl_keyfile"),
        cert_reqs=cert_reqs,
        check_hostname=query.get("ssl_check_hostname", "true").lower() not in _FALSE,
    )

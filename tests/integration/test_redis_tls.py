"""``rediss://`` and ACL users work the same in the product's three Redis clients.

A real redis-server with TLS only (no plaintext port), client certificates
required, and the ``default`` user switched off: a client that ignored the
user name, the CA or the client certificate could not even PING. The CA and
certificates are made for this test and thrown away with it.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from openledger.gateway.redisproto import RedisClient, RedisError, RedisUnavailable, Script
from openledger.local.processes import free_port, spawn
from openledger.settlement.ledger.redisraw import RawRedis, RedisReplyError
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

USER = "openledger"
PASSWORD = "s3cret/with:odd@chars"  # URL-quoted in the URL, sent as it is


@dataclass(frozen=True)
class TlsRedis:
    port: int
    certs: Path

    def url(self, *, ca: str = "ca.crt", password: str = PASSWORD, client_cert: bool = True) -> str:
        query = f"ssl_ca_certs={self.certs / ca}"
        if client_cert:
            query += f"&ssl_certfile={self.certs / 'client.crt'}&ssl_keyfile={self.certs / 'client.key'}"
        return f"rediss://{USER}:{quote(password, safe='')}@localhost:{self.port}/2?{query}"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.with_suffix(".key").write_bytes(pem)


def _ca(folder: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key, subject = _key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    _write(folder / name, key, cert)
    return key, cert


def _leaf(folder: Path, name: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    key, now = _key(), datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca[1].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(san, critical=False)
        .sign(ca[0], hashes.SHA256())
    )  # fmt: skip
    _write(folder / name, key, cert)


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make system-deps)")
    folder = Path(tempfile.mkdtemp(prefix="openledger-redis-tls-"))
    ca = _ca(folder, "ca")
    _ca(folder, "other-ca")  # trusted by nobody: a client pinned to it must refuse the server
    _leaf(folder, "server", ca)
    _leaf(folder, "client", ca)
    port = free_port()
    conf = folder / "redis.conf"
    conf.write_text(
        "\n".join(
            [
                "port 0",
                f"tls-port {port}",
                "bind 127.0.0.1",
                f"tls-cert-file {folder / 'server.crt'}",
                f"tls-key-file {folder / 'server.key'}",
                f"tls-ca-cert-file {folder / 'ca.crt'}",
                "tls-auth-clients yes",
                'save ""',
                "appendonly no",
                f"dir {folder}",
                "user default off",
                f"user {USER} on >{PASSWORD} ~* &* +@all",
                "",
            ]
        )
    )
    process = spawn("redis-tls", ["redis-server", str(conf)], folder / "redis.log", detached=False)
    try:
        ping = ["redis-cli", "--tls", "--cacert", str(folder / "ca.crt"), "--cert", str(folder / "client.crt")]
        ping += ["--key", str(folder / "client.key"), "-p", str(port), "--user", USER, "--pass", PASSWORD, "PING"]
        wait_for(
            lambda: b"PONG" in subprocess.run(ping, capture_output=True, check=False).stdout,
            what="the TLS redis-server",
        )
        yield TlsRedis(port, folder)
    finally:
        process.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_gateway_client_speaks_tls_as_an_acl_user(tls_redis: TlsRedis) -> None:
    async def scenario() -> None:
        client = RedisClient(tls_redis.url())
        try:
            assert await client.execute("SET", "tls:gateway", "1") == b"OK"
            # The URL's /2 is selected: the key is in database 2, not 0.
            info = (await client.execute("CLIENT", "INFO")).decode()
            assert " db=2 " in info and f" user={USER} " in info
            assert await client.evalsha(Script("return redis.call('GET', KEYS[1])"), ["tls:gateway"], []) == b"1"
        finally:
            await client.close()

    asyncio.run(scenario())


def test_ledger_client_speaks_tls_as_an_acl_user(tls_redis: TlsRedis) -> None:
    client = RawRedis(tls_redis.url())
    try:
        client.execute("XADD", "tls:stream", "*", "k", "v")
        client.execute("XGROUP", "CREATE", "tls:stream", "ledger", "0")
        reply = client.execute("XREADGROUP", "GROUP", "ledger", "c1", "COUNT", "10", "STREAMS", "tls:stream", ">")
        assert reply[0][1][0][1] == [b"k", b"v"]
        info = client.execute("CLIENT", "INFO").decode()
        assert " db=2 " in info and f" user={USER} " in info
    finally:
        client.close()


def test_operator_client_speaks_tls_as_an_acl_user(tls_redis: TlsRedis) -> None:
    """The operator's redis-py reads the same URL (same query names) the same way."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(tls_redis.url(), socket_timeout=5, socket_connect_timeout=5)
        try:
            assert await client.set("tls:operator", "1")
            info = await client.client_info()
            assert info["user"] == USER and int(info["db"]) == 2
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_every_client_refuses_a_server_its_ca_did_not_sign(tls_redis: TlsRedis) -> None:
    url = tls_redis.url(ca="other-ca.crt")
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        RawRedis(url).execute("PING")

    async def gateway() -> None:
        client = RedisClient(url)
        try:
            await client.execute("PING")
        finally:
            await client.close()

    with pytest.raises(RedisUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(gateway())
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(url, socket_timeout=5).ping()


def test_a_wrong_password_is_an_error_reply_in_every_client(tls_redis: TlsRedis) -> None:
    url = tls_redis.url(password="wrong")
    with pytest.raises(RedisReplyError, match="WRONGPASS"):
        RawRedis(url).execute("PING")

    async def gateway() -> None:
        client = RedisClient(url)
        try:
            await client.execute("PING")
        finally:
            await client.close()

    with pytest.raises(RedisError, match="WRONGPASS"):
        asyncio.run(gateway())
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url, socket_timeout=5).ping()

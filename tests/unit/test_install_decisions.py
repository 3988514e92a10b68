"""Pure decisions behind the image, the chart's probes and `helm test` checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from openledger.cli import cli
from openledger.deploy import redis_problems, schema_verdict
from openledger.local import image
from openledger.redisurl import parse_redis_url
from openledger.settlement.ledger.health import WorkerHealth

pytestmark = pytest.mark.unit


def test_version_prints_the_package_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"openledger {image.project_version()}"


def test_apt_mirror_is_read_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    assert image.apt_mirror(tmp_path) == image.DEFAULT_MIRROR
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n"
    )
    assert image.apt_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert image.apt_mirror(tmp_path) == "http://other.example/debian"


def test_base_key_changes_with_packages_and_mirror_only() -> None:
    key = image.base_key(("python3", "ca-certificates"), "http://a/debian")
    assert key == image.base_key(("ca-certificates", "python3"), "http://a/debian")
    assert key != image.base_key(("python3",), "http://a/debian")
    assert key != image.base_key(("python3", "ca-certificates"), "http://b/debian")


def test_image_key_follows_every_context_file(tmp_path: Path) -> None:
    files = [tmp_path / "Containerfile", tmp_path / "a.py"]
    for f in files:
        f.write_text("x")
    bases = {"runtime": "r:1", "builder": "b:1"}
    key = image.image_key(files, bases, tmp_path)
    assert image.image_key(files, bases, tmp_path) == key
    files[1].write_text("y")
    assert image.image_key(files, bases, tmp_path) != key
    files[1].write_text("x")
    assert image.image_key(files, {**bases, "runtime": "r:2"}, tmp_path) != key


def test_context_is_what_git_sees_without_caches() -> None:
    names = {str(p.relative_to(image.ROOT)) for p in image.context_files()}
    assert {"Containerfile", "pyproject.toml", "operator/openledger/cli.py"} <= names
    assert not any("__pycache__" in n or n.startswith(("tests/", ".venv")) for n in names)


def test_containerfile_runs_non_root_with_the_cli_as_entrypoint() -> None:
    text = (image.ROOT / "Containerfile").read_text()
    assert "USER 65532:65532" in text
    assert 'ENTRYPOINT ["openledger"]' in text
    assert "org.opencontainers.image.version" in text
    # Model serving stays out: the runtime installs [project] dependencies only, never extras.
    assert "[serving" not in text and "kserve" not in text.split("stay out")[-1]
    # buildah reads .containerignore, docker .dockerignore: one context either way.
    assert (image.ROOT / ".containerignore").read_text() == (image.ROOT / ".dockerignore").read_text()


@pytest.mark.parametrize(
    ("current", "verdict"),
    [
        (set(), "empty: no migration applied"),
        ({"0300"}, "current"),
        ({"0100"}, "old: at 0100, this version needs 0300"),
        ({"9999_later"}, "newer"),
    ],
)
def test_schema_verdict(current: set[str], verdict: str) -> None:
    assert schema_verdict(current, {"0300"}, {"0001", "0100", "0300"}) == verdict


def test_redis_prerequisites_follow_the_durability_policy() -> None:
    good = {"aof_enabled": "1", "maxmemory_policy": "noeviction"}
    assert redis_problems(good, "aof") == []
    assert redis_problems({**good, "aof_enabled": "0"}, "none") == []
    [problem] = redis_problems({**good, "aof_enabled": "0"}, "waitaof")
    assert "appendonly" in problem
    [problem] = redis_problems({**good, "maxmemory_policy": "allkeys-lru"}, "none")
    assert "noeviction" in problem


def test_worker_health_answers() -> None:
    health = WorkerHealth(stale_s=60)
    now = health.last_turn
    assert health.answer("/healthz", now)[0] == 200
    assert health.answer("/readyz", now)[0] == 503  # nothing read yet
    health.turned(read_ok=True)
    assert health.answer("/readyz", health.last_turn + 1)[0] == 200
    assert health.answer("/readyz", health.last_turn + 61)[0] == 503
    assert health.answer("/healthz", health.last_turn + 61) == (503, "read loop stalled for 61 s\n")
    health.failed = "OperationalError: gone"
    assert health.answer("/healthz", health.last_turn)[0] == 503
    assert health.answer("/nope", now)[0] == 404


def test_redis_urls_mean_one_thing() -> None:
    plain = parse_redis_url("redis://10.0.0.1:6380/3")
    assert (plain.host, plain.port, plain.db, plain.tls, plain.auth_command()) == ("10.0.0.1", 6380, 3, False, None)
    assert parse_redis_url("redis://:pw@h/0").auth_command() == ("AUTH", "pw")
    acl = parse_redis_url("rediss://app:p%40ss@h/0?ssl_cert_reqs=none&ssl_check_hostname=false")
    assert acl.auth_command() == ("AUTH", "app", "p@ss")
    context = acl.ssl_context()
    assert context is not None and not context.check_hostname
    assert parse_redis_url("redis://h").ssl_context() is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h:6379", "scheme 'http'"),
        ("redis://h/x", "database 'x'"),
        ("redis://h/0?ssl_ca_certs=/ca", "need the rediss:// scheme"),
        ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs 'maybe'"),
        ("redis://h:99999/0", "port"),
    ],
)
def test_bad_redis_urls_name_the_field(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_image_module_runs_as_a_script() -> None:
    done = subprocess.run([sys.executable, "-m", "openledger.local.image", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--force" in done.stdout

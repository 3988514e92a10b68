"""``openledger``: one command line for every process and tool of the product."""

from __future__ import annotations

import functools
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import click

from openledger.logs import setup_logging
from openledger.output import emit, output_option
from openledger.settings import get_settings

if TYPE_CHECKING:
    from openledger.doctor import Report


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="openledger", prog_name="openledger", message="%(prog)s %(version)s")
def cli() -> None:
    """OpenLedger control plane: operator, gateway, ledger and settlement."""
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)


# ------------------------------------------------------------ local platform


@cli.group()
def local() -> None:
    """The local platform (real etcd, kube-apiserver, PostgreSQL, Redis, anvil)."""


@local.command("up")
@click.option("--dir", "base_dir", type=click.Path(path_type=Path), default=None, help="State folder (default .local).")
def local_up(base_dir: Path | None) -> None:
    """Start the platform and the product's processes in the background."""
    from openledger.local.platform import LocalPlatform, describe, read_state, stop_detached
    from openledger.local.processes import ComponentError, wait_ready
    from openledger.local.product import PRODUCT_PROCESSES
    from openledger.local.toolchain import ToolchainError

    base = (base_dir or get_settings().local_dir).resolve()
    rows = describe(base)
    if rows and all(alive for _, _, alive, _ in rows) and read_state(base).get("mode", "up") == "up":
        click.echo(f"already up; `source {base / 'env'}` (make down to stop)")
        return
    stop_detached(base)
    started = time.monotonic()
    platform = LocalPlatform(base, detached=True)
    try:
        endpoints = platform.start()
        specs = [build(endpoints, platform.port) for build in PRODUCT_PROCESSES]
        env = {**endpoints.as_env(), "OPENLEDGER_LOCAL_DIR": str(base)}
        spawned = [platform.spawn(s.name, s.argv(), env={**env, **s.env}) for s in specs]
        # Product processes start side by side; each is then checked by a real request.
        with ThreadPoolExecutor(max_workers=max(len(specs), 1)) as pool:
            checks = [
                pool.submit(wait_ready, process, functools.partial(_http_ok, spec.ready_url), 120)
                for spec, process in zip(specs, spawned, strict=True)
                if spec.ready_url
            ]
            for check in checks:
                check.result()
        for spec in specs:
            endpoints.extra.update(spec.exports)
    except (ComponentError, ToolchainError) as exc:
        platform.stop()
        raise click.ClickException(str(exc)) from None
    except BaseException:
        platform.stop()
        raise
    platform.write_state()
    click.echo(f"local platform up in {time.monotonic() - started:.1f} s (state in {base})")
    for name, pid, _, log in describe(base):
        click.echo(f"  {name:<16} pid {pid:<8} log {log}")
    for key, value in endpoints.as_env().items():
        click.echo(f"  {key}={value}")
    click.echo(f"source {base / 'env'} to use it; `make down` stops everything")


@local.command("cluster")
@click.option("--dir", "base_dir", type=click.Path(path_type=Path), default=None, help="State folder (default .local).")
@click.option("--no-product", is_flag=True, help="Only the platform and the node; no `helm install` of the product.")
def local_cluster(base_dir: Path | None, no_product: bool) -> None:
    """`local up`'s platform plus a real node, with the product installed by Helm (as root)."""
    from openledger.local.cluster import ClusterError, up

    base = (base_dir or get_settings().local_dir).resolve()
    try:
        report = up(base, product=not no_product)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(report)


@local.command("images")
def local_images() -> None:
    """Build the images `make cluster` loads (product, KServe controller, serving), or take them from the cache."""
    from openledger.local.cluster import build_images
    from openledger.local.image import ImageError
    from openledger.local.processes import ComponentError
    from openledger.local.toolchain import ToolchainError

    try:
        archives = build_images()
    except (ImageError, ComponentError, ToolchainError) as exc:
        raise click.ClickException(str(exc)) from None
    for name, archive in archives.items():
        click.echo(f"{name}={archive}")


@local.command("models-volume")
@click.argument("namespace")
@click.option("--dir", "base_dir", type=click.Path(path_type=Path), default=None, help="State folder (default .local).")
def local_models_volume(namespace: str, base_dir: Path | None) -> None:
    """Print the PersistentVolume and claim ``models`` that offer `make cluster`'s models to NAMESPACE.

    Pipe it to ``kubectl apply -f -``; a Model in NAMESPACE then serves ``pvc://models/smollm2``.
    """
    import yaml

    from openledger.local.kserve import model_volume, models_folder

    folder = models_folder((base_dir or get_settings().local_dir).resolve())
    if not folder.is_dir():
        raise click.ClickException(f"no models folder at {folder}: `make cluster` prepares it")
    click.echo(yaml.safe_dump_all(model_volume(namespace, folder), sort_keys=False), nl=False)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)


@local.command("down")
@click.option("--dir", "base_dir", type=click.Path(path_type=Path), default=None)
def local_down(base_dir: Path | None) -> None:
    """Stop everything `local up` started."""
    from openledger.local.platform import stop_detached

    stopped = stop_detached((base_dir or get_settings().local_dir).resolve())
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@local.command("status")
@click.option("--dir", "base_dir", type=click.Path(path_type=Path), default=None)
def local_status(base_dir: Path | None) -> None:
    """Show what runs; exit 1 when something recorded is not running."""
    from openledger.local.platform import describe

    rows = describe((base_dir or get_settings().local_dir).resolve())
    if not rows:
        click.echo("nothing is running (make up starts it)")
        sys.exit(1)
    for name, pid, alive, log in rows:
        click.echo(f"{name:<16} pid {pid:<8} {'running' if alive else 'DEAD':<8} {log}")
    sys.exit(0 if all(alive for _, _, alive, _ in rows) else 1)


# ------------------------------------------------------------------ doctor


@cli.command("doctor")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds each call to a dependency may take (a dead one fails its check, never hangs).",
)
@click.option(
    "--verify-timeout",
    "verify_timeout_s",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds the `ledger verify` check may take.",
)
@click.option("--full-verify", is_flag=True, help="Run the full `ledger verify` (splits, stream), not the quick one.")
@output_option(amounts=False)
def doctor(timeout_s: float, verify_timeout_s: float, full_verify: bool, output: str) -> None:
    """Check everything the product depends on; exit 0 when nothing failed (warnings allowed), 1 otherwise.

    API server and CRD versions, operator leader Lease, Redis and its persistence,
    PostgreSQL schema, ingest lag, dead letters, settlement lag and chain per pool,
    `ledger verify`. Each check is ok, warn or fail with a one-line detail and, when
    something is wrong, what to do. `-o json` / `-o yaml` print
    {checks: [{name, status, detail, hint}], ok}. Settings as every command reads
    them (DATABASE_URL, REDIS_URL, KUBECONFIG, OPENLEDGER_*); a dependency that is
    not configured is a warning saying so. Secrets (RPC URLs, passwords) never appear.
    """
    from openledger.doctor import run_doctor

    report = run_doctor(get_settings(), timeout_s=timeout_s, verify_timeout_s=verify_timeout_s, full_verify=full_verify)
    emit(output, report.document(), lambda: _doctor_table(report))
    sys.exit(report.exit_code)


def _doctor_table(report: Report) -> None:
    from openledger.doctor import Status

    width = max((len(c.name) for c in report.checks), default=0)
    for check in report.checks:
        click.echo(f"{check.status.value.upper():<5} {check.name:<{width}}  {check.detail}")
        if check.hint and check.status is not Status.OK:
            click.echo(f"      {'':<{width}}  -> {check.hint}")
    failed = sum(c.status is Status.FAIL for c in report.checks)
    warned = sum(c.status is Status.WARN for c in report.checks)
    click.echo(f"{'OK' if report.ok else 'FAILED'}: {failed} failed, {warned} warning(s), {len(report.checks)} checks")


from openledger.controllers.commands import crds as _crds_group  # noqa: E402
from openledger.controllers.commands import operator_command as _operator_command  # noqa: E402

cli.add_command(_crds_group)
cli.add_command(_operator_command)


from openledger.gateway.server import gateway_command  # noqa: E402

cli.add_command(gateway_command)

from openledger.local.standin import standin_command  # noqa: E402

cli.add_command(standin_command)

from openledger.settlement.ledger.cli import db_group, ledger_group, ledger_worker  # noqa: E402

cli.add_command(db_group)
cli.add_command(ledger_group)
cli.add_command(ledger_worker)

from openledger.settlement.commands import chain_group, claim_command, settler_group  # noqa: E402

cli.add_command(chain_group)
cli.add_command(settler_group)
cli.add_command(claim_command)

from openledger.deploy import check_group, claims_server_command, crds_apply, db_wait  # noqa: E402

_crds_group.add_command(crds_apply)
db_group.add_command(db_wait)
cli.add_command(claims_server_command)
cli.add_command(check_group)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()

"""Private child processes: start, wait until ready, stop — and nothing left behind.

Two lifetimes:
- ``detached`` (``make up``): the process gets its own session and outlives the CLI;
  ``make down`` stops it by the pid recorded in the state file.
- attached (pytest): the kernel kills the process when its parent dies
  (``PR_SET_PDEATHSIG``), so even a ``kill -9`` of pytest leaves nothing running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so every
# child is forked by this one long-lived thread, never by a short-lived worker.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openledger-spawner")


class ComponentError(RuntimeError):
    """A component could not start; the message says what is missing and where the log is."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class ManagedProcess:
    name: str
    pid: int
    log_path: Path
    stop_signal: int = signal.SIGTERM

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def stop(self, timeout_s: float = 15.0) -> None:
        stop_pid(self.pid, self.stop_signal, timeout_s)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for every purpose here; reap it.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
    """Signal the process group (or the process), wait, then SIGKILL what is left."""
    if not pid_alive(pid):
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
    while pid_alive(pid):
        time.sleep(0.02)


def spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    *,
    detached: bool,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        proc = _SPAWNER.submit(
            subprocess.Popen,
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            # Own process group either way, so stop() reaches the children too.
            start_new_session=True,
            preexec_fn=None if detached else _die_with_parent,
            user=user,
            group=user,
        ).result()
    except FileNotFoundError as exc:
        raise ComponentError(f"{name}: executable not found: {argv[0]}") from exc
    finally:
        log.close()
    return ManagedProcess(name=name, pid=proc.pid, log_path=log_path, stop_signal=stop_signal)


def wait_ready(
    process: ManagedProcess,
    probe: Callable[[], bool],
    timeout_s: float,
    hint: str = "",
) -> None:
    """Poll ``probe`` until it returns True; fail fast when the process exits."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # any failure of a probe means "not yet"
            if probe():
                return
        if not process.alive():
            raise ComponentError(
                f"{process.name} exited during start-up. {hint}\n"
                f"last lines of {process.log_path}:\n{tail(process.log_path)}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise ComponentError(
        f"{process.name} was not ready within {timeout_s:.0f} s. {hint}\n"
        f"last lines of {process.log_path}:\n{tail(process.log_path)}"
    )


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0

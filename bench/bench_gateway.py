"""Gateway benchmark: the same load against a model server directly and through the gateway.

The gateway runs with everything on: API-key auth, GCRA limits for requests and
tokens, a concurrency slot, a Hard budget reservation, the proxy and metering
(settle + XADD of the usage event before the response). It is pinned to CPU 0
(``--cpu 0``, ``os.sched_setaffinity``); the load generator (``wrk`` when
installed, else an aiohttp load generator in its own process) and the upstream
run on CPU 1, Redis wherever the platform put it.

Upstreams:
- ``fast``: a trivial keep-alive HTTP server (httptools on uvloop, fixed JSON
  answer) — isolates the gateway's own cost, for the throughput figure;
- ``kserve``: the real kserve ``ModelServer`` with the iris classifier (the local
  serving stand-in's model server).

Figures (medians of ``RUNS`` runs):
- added latency p50/p99 = gateway p50/p99 minus direct p50/p99, at 1 connection (serial:
  the pure per-request overhead) and at 4 (about 2k req/s through one gateway core);
- max throughput (requests/s) at high concurrency, and requests per gateway
  CPU-second (requests / the gateway process's user+system CPU time in that
  run) — the per-core figure, independent of how busy the shared CPU 1 is.

Run: ``.venv/bin/pytest bench/bench_gateway.py -m bench -s`` -> ``bench/results/gateway.json``.

Streaming (``test_streaming_time_to_first_token`` -> ``bench/results/gateway-streaming.json``):
time to first token direct to a streaming model vs through the gateway, serial
requests on one keep-alive connection, batches alternating, and the same gateway's
added latency on a non-streamed request in the same run for scale. With
``GATEWAY_BENCH_BASELINE_PYTHONPATH`` set to a tree holding the previous code
(``git archive HEAD operator gateway | tar -x -C /tmp/base``, with its
``operator/openledger/{gateway,controllers,settlement}`` links pointing at real
folders), ``test_nonstreaming_before_after`` runs a second gateway on that code and
alternates the same wrk loads through both (p50/p99, rps, gateway CPU per request).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from openledger.gateway.records import AgentConfig, AgentKeys, apikey_key, hash_api_key, period_id
from openledger.local.processes import ManagedProcess, free_port, spawn, wait_ready
from openledger.local.standin import serve_argv
from openledger.wire import ModelRoute, Price, model_route_key

RUNS = int(os.environ.get("GATEWAY_BENCH_RUNS", "3"))
DURATION_S = int(os.environ.get("GATEWAY_BENCH_SECONDS", "5"))
LATENCY_CONNECTIONS = (1, 4)  # serial (pure overhead), and ~2k req/s through one gateway core
THROUGHPUT_CONNECTIONS = 64
RESULTS = Path(__file__).parent / "results" / "gateway.json"
BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]})
PRICE = Price(per_request=10**15, per_input_token=10**12, per_output_token=2 * 10**12)
pytestmark = pytest.mark.bench


# ------------------------------------------------------------ fast upstream


def serve_fast_upstream(port: int) -> None:
    """A minimal keep-alive HTTP/1.1 server answering every request with fixed JSON."""
    import httptools
    import uvloop

    body = b'{"predictions":[0]}'
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(response)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    uvloop.run(main())


# ------------------------------------------------------------ load generators

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
%s
"""


def _wrk(url: str, connections: int, key: str | None, tmp: Path) -> dict[str, float]:
    script = tmp / f"wrk-{secrets.token_hex(3)}.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    script.write_text(_WRK_SCRIPT % (BODY, auth))
    cmd = [
        *(["nice", "-n", str(PRIORITY)] if _can_boost() else []),
        "taskset",
        "-c",
        "1",
        "wrk",
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{DURATION_S}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=DURATION_S + 30, check=True).stdout
    return _parse_wrk(out)


def _to_ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _parse_wrk(out: str) -> dict[str, float]:
    p50 = re.search(r"50%\s+([\d.]+\w+)", out)
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    assert p50 and p99 and rps and total, out
    return {
        "p50_ms": _to_ms(p50.group(1)),
        "p99_ms": _to_ms(p99.group(1)),
        "rps": float(rps.group(1)),
        "requests": float(total.group(1)),
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": 1.0 if errors else 0.0,
    }


def python_load(url: str, connections: int, key: str | None, duration_s: float) -> dict[str, float]:
    """Fallback when wrk is absent: a closed-loop aiohttp load generator (run in its own process)."""
    import aiohttp
    import uvloop

    latencies: list[float] = []
    non_2xx = 0

    async def main() -> None:
        nonlocal non_2xx
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            end = time.perf_counter() + duration_s

            async def worker() -> None:
                nonlocal non_2xx
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    async with session.post(url, data=BODY) as resp:
                        await resp.read()
                        non_2xx += resp.status >= 300
                    latencies.append((time.perf_counter() - t0) * 1000)

            await asyncio.gather(*(worker() for _ in range(connections)))

    uvloop.run(main())
    latencies.sort()
    return {
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[int(len(latencies) * 0.99)],
        "rps": len(latencies) / duration_s,
        "requests": float(len(latencies)),
        "non_2xx": float(non_2xx),
        "socket_errors": 0.0,
    }


def load(url: str, connections: int, key: str | None, tmp: Path) -> dict[str, float]:
    if shutil.which("wrk") and shutil.which("taskset"):
        return _wrk(url, connections, key, tmp)
    code = (
        f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_gateway as b; "
        f"print(json.dumps(b.python_load({url!r}, {connections}, {key!r}, {DURATION_S})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DURATION_S + 60, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------- processes


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as resp:
        return bool(resp.status == 200)


PRIORITY = -10  # the benchmark's processes run at this nice level when allowed (the 2-CPU box is shared)


def _can_boost() -> bool:
    return os.geteuid() == 0


def _boost(pid: int) -> None:
    """Raise a benchmark process's scheduling priority, so other work on the shared box disturbs it less."""
    if _can_boost():
        os.setpriority(os.PRIO_PROCESS, pid, PRIORITY)


def _pin(pid: int, cpu: int) -> None:
    if (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(pid, {cpu})


def _spawn_gateway(
    tmp: Path, redis_url: str, port: int, stream: str, pythonpath: str | None = None, **settings: str
) -> ManagedProcess:
    """A gateway pinned to CPU 0; ``settings`` are OPENLEDGER_GATEWAY_* values; ``pythonpath``: other code."""
    env = {"REDIS_URL": redis_url, "OPENLEDGER_USAGE_STREAM": stream, "OPENLEDGER_LOG_LEVEL": "WARNING"}
    env.update({f"OPENLEDGER_GATEWAY_{k.upper()}": v for k, v in settings.items()})
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    argv = [sys.executable, "-m", "openledger.cli", "gateway", "--port", str(port), "--metrics-port", "0", "--cpu", "0"]
    return spawn("gateway", argv, tmp / f"gateway-{port}.log", detached=False, env=env)


def _provision(r: redis.Redis, upstreams: dict[str, int]) -> str:
    """An Agent with a Hard budget (reserved and settled on every request) and routes; returns its key."""
    key = "olk_" + secrets.token_urlsafe(24)
    ns = f"bench-{secrets.token_hex(3)}"
    amount = 10**9 * 10**18  # large enough for the run
    config = AgentConfig(
        ref=f"{ns}/bench",
        account="0x" + "ab" * 20,
        models=tuple(upstreams),
        requests_per_second=10**6,
        burst=10**6,
        tokens_per_minute=10**9,
        max_concurrency=10_000,
        budget_base_units=amount,
        budget_enforcement="Hard",
        queue_max_depth=1000,
        queue_max_wait_ms=5000,
        key_hash=hash_api_key(key),
        version=1,
    )
    r.hset(AgentKeys(config.ref).config, mapping=config.to_fields())  # type: ignore[arg-type]
    spend = {"period": period_id(config.budget_period, time.time()), "spent": "0"}
    r.hset(AgentKeys(config.ref).spend, mapping=spend)  # as the operator does once spend is known
    r.set(apikey_key(config.key_hash), config.ref)
    for name, port in upstreams.items():
        route = ModelRoute(
            model=f"{ns}/{name}", url=f"http://127.0.0.1:{port}", protocol="v1", price=PRICE, owner="0x" + "cd" * 20
        )
        r.set(model_route_key(ns, name), route.to_json())
    return key


@pytest.fixture(scope="module")
def stack(redis_url: str, local_platform: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    redis_pid = local_platform.processes["redis"].pid
    tmp = tmp_path_factory.mktemp("bench-gateway")
    procs: list[ManagedProcess] = []
    fast_port, kserve_port, gw_port = free_port(), free_port(), free_port()
    here = str(Path(__file__).parent)
    fast = spawn(
        "fast-upstream",
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {here!r}); import bench_gateway as b; b.serve_fast_upstream({fast_port})",
        ],
        tmp / "fast.log",
        detached=False,
    )
    procs.append(fast)
    kserve = spawn(
        "kserve",
        serve_argv("iris", "v1", kserve_port),
        tmp / "kserve.log",
        detached=False,
    )
    procs.append(kserve)
    stream = f"openledger:usage:bench:{secrets.token_hex(3)}"
    gateway = _spawn_gateway(tmp, redis_url, gw_port, stream)
    procs.append(gateway)
    try:
        wait_ready(fast, lambda: _tcp(fast_port), 30)
        wait_ready(kserve, lambda: _http_ok(f"http://127.0.0.1:{kserve_port}/v1/models/iris"), 90)
        wait_ready(gateway, lambda: _http_ok(f"http://127.0.0.1:{gw_port}/healthz"), 60)
        _pin(fast.pid, 1)
        _pin(kserve.pid, 1)
        for pid in (fast.pid, kserve.pid, gateway.pid, redis_pid):
            _boost(pid)
        r = redis.Redis.from_url(redis_url)
        key = _provision(r, {"fast": fast_port, "iris": kserve_port})
        yield {
            "tmp": tmp,
            "key": key,
            "gw": f"http://127.0.0.1:{gw_port}",
            "gateway_pid": gateway.pid,
            "fast": f"http://127.0.0.1:{fast_port}",
            "kserve": f"http://127.0.0.1:{kserve_port}",
            "redis": r,
            "stream": stream,
        }
        r.delete(stream)
        r.close()
    finally:
        for p in procs:
            p.stop(10)


def _tcp(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def _median(rows: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def test_gateway_overhead_and_throughput(stack: dict[str, Any]) -> None:
    tmp, key = stack["tmp"], stack["key"]
    paths = {"fast": "/v1/models/fast:predict", "kserve": "/v1/models/iris:predict"}
    # Warm both paths (connections, route and agent caches, script load).
    for target in ("fast", "kserve"):
        for _ in range(20):
            req = urllib.request.Request(
                stack["gw"] + paths[target],
                data=BODY.encode(),
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert resp.status == 200
    events_before = stack["redis"].xlen(stack["stream"])
    load_at_start = round(os.getloadavg()[0], 2)

    results: dict[str, Any] = {}
    for target in ("fast", "kserve"):
        direct_url = stack[target] + paths[target]
        gw_url = stack["gw"] + paths[target]
        latency: dict[str, Any] = {}
        all_runs: dict[str, Any] = {}
        for c in LATENCY_CONNECTIONS:
            # Direct and gateway runs alternate, so both see the same background load.
            lat_direct, lat_gw = [], []
            for _ in range(RUNS):
                lat_direct.append(load(direct_url, c, None, tmp))
                lat_gw.append(load(gw_url, c, key, tmp))
            assert all(r["non_2xx"] == 0 and r["socket_errors"] == 0 for r in lat_gw), lat_gw
            latency[f"c{c}"] = {
                "direct_p50_ms": round(_median(lat_direct, "p50_ms"), 3),
                "direct_p99_ms": round(_median(lat_direct, "p99_ms"), 3),
                "gateway_p50_ms": round(_median(lat_gw, "p50_ms"), 3),
                "gateway_p99_ms": round(_median(lat_gw, "p99_ms"), 3),
                "gateway_rps": round(_median(lat_gw, "rps")),
                "added_p50_ms": round(_median(lat_gw, "p50_ms") - _median(lat_direct, "p50_ms"), 3),
                "added_p99_ms": round(_median(lat_gw, "p99_ms") - _median(lat_direct, "p99_ms"), 3),
            }
            all_runs[f"latency_direct_c{c}"] = lat_direct
            all_runs[f"latency_gateway_c{c}"] = lat_gw
        max_direct = [load(direct_url, THROUGHPUT_CONNECTIONS, None, tmp) for _ in range(RUNS)]
        max_gw, per_cpu = [], []
        for _ in range(RUNS):
            cpu0 = _cpu_s(stack["gateway_pid"])
            row = load(gw_url, THROUGHPUT_CONNECTIONS, key, tmp)
            cpu = _cpu_s(stack["gateway_pid"]) - cpu0
            max_gw.append(row)
            per_cpu.append(row["requests"] / cpu if cpu > 0 else 0.0)
        assert all(r["non_2xx"] == 0 and r["socket_errors"] == 0 for r in max_gw), max_gw
        all_runs.update(max_direct=max_direct, max_gateway=max_gw, requests_per_gateway_cpu_s=per_cpu)
        results[target] = {
            "latency": latency,
            "baseline_direct_max_rps": round(_median(max_direct, "rps")),
            "gateway_max_rps": round(_median(max_gw, "rps")),
            "requests_per_gateway_cpu_s": round(statistics.median(per_cpu)),
            "x_direct_max_rps": round(_median(max_gw, "rps") / _median(max_direct, "rps"), 3),
            "all_runs": all_runs,
        }
    served = stack["redis"].xlen(stack["stream"]) - events_before
    fast = results["fast"]
    report = {
        "benchmark": "gateway: same load direct vs through the gateway (auth, GCRA limits, concurrency, "
        "Hard budget reservation, proxy, settle + usage event XADD)",
        "load_generator": "wrk (1 thread, taskset CPU 1)" if shutil.which("wrk") else "aiohttp (own process)",
        "gateway_cpu": "pinned to CPU 0",
        "nice": PRIORITY if _can_boost() else 0,
        "runs": RUNS,
        "seconds_per_run": DURATION_S,
        "connections": {"latency": LATENCY_CONNECTIONS, "throughput": THROUGHPUT_CONNECTIONS},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # The 2-CPU machine is shared; latency tails track this (a quiet machine does better).
            "load_average_1m_at_start": load_at_start,
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "usage_events_written": served,
        "targets": {"added_p50_ms_max": 1.0, "added_p99_ms_max": 5.0, "requests_per_gateway_core_min": 2000},
        "results": results,
        # Judged at 4 connections (about 2k req/s through one gateway core), the harder point.
        "meets_targets": {
            "added_p50": fast["latency"]["c4"]["added_p50_ms"] <= 1.0,
            "added_p99": fast["latency"]["c4"]["added_p99_ms"] <= 5.0,
            "per_core": fast["requests_per_gateway_cpu_s"] >= 2000,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    for target, row in results.items():
        print(target, json.dumps({k: v for k, v in row.items() if k != "all_runs"}))
    # Every request that got a 200 was metered exactly once (a request is one event).
    total = sum(
        r["requests"]
        for t in results.values()
        for name, rows in t["all_runs"].items()
        if "gateway" in name and "cpu" not in name
        for r in rows
    )
    assert served >= total  # every completed request through the gateway wrote its usage event


# ------------------------------------------------------ durability policies

DURABILITY_RESULTS = Path(__file__).parent / "results" / "gateway-durability.json"
_REDIS_ARGS = {
    "none": ["--appendonly", "no"],
    "aof": ["--appendonly", "yes", "--appendfsync", "always"],
    "waitaof": ["--appendonly", "yes", "--appendfsync", "always"],
    "wait": ["--appendonly", "no"],
}


def _redis_version() -> tuple[int, ...]:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _redis_server(tmp: Path, name: str, *args: str) -> tuple[ManagedProcess, int]:
    port = free_port()
    data = tmp / name
    data.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(data), *args]
    process = spawn(name, argv, tmp / f"{name}.log", detached=False)
    wait_ready(process, lambda: bool(redis.Redis(port=port).ping()), 20)
    return process, port


@pytest.fixture(scope="module")
def durability_stacks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Per policy: its own Redis (with a replica for ``wait``) and its own gateway; one fast upstream."""
    tmp = tmp_path_factory.mktemp("bench-durability")
    wanted = os.environ.get("GATEWAY_BENCH_DURABILITY", "none,aof,wait,waitaof").split(",")
    policies = [p for p in wanted if p != "waitaof" or _redis_version() >= (7, 2)]
    procs: list[ManagedProcess] = []
    here = str(Path(__file__).parent)
    fast_port = free_port()
    serve = f"import sys; sys.path.insert(0, {here!r}); import bench_gateway as b; b.serve_fast_upstream({fast_port})"
    procs.append(spawn("fast-upstream", [sys.executable, "-c", serve], tmp / "fast.log", detached=False))
    stacks: dict[str, Any] = {}
    try:
        wait_ready(procs[0], lambda: _tcp(fast_port), 30)
        _pin(procs[0].pid, 1)
        for policy in policies:
            server, port = _redis_server(tmp, f"redis-{policy}", *_REDIS_ARGS[policy])
            procs.append(server)
            if policy == "wait":
                replica, replica_port = _redis_server(tmp, "redis-replica", "--replicaof", "127.0.0.1", str(port))
                procs.append(replica)
                _boost(replica.pid)
                link = redis.Redis(port=replica_port)
                wait_ready(replica, lambda link=link: link.info("replication")["master_link_status"] == "up", 20)
            gw_port = free_port()
            url = f"redis://127.0.0.1:{port}/0"
            gateway = _spawn_gateway(tmp, url, gw_port, "openledger:usage:bench", durability=policy)
            procs.append(gateway)
            wait_ready(gateway, lambda p=gw_port: _http_ok(f"http://127.0.0.1:{p}/healthz"), 60)
            for pid in (gateway.pid, server.pid):
                _boost(pid)
            r = redis.Redis(port=port)
            key = _provision(r, {"fast": fast_port})
            stacks[policy] = {"gw": f"http://127.0.0.1:{gw_port}", "key": key, "pid": gateway.pid, "redis": r}
        yield {"tmp": tmp, "stacks": stacks, "skipped": sorted(set(wanted) - set(policies))}
    finally:
        for p in reversed(procs):
            p.stop(10)


def test_durability_policies_cost(durability_stacks: dict[str, Any]) -> None:
    """Each policy's latency and CPU against ``none`` (the baseline), runs alternating in the same session."""
    tmp, stacks = durability_stacks["tmp"], durability_stacks["stacks"]
    path = "/v1/models/fast:predict"
    for stack in stacks.values():  # warm connections, caches and scripts
        for _ in range(20):
            req = urllib.request.Request(
                stack["gw"] + path,
                data=BODY.encode(),
                headers={"Authorization": f"Bearer {stack['key']}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert resp.status == 200
    rows: dict[str, dict[str, list[Any]]] = {p: {"c1": [], "c4": [], "max": [], "per_cpu": []} for p in stacks}
    for _ in range(RUNS):
        for policy, stack in stacks.items():
            url = stack["gw"] + path
            rows[policy]["c1"].append(load(url, 1, stack["key"], tmp))
            rows[policy]["c4"].append(load(url, 4, stack["key"], tmp))
            cpu0 = _cpu_s(stack["pid"])
            row = load(url, THROUGHPUT_CONNECTIONS, stack["key"], tmp)
            cpu = _cpu_s(stack["pid"]) - cpu0
            rows[policy]["max"].append(row)
            rows[policy]["per_cpu"].append(row["requests"] / cpu if cpu > 0 else 0.0)
    for runs in rows.values():
        assert all(r["non_2xx"] == 0 and r["socket_errors"] == 0 for k in ("c1", "c4", "max") for r in runs[k])
    summary = {
        policy: {
            "c1_p50_ms": round(_median(runs["c1"], "p50_ms"), 3),
            "c1_p99_ms": round(_median(runs["c1"], "p99_ms"), 3),
            "c4_p50_ms": round(_median(runs["c4"], "p50_ms"), 3),
            "c4_p99_ms": round(_median(runs["c4"], "p99_ms"), 3),
            "c4_rps": round(_median(runs["c4"], "rps")),
            "max_rps": round(_median(runs["max"], "rps")),
            "requests_per_gateway_cpu_s": round(statistics.median(runs["per_cpu"])),
        }
        for policy, runs in rows.items()
    }
    base = summary.get("none")
    if base is not None:
        for row in summary.values():
            row["added_c1_p50_ms_vs_none"] = round(row["c1_p50_ms"] - base["c1_p50_ms"], 3)
            row["added_c4_p99_ms_vs_none"] = round(row["c4_p99_ms"] - base["c4_p99_ms"], 3)
            row["max_rps_x_none"] = round(row["max_rps"] / base["max_rps"], 3)
    report = {
        "benchmark": "gateway durability policies (gateway_durability): fast upstream, Hard budget, one gateway "
        "per policy pinned to CPU 0, each on its own Redis (wait: plus one replica); medians of runs alternating "
        "between policies",
        "runs": RUNS,
        "seconds_per_run": DURATION_S,
        "redis": ".".join(map(str, _redis_version())),
        "skipped": {p: "needs Redis 7.2+ (WAITAOF)" for p in durability_stacks["skipped"]},
        "aof_dir_filesystem": subprocess.run(
            ["stat", "-f", "-c", "%T", str(tmp)], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "results": summary,
        "all_runs": rows,
    }
    DURABILITY_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    DURABILITY_RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "all_runs"}, indent=2))


# ------------------------------------------------- streaming: time to first token

STREAM_RESULTS = Path(__file__).parent / "results" / "gateway-streaming.json"
# The code to compare the non-streaming path against (a PYTHONPATH whose ``openledger`` is the previous
# version, e.g. an unpacked ``git archive HEAD operator gateway``); unset: no before/after comparison.
BASELINE_PYTHONPATH = os.environ.get("GATEWAY_BENCH_BASELINE_PYTHONPATH", "")
STREAM_REQUESTS = int(os.environ.get("GATEWAY_BENCH_STREAM_REQUESTS", "200"))  # per batch
STREAM_CHUNKS = 8  # events after the first, ``STREAM_GAP_MS`` apart
STREAM_GAP_MS = float(os.environ.get("GATEWAY_BENCH_STREAM_GAP_MS", "1"))  # between events
STREAM_BODY = json.dumps(
    {"model": "sse", "messages": [{"role": "user", "content": "count"}], "max_tokens": 16, "stream": True}
).encode()


def serve_sse_upstream(port: int) -> None:
    """A minimal streaming model: the first event at once, then ``STREAM_CHUNKS`` more, usage if asked, [DONE]."""
    import httptools
    import uvloop

    def frame(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    def event(text: str) -> bytes:
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
        return frame(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": STREAM_CHUNKS + 1}}
    tail = frame(b"data: " + json.dumps(usage).encode() + b"\n\n") + frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(head + event("t0 "))
            loop = asyncio.get_running_loop()
            for i in range(1, STREAM_CHUNKS + 1):
                loop.call_later(i * STREAM_GAP_MS / 1000, self.transport.write, event(f"t{i} "))
            loop.call_later((STREAM_CHUNKS + 1) * STREAM_GAP_MS / 1000, self.transport.write, tail)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    uvloop.run(main())


def measure_ttft(port: int, path: str, key: str | None, requests: int) -> list[float]:
    """Serial streamed requests on one keep-alive connection; ms from sending to the first text event."""
    import socket

    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    request = (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (path.encode(), auth, len(STREAM_BODY), STREAM_BODY)
    )
    ttft: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(requests):
            t0 = time.perf_counter()
            sock.sendall(request)
            buffer = b""
            first = 0.0
            while not buffer.endswith(b"0\r\n\r\n"):
                data = sock.recv(65536)
                assert data, "connection closed mid-stream"
                buffer += data
                if not first and b'"content"' in buffer:
                    first = time.perf_counter()
            assert b" 200 OK" in buffer[:20] and b"[DONE]" in buffer, buffer[:300]
            ttft.append((first - t0) * 1000)
    return ttft


def measure_latency(port: int, path: str, key: str | None, requests: int) -> list[float]:
    """Serial non-streamed requests (BODY, JSON answer) on one keep-alive connection; ms each."""
    import socket

    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    body = BODY.encode()
    request = (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (path.encode(), auth, len(body), body)
    )
    latencies: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(requests):
            t0 = time.perf_counter()
            sock.sendall(request)
            buffer = sock.recv(65536)
            while b"predictions" not in buffer:
                buffer += sock.recv(65536)
            latencies.append((time.perf_counter() - t0) * 1000)
            assert b" 200 OK" in buffer[:20], buffer[:300]
    return latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@pytest.fixture(scope="module")
def stream_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("bench-stream")
    sse_port, fast_port, gw_port, base_port = free_port(), free_port(), free_port(), free_port()
    here = str(Path(__file__).parent)
    procs: list[ManagedProcess] = []
    for name, serve, port in (("sse", "serve_sse_upstream", sse_port), ("fast", "serve_fast_upstream", fast_port)):
        code = f"import sys; sys.path.insert(0, {here!r}); import bench_gateway as b; b.{serve}({port})"
        procs.append(spawn(f"{name}-upstream", [sys.executable, "-c", code], tmp / f"{name}.log", detached=False))
    stream = f"openledger:usage:bench-stream:{secrets.token_hex(3)}"
    procs.append(_spawn_gateway(tmp, redis_url, gw_port, stream))
    if BASELINE_PYTHONPATH:
        procs.append(_spawn_gateway(tmp, redis_url, base_port, stream + ":baseline", BASELINE_PYTHONPATH))
    try:
        wait_ready(procs[0], lambda: _tcp(sse_port), 30)
        wait_ready(procs[1], lambda: _tcp(fast_port), 30)
        for proc, port in zip(procs[2:], (gw_port, base_port), strict=False):
            wait_ready(proc, functools.partial(_http_ok, f"http://127.0.0.1:{port}/healthz"), 60)
        _pin(procs[0].pid, 1)
        _pin(procs[1].pid, 1)
        for proc in procs:
            _boost(proc.pid)
        r = redis.Redis.from_url(redis_url)
        key = _provision(r, {"sse": sse_port, "fast": fast_port})
        ns = r.get(apikey_key(hash_api_key(key))).decode().split("/")[0]  # type: ignore[union-attr]
        route = ModelRoute.from_json(r.get(model_route_key(ns, "sse")))  # type: ignore[arg-type]
        r.set(model_route_key(ns, "sse"), dataclasses.replace(route, protocol="openai").to_json())
        pids = {"after": procs[2].pid, "before": procs[3].pid if BASELINE_PYTHONPATH else 0}
        yield {"key": key, "sse_port": sse_port, "fast_port": fast_port, "gw_port": gw_port, "base_port": base_port,
               "redis": r, "stream": stream, "tmp": tmp, "pids": pids}  # fmt: skip
        r.delete(stream, stream + ":baseline")
        r.close()
    finally:
        for proc in procs:
            proc.stop(10)


def test_streaming_time_to_first_token(stream_stack: dict[str, Any]) -> None:
    """Time to first token direct to the model vs through the gateway, batches alternating."""
    s = stream_stack
    direct_path, gw_path = "/openai/v1/chat/completions", "/v1/chat/completions"
    measure_ttft(s["gw_port"], gw_path, s["key"], 20)  # warm caches, connections, scripts
    events_before = s["redis"].xlen(s["stream"])
    load_at_start = round(os.getloadavg()[0], 2)
    direct: list[float] = []
    through: list[float] = []
    plain_direct: list[float] = []
    plain_through: list[float] = []
    fast_path = "/v1/models/fast:predict"
    measure_latency(s["gw_port"], fast_path, s["key"], 20)
    for _ in range(RUNS):
        direct += measure_ttft(s["sse_port"], direct_path, None, STREAM_REQUESTS)
        through += measure_ttft(s["gw_port"], gw_path, s["key"], STREAM_REQUESTS)
        plain_direct += measure_latency(s["fast_port"], fast_path, None, STREAM_REQUESTS)
        plain_through += measure_latency(s["gw_port"], fast_path, s["key"], STREAM_REQUESTS)
    assert s["redis"].xlen(s["stream"]) - events_before == len(through) + len(plain_through) + 20  # one event each
    report = {
        "benchmark": "streaming time to first token: direct to the model vs through the gateway (auth, limits, "
        "Hard budget reservation, SSE relay with usage metering, settle before [DONE])",
        "requests": {"direct": len(direct), "gateway": len(through)},
        "connections": 1,
        "upstream": f"first event at once, then {STREAM_CHUNKS} events {STREAM_GAP_MS} ms apart, usage, [DONE]",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m_at_start": load_at_start,
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "direct_ttft_p50_ms": round(_pct(direct, 0.5), 3),
        "direct_ttft_p99_ms": round(_pct(direct, 0.99), 3),
        "gateway_ttft_p50_ms": round(_pct(through, 0.5), 3),
        "gateway_ttft_p99_ms": round(_pct(through, 0.99), 3),
        "added_ttft_p50_ms": round(_pct(through, 0.5) - _pct(direct, 0.5), 3),
        "added_ttft_p99_ms": round(_pct(through, 0.99) - _pct(direct, 0.99), 3),
        # The same gateway's added latency on a non-streamed request in the same run, for scale:
        # both include the admission (one EVALSHA, fsynced under the default ``aof`` policy).
        "nonstream_added_p50_ms": round(_pct(plain_through, 0.5) - _pct(plain_direct, 0.5), 3),
        "nonstream_added_p99_ms": round(_pct(plain_through, 0.99) - _pct(plain_direct, 0.99), 3),
        "targets": {"added_ttft_p50_ms_max": 1.0},
        "meets_targets": {"added_ttft_p50": _pct(through, 0.5) - _pct(direct, 0.5) <= 1.0},
    }
    previous = json.loads(STREAM_RESULTS.read_text()) if STREAM_RESULTS.exists() else {}
    if "nonstream_before_after" in previous:  # test_nonstreaming_before_after's block (its own run) stays
        report["nonstream_before_after"] = previous["nonstream_before_after"]
    STREAM_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    STREAM_RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def test_nonstreaming_before_after(stream_stack: dict[str, Any]) -> None:
    """The non-streamed path of this code vs the baseline code, same upstream, same run, batches alternating."""
    if not BASELINE_PYTHONPATH:
        pytest.skip("set GATEWAY_BENCH_BASELINE_PYTHONPATH to the previous code to compare against")
    s = stream_stack
    path = "/v1/models/fast:predict"
    urls = {"after": f"http://127.0.0.1:{s['gw_port']}{path}", "before": f"http://127.0.0.1:{s['base_port']}{path}"}
    for port in (s["gw_port"], s["base_port"]):
        measure_latency(port, path, s["key"], 50)
    rows: dict[str, dict[int, list[dict[str, float]]]] = {"before": {}, "after": {}, "direct": {}}
    for c in LATENCY_CONNECTIONS:
        for _ in range(RUNS):
            rows["direct"].setdefault(c, []).append(load(f"http://127.0.0.1:{s['fast_port']}{path}", c, None, s["tmp"]))
            for name in ("before", "after"):
                cpu0 = _cpu_s(s["pids"][name])
                row = load(urls[name], c, s["key"], s["tmp"])
                # Gateway CPU per request: the figure the shared machine's load disturbs least.
                row["cpu_us_per_request"] = (_cpu_s(s["pids"][name]) - cpu0) / max(1.0, row["requests"]) * 1e6
                rows[name].setdefault(c, []).append(row)
            rows["direct"][c][-1]["cpu_us_per_request"] = 0.0
    summary = {
        f"c{c}": {
            name: {
                "p50_ms": round(_median(rows[name][c], "p50_ms"), 3),
                "p99_ms": round(_median(rows[name][c], "p99_ms"), 3),
                "rps": round(_median(rows[name][c], "rps")),
                "cpu_us_per_request": round(_median(rows[name][c], "cpu_us_per_request"), 1) if name != "direct" else 0,
            }
            for name in rows
        }
        for c in LATENCY_CONNECTIONS
    }
    report = json.loads(STREAM_RESULTS.read_text()) if STREAM_RESULTS.exists() else {}
    report["nonstream_before_after"] = {
        "load_average_1m": round(os.getloadavg()[0], 2),
        "runs": RUNS,
        "seconds_per_run": DURATION_S,
        "results": summary,
    }
    STREAM_RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))

"""Foundation API benchmark: hello vs JWT + RLS read, steady rate, tenant-context cost, overload.

Run through benchmarks/run_api.sh, which provides PostgreSQL and Redis. Prints its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import time
import uuid

import asyncpg
import httpx

PASSWORD = "Benchmark-Passphrase-2026"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(port: int, workers: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CC_ENV": "production",
        "CC_SECRET_KEY": secrets.token_urlsafe(40),
        "CC_LOG_LEVEL": "WARNING",
        "CC_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        **(extra_env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the API did not become ready")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def prepare_tenant(base: str) -> tuple[str, str, str]:
    """Sign up a tenant and return (access token, role id, tenant id)."""
    slug = f"bench{uuid.uuid4().hex[:8]}"
    signup = httpx.post(
        f"{base}/api/v1/signup",
        json={
            "company_name": "Bench Co",
            "slug": slug,
            "admin_email": f"owner@{slug}.example.com",
            "admin_name": "Bench Owner",
            "password": PASSWORD,
            "time_zone": "UTC",
            "plan": "team",
        },
        timeout=30,
    )
    signup.raise_for_status()
    login = httpx.post(
        f"{base}/api/v1/auth/login",
        json={"workspace": slug, "email": f"owner@{slug}.example.com", "password": PASSWORD},
        timeout=30,
    )
    login.raise_for_status()
    token = login.json()["access_token"]
    roles = httpx.get(f"{base}/api/v1/roles", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
    return token, roles[0]["id"], signup.json()["tenant"]["id"]


def _ms(value: str) -> float:
    number = float(re.findall(r"[\d.]+", value)[0])
    if value.endswith("us"):
        return number / 1000
    if value.endswith("ms"):
        return number
    if value.endswith("s"):
        return number * 1000
    return number


def wrk(url: str, connections: int, seconds: int, token: str | None = None, threads: int = 2) -> dict[str, float]:
    """Closed-loop maximum throughput with wrk; latency percentiles from --latency."""
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    timeouts = re.search(r"timeout (\d+)", output)
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "requests": total,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "timeouts": int(timeouts.group(1)) if timeouts else 0,
        "raw": output,  # type: ignore[dict-item]
    }


async def _http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def steady(
    host: str, port: int, path: str, token: str, rate: int, seconds: int, connections: int = 128
) -> dict[str, float]:
    """Open-loop load: requests are scheduled at a fixed rate, latency counts from the scheduled instant."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await asyncio.open_connection(host, port))
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5
    total = rate * seconds
    tasks: list[asyncio.Task[None]] = []

    async def one(scheduled: float) -> None:
        nonlocal errors
        connection = await pool.get()
        try:
            status = await asyncio.wait_for(_http_get(*connection, request), timeout=5)
            if status != 200:
                errors += 1
            latencies.append((loop.time() - scheduled) * 1000)
            pool.put_nowait(connection)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            pool.put_nowait(await asyncio.open_connection(host, port))

    for index in range(total):
        scheduled = start + index / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        _, writer = pool.get_nowait()
        writer.close()
    latencies.sort()
    return {
        "rate": rate,
        "seconds": seconds,
        "sent": total,
        "errors": errors,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "max_ms": latencies[-1],
    }


async def tenant_context_cost(dsn: str, tenant_id: str, role_id: str, iterations: int = 5000) -> dict[str, float]:
    """p50 of the same-shaped primary-key read with and without `SET LOCAL app.tenant_id` + RLS policy."""
    connection = await asyncpg.connect(dsn)
    plan_id = await connection.fetchval("SELECT id FROM plans LIMIT 1")
    set_tenant = await connection.prepare("SELECT set_config('app.tenant_id', $1, true)")
    scoped = await connection.prepare("SELECT id, name, permissions FROM roles WHERE id = $1")
    plain = await connection.prepare("SELECT id, name, features FROM plans WHERE id = $1")

    async def with_context() -> None:
        async with connection.transaction():
            await set_tenant.fetchval(tenant_id)
            row = await scoped.fetchrow(uuid.UUID(role_id))
            assert row is not None

    async def without_context() -> None:
        async with connection.transaction():
            row = await plain.fetchrow(plan_id)
            assert row is not None

    async def measure(body) -> float:  # type: ignore[no-untyped-def]
        timings = []
        for _ in range(iterations):
            started = time.perf_counter()
            await body()
            timings.append((time.perf_counter() - started) * 1000)
        return statistics.median(timings)

    await measure(with_context)  # warm up
    await measure(without_context)
    rls = await measure(with_context)
    bare = await measure(without_context)
    await connection.close()
    return {"with_context_p50_ms": rls, "without_p50_ms": bare, "added_p50_ms": rls - bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=20, help="duration of each max-throughput run")
    parser.add_argument("--steady-seconds", type=int, default=60)
    parser.add_argument("--steady-rate", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(port, args.workers)
    results: dict[str, dict[str, float]] = {}
    try:
        token, role_id, tenant_id = prepare_tenant(base)
        print(f"load before measuring: {os.getloadavg()}", flush=True)
        results["a_hello"] = wrk(f"{base}/healthz", 64, args.seconds)
        results["b_jwt_rls_read"] = wrk(f"{base}/api/v1/roles/{role_id}", 64, args.seconds, token)
        results["steady_b"] = asyncio.run(
            steady("127.0.0.1", port, f"/api/v1/roles/{role_id}", token, args.steady_rate, args.steady_seconds)
        )
        dsn = os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")
        results["tenant_context"] = asyncio.run(tenant_context_cost(dsn, tenant_id, role_id))
    finally:
        stop_server(server)

    overload_port = free_port()
    overloaded = start_server(overload_port, 1, {"CC_MAX_INFLIGHT": "16"})
    try:
        token, role_id, _ = prepare_tenant(f"http://127.0.0.1:{overload_port}")
        results["overload"] = wrk(f"http://127.0.0.1:{overload_port}/api/v1/roles/{role_id}", 256, 10, token, threads=2)
        shed = httpx.get(f"http://127.0.0.1:{overload_port}/metrics", timeout=10).text
        results["overload"]["shed_429"] = float(
            sum(float(v) for v in re.findall(r"^cc_http_requests_shed_total (\S+)$", shed, re.M))
        )
    finally:
        stop_server(overloaded)

    a, b = results["a_hello"], results["b_jwt_rls_read"]
    steady_b, context, over = results["steady_b"], results["tenant_context"], results["overload"]
    print()
    print(f"machine: {os.cpu_count()} cores; API workers: {args.workers}; wrk threads 2, 64 connections")
    print(f"(a) hello            {a['rps']:>9.0f} req/s   p50 {a['p50_ms']:.2f} ms   p99 {a['p99_ms']:.2f} ms")
    print(f"(b) JWT + RLS read   {b['rps']:>9.0f} req/s   p50 {b['p50_ms']:.2f} ms   p99 {b['p99_ms']:.2f} ms")
    print(f"    ratio b/a        {b['rps'] / a['rps']:.1%}  (goal >= 35%)")
    print(
        f"steady (b) {steady_b['rate']:.0f}/s x {steady_b['seconds']:.0f}s: p50 {steady_b['p50_ms']:.2f} ms  "
        f"p99 {steady_b['p99_ms']:.2f} ms  max {steady_b['max_ms']:.1f} ms  errors {steady_b['errors']:.0f}  (goal p99 < 25 ms, 0 errors)"
    )
    print(
        f"tenant context: p50 {context['with_context_p50_ms']:.3f} ms with vs {context['without_p50_ms']:.3f} ms without "
        f"= +{context['added_p50_ms']:.3f} ms  (goal <= 0.5 ms)"
    )
    print(
        f"overload (1 worker, 16 in flight, 256 connections): {over['requests']:.0f} answers, "
        f"{over['non_2xx']:.0f} non-2xx, 429s counted by the server {over['shed_429']:.0f}, timeouts {over['timeouts']:.0f}"
    )


if __name__ == "__main__":
    main()

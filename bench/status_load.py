"""Status under load: GET /jobs/{id} at 32 concurrent connections for 10 s against `sdq api`.

The API runs as a real uvicorn process (one worker, as `sdq api` starts it) on a real
redis-server holding one job; the load comes from wrk (Debian's `wrk`, 2 threads, 32 keep-alive
connections) or, without it, an asyncio httpx client in this process (which itself eats most of
a core: its figures are a floor). Baseline, measured in the same run: a 404 for an unknown path,
the bare HTTP stack without Redis, so the ratio shows what a status read costs over FastAPI and
uvicorn themselves.

    python bench/status_load.py --seconds 10 --connections 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, hardware, hardware_line, percentile, redis_server


async def hammer(url: str, seconds: float, connections: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:

        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.get(url)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(connections)))
        elapsed = time.perf_counter() - began
    return {
        "requests": len(latencies),
        "errors": errors,
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def wrk(url: str, seconds: float, connections: int) -> dict[str, float] | None:
    """wrk's figures for URL, or None when wrk isn't installed."""
    import re
    import shutil

    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "errors": float(non_2xx.group(1)) if non_2xx else 0.0,
        "req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
    }


def load(url: str, seconds: float, connections: int) -> dict[str, float]:
    return wrk(url, seconds, connections) or asyncio.run(hammer(url, seconds, connections))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(".bench-cache/results/status_load.json"))
    args = parser.parse_args()

    from sdqueue.config import Settings
    from sdqueue.jobs import GenerationRequest
    from sdqueue.producer import Producer

    with redis_server() as redis_url:
        settings = Settings(
            redis_url=redis_url, storage_url=Path(".bench-cache/status-store").resolve().as_uri()
        )
        job = Producer(settings).enqueue(GenerationRequest(prompt="a status to read", seed=1))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
        env |= {
            "SDQ_REDIS_URL": redis_url,
            "SDQ_STORAGE_URL": settings.storage_url,
            "SDQ_LOG_LEVEL": "WARNING",
        }
        cmd = [sys.executable, "-m", "sdqueue", "api", "--host", "127.0.0.1", "--port", str(port)]
        api = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            import httpx

            for _ in range(200):
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code in (200, 503):
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            load(f"{base}/jobs/{job.id}", 1, args.connections)  # warm-up
            status = load(f"{base}/jobs/{job.id}", args.seconds, args.connections)
            baseline = load(f"{base}/no-such-route", args.seconds, args.connections)
        finally:
            api.terminate()
            api.wait(timeout=30)
    result: dict[str, Any] = {"hardware": hardware(), "status": status, "not_found_baseline": baseline}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(hardware_line())
    for name, r in (("GET /jobs/{id}", status), ("GET /no-such-route, 404 (baseline)", baseline)):
        print(
            f"{name}: {r['req_per_s']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"{r['requests']} requests, {r['errors']} errors"
        )
    print(f"ratio status/baseline req/s: {status['req_per_s'] / baseline['req_per_s']:.2f}")


if __name__ == "__main__":
    main()

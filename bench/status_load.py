"""Status under load: GET /jobs/{id} at 32 concurrent connections for 10 s against `sdq api`.

The API runs as a real `sdq api` (with 1 and with 2 worker processes, SDQ_API_WORKERS) on a
real redis-server holding one job, with a bearer token as in production. The load comes from
wrk (Debian's `wrk`, 2 threads, 32 keep-alive connections) or, without it, an asyncio httpx
client in this process (which itself eats most of a core: its figures are a floor). Two
baselines, measured in the same run, interleaved with it, REPEATS times each:

- the obvious way, as sdqueue's API was built before its fast path: a sync route that reads the
  job as rq does (`Job.fetch`, in FastAPI's threadpool), the token checked by an
  `@app.middleware("http")`, uvicorn's pure-Python loop and HTTP parser (`--loop asyncio
  --http h11`), in a second process;
- a 404 for an unknown path: the bare HTTP stack without Redis, the ceiling for any route.

    python bench/status_load.py --seconds 10 --connections 32 --repeats 3 --workers 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, hardware, hardware_line, percentile, redis_server

TOKEN = "bench-token"
"""SDQ_API_TOKEN of every server: production runs with one, and its check is on every request."""
AUTH = f"Authorization: Bearer {TOKEN}"


async def hammer(url: str, seconds: float, connections: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(limits=limits, timeout=10, headers=headers) as client:

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
        ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-H", AUTH, url],
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


def obvious_app() -> Any:
    """The obvious way (see above), served at GET /obvious/jobs/{id} beside sdqueue's own routes."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from sdqueue.api import create_app
    from sdqueue.auth import PUBLIC_PATHS, authorized
    from sdqueue.config import load_settings
    from sdqueue.producer import connect, view_of
    from sdqueue.rqhash import JobRecord

    settings = load_settings().model_copy(update={"api_token": None})  # checked below instead
    app = create_app(settings)
    connection = connect(settings)

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        if request.url.path in PUBLIC_PATHS or authorized(request, TOKEN):
            return await call_next(request)
        return JSONResponse({"detail": "a valid bearer token is required"}, status_code=401)

    @app.get("/obvious/jobs/{job_id}")
    def obvious(job_id: str) -> Response:
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        return Response(view_of(JobRecord.of(job)).model_dump_json(), media_type="application/json")

    return app


def serve(cmd: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    import httpx

    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code in (200, 503):
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"{cmd} did not start")


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """The median of each figure over RUNS."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workers", default="1,2", help="`sdq api` worker processes to measure, comma-separated"
    )
    parser.add_argument("--json", type=Path, default=Path(".bench-cache/results/status_load.json"))
    args = parser.parse_args()

    from sdqueue.config import Settings
    from sdqueue.jobs import GenerationRequest
    from sdqueue.producer import Producer

    with redis_server() as redis_url:
        settings = Settings(
            redis_url=redis_url, storage_url=Path(".bench-cache/status-store").resolve().as_uri()
        )
        job = Producer(settings).enqueue(GenerationRequest(prompt="a status to read", seed=1))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
        env |= {
            "SDQ_REDIS_URL": redis_url,
            "SDQ_STORAGE_URL": settings.storage_url,
            "SDQ_LOG_LEVEL": "WARNING",
            "SDQ_API_TOKEN": TOKEN,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        }
        servers: list[subprocess.Popen[bytes]] = []
        urls: dict[str, str] = {}
        try:
            for workers in [int(w) for w in args.workers.split(",")]:
                port = free_port()
                cmd = [sys.executable, "-m", "sdqueue", "api", "--host", "127.0.0.1", "--port", str(port)]
                servers.append(serve([*cmd, "--workers", str(workers)], env, port))
                name = f"sdq api, {workers} process{'es' if workers > 1 else ''}"
                urls[name] = f"http://127.0.0.1:{port}/jobs/{job.id}"
                urls.setdefault("not_found", f"http://127.0.0.1:{port}/no-such-route")
            port = free_port()
            obvious = [sys.executable, "-m", "uvicorn", "bench.status_load:obvious_app", "--factory"]
            obvious += ["--loop", "asyncio", "--http", "h11", "--log-level", "warning"]
            obvious += ["--host", "127.0.0.1", "--port", str(port)]
            servers.append(serve(obvious, env, port))
            urls["obvious"] = f"http://127.0.0.1:{port}/obvious/jobs/{job.id}"
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
            for url in urls.values():
                load(url, 1, args.connections)  # warm-up: connections, caches, the pools' threads
            for _ in range(args.repeats):  # interleaved: drift on a shared box hits all
                for name, url in urls.items():
                    runs[name].append(load(url, args.seconds, args.connections))
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=30)
    medians = {name: median_of(samples) for name, samples in runs.items()}
    result: dict[str, Any] = {"hardware": hardware(), "median": medians, "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(hardware_line())
    print(f"medians of {args.repeats} runs of {args.seconds:g} s, {args.connections} connections:")
    labels = {name: f"GET /jobs/{{id}}, {name}" for name in urls if name.startswith("sdq api")}
    labels |= {
        "obvious": "GET /jobs/{id}, the obvious way, 1 process (baseline)",
        "not_found": "GET /no-such-route, 404, 1 process (ceiling)",
    }
    for name, label in labels.items():
        r = medians[name]
        p99s = ", ".join(f"{run['p99_ms']:.1f}" for run in runs[name])
        print(
            f"{label}: {r['req_per_s']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms "
            f"(p99 of each run: {p99s}), {r['errors']:.0f} non-2xx"
        )
    for name in labels:
        if name.startswith("sdq api"):
            ratio = medians[name]["req_per_s"] / medians["obvious"]["req_per_s"]
            print(f"ratio {name} / obvious req/s: {ratio:.2f}")


if __name__ == "__main__":
    main()

"""Soak: thousands of tiny-model jobs through one real `sdq worker` process; memory must stay flat.

A real redis-server and a real worker process (the production entry point, the tiny model, local
storage). Jobs are enqueued in chunks so the queue never runs dry; the worker's RSS is sampled
from /proc while it works. Reports, for the first and the last 200 jobs, p50/p99 end-to-end
latency (created -> finished, from job status) and the worker's RSS, plus RSS growth per 1,000
jobs over the second half (after warm-up allocations settle).

    python bench/soak.py --jobs 2000 --out .bench-cache/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import hardware, hardware_line, percentile, quiet_libraries, redis_server, tiny_model_dir

WINDOW = 200
CHUNK = 100


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(".bench-cache/results/soak.json"))
    args = parser.parse_args()
    quiet_libraries()

    from sdqueue.config import Settings
    from sdqueue.jobs import GenerationRequest
    from sdqueue.producer import Producer

    storage = Path(".bench-cache/soak-store").resolve()
    with redis_server() as url:
        settings = Settings(redis_url=url, storage_url=storage.as_uri(), device="cpu", log_level="WARNING")
        producer = Producer(settings)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
        env |= {"SDQ_REDIS_URL": url, "SDQ_STORAGE_URL": settings.storage_url, "SDQ_LOG_LEVEL": "WARNING"}
        cmd = [sys.executable, "-m", "sdqueue", "worker", "--model", str(tiny_model_dir())]
        worker = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            from rq import Worker

            while not Worker.count(connection=producer.redis):  # model loaded and listening
                time.sleep(0.2)
            ids: list[str] = []
            rss: list[tuple[int, float]] = []  # (jobs finished, MB)
            started = time.monotonic()
            while len(ids) < args.jobs or producer.queue.count or producer.queue.started_job_registry.count:
                if len(ids) < args.jobs and producer.queue.count < CHUNK:
                    requests = [
                        GenerationRequest(
                            prompt=f"soak {len(ids) + i}",
                            steps=args.steps,
                            width=args.size,
                            height=args.size,
                            seed=len(ids) + i,
                        )
                        for i in range(min(CHUNK, args.jobs - len(ids)))
                    ]
                    ids += producer.enqueue_many(requests)
                done = len(ids) - producer.queue.count
                rss.append((done, rss_mb(worker.pid)))
                time.sleep(0.5)
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited with {worker.returncode}")
            elapsed = time.monotonic() - started
            rss.append((len(ids), rss_mb(worker.pid)))
        finally:
            worker.terminate()
            worker.wait(timeout=60)

        views = [producer.status(job_id) for job_id in ids]
    statuses = {v.status.value for v in views}
    latency = [
        (v.finished_at - v.created_at).total_seconds() for v in views if v.finished_at and v.created_at
    ]

    def window(values: list[float]) -> dict[str, float]:
        return {"p50_s": percentile(values, 50), "p99_s": percentile(values, 99)}

    def rss_at(done: int) -> float:
        return min(rss, key=lambda point: abs(point[0] - done))[1]

    half = len(ids) // 2
    growth = (rss_at(len(ids)) - rss_at(half)) / max(1, len(ids) - half) * 1000
    result: dict[str, Any] = {
        "hardware": hardware(),
        "jobs": len(ids),
        "statuses": sorted(statuses),
        "jobs_per_s": len(ids) / elapsed,
        "first_200": window(latency[:WINDOW]) | {"rss_mb": rss_at(WINDOW)},
        "last_200": window(latency[-WINDOW:]) | {"rss_mb": rss_at(len(ids))},
        "rss_growth_mb_per_1000_jobs_second_half": growth,
        "rss_samples": rss[:: max(1, len(rss) // 50)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(hardware_line())
    print(f"{len(ids)} jobs, statuses {sorted(statuses)}, {result['jobs_per_s']:.1f} jobs/s")
    for name in ("first_200", "last_200"):
        w = result[name]
        print(f"{name}: p50 {w['p50_s']:.3f} s  p99 {w['p99_s']:.3f} s  worker RSS {w['rss_mb']:.0f} MB")
    print(f"RSS growth over the second half: {growth:+.1f} MB per 1,000 jobs")


if __name__ == "__main__":
    main()

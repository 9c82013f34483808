"""System overhead: N jobs through the whole system vs a bare loop running the same engine.

    system: Producer.enqueue_many -> SdqWorker in this process (run_worker(..., burst=True))
            -> PNG -> moto's S3 API server over HTTP -> status read back with Producer.status
    bare:   for each request: engine.render -> encode_png in memory (the same PNG bytes)

Both run the same requests (same seeds) on the same engine object, interleaved repeat by repeat.
The ratio system/bare of images per second is the share of the engine's throughput the system
keeps; the goal is >= 0.97 with the GPU stand-in at 300 ms per render. Two engines:

- ``standin``: bench/standin.py, a GIL-free sleep per render (models a GPU: the CPU is idle while
  it works) returning noise images of the right size, so encoding and upload are real work.
- ``tiny``: the real DiffusersEngine on the tiny random-weight model (CPU). Here the model and the
  system share two cores, so this ratio is a CPU-contention figure, not a GPU one.

``--mode`` names the worker variant (settings applied to the worker): ``sequential`` (one job per
engine call, everything on the render path: the baseline), ``pipelined`` (encode, upload and
status on the background stage, ``SDQ_PIPELINE=true``) or ``batchB`` (cross-job batching,
``max_batch`` = B); ``--set KEY=VALUE`` sets any other worker setting.

    python bench/system_overhead.py                       # both engines, 20 jobs each
    python bench/system_overhead.py --engine standin --render-s 0.3 --jobs 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/x.py` finds sdqueue/bench

from bench.common import (
    Report,
    measure,
    measure_pair,
    quiet_libraries,
    redis_server,
    s3_server,
    tiny_model_dir,
)
from bench.standin import StandinEngine
from sdqueue.config import Settings
from sdqueue.engine import Engine, RenderItem
from sdqueue.images import encode_png
from sdqueue.jobs import GenerationRequest, Status

GOAL = 0.97
MODES: dict[str, dict[str, Any]] = {
    "sequential": {"max_batch": 1, "pipeline": False},
    # Encode, upload and status of job k on a background stage while job k+1 renders.
    "pipelined": {"max_batch": 1, "pipeline": True},
    # Cross-job batching: up to B images of compatible queued jobs per engine call. The bare loop
    # stays one request per call, so system/bare reads directly as the gain over B = 1.
    "batch2": {"max_batch": 2, "pipeline": False},
    "batch4": {"max_batch": 4, "pipeline": False},
    "batch8": {"max_batch": 8, "pipeline": False},
}


def make_requests(n: int, size: int, steps: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=f"a lighthouse on a cliff at dawn, oil painting, variation {i}",
            steps=steps,
            width=size,
            height=size,
            seed=1000 + i,
        )
        for i in range(n)
    ]


def run_bare(engine: Engine, requests: list[GenerationRequest]) -> list[bytes]:
    """The baseline: render and encode each request's PNGs in memory, nothing else."""
    pngs = []
    for request in requests:
        items = [RenderItem(request, index) for index in range(request.num_images)]
        images = engine.render(items)
        for image, item in zip(images, items, strict=True):
            pngs.append(
                encode_png(image, request, item.index, item.seed, engine.model_id, engine.model_revision)
            )
    return pngs


class SystemRun:
    """One pass of the whole system over REQUESTS; keeps the last pass's job views."""

    def __init__(self, settings: Settings, engine: Engine, requests: list[GenerationRequest]) -> None:
        import redis

        from sdqueue.producer import Producer

        self.settings = settings
        self.engine = engine
        self.requests = requests
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.producer = Producer(settings)
        self.views: list[Any] = []

    def __call__(self) -> None:
        from sdqueue.worker import run_worker

        self.redis.flushdb()
        ids = self.producer.enqueue_many(self.requests)
        run_worker(self.settings, engine=self.engine, burst=True)
        views = [self.producer.status(job_id) for job_id in ids]
        bad = [view for view in views if view.status is not Status.FINISHED]
        if bad:
            raise RuntimeError(f"{len(bad)} of {len(views)} jobs did not finish; first: {bad[0].error}")
        self.views = views

    def empty_pass(self) -> None:
        from sdqueue.worker import run_worker

        self.redis.flushdb()
        run_worker(self.settings, engine=self.engine, burst=True)


def stage_medians(views: list[Any]) -> dict[str, float]:
    """Per-job medians of the worker's own timings, and of the rest of each job's wall time."""
    out: dict[str, float] = {}
    for stage in ("render_s", "encode_s", "upload_s"):
        values = [getattr(view.timings, stage) for view in views if getattr(view.timings, stage) is not None]
        out[stage] = statistics.median(values) if values else float("nan")
    walls = [
        (view.finished_at - view.started_at).total_seconds()
        for view in views
        if view.finished_at and view.started_at
    ]
    out["job_wall_s"] = statistics.median(walls) if walls else float("nan")
    out["other_s"] = out["job_wall_s"] - out["render_s"] - out["encode_s"] - out["upload_s"]
    return out


def bench_engine(
    report: Report,
    label: str,
    engine: Engine,
    requests: list[GenerationRequest],
    base_settings: Settings,
    modes: list[str],
    overrides: dict[str, Any],
    repeats: int,
    warmup: int,
) -> None:
    images = sum(request.num_images for request in requests)
    first = requests[0]
    report.line(
        f"[{label}] {len(requests)} jobs of {first.width}x{first.height}, {first.steps} steps, "
        f"{images} images; model {engine.model_id}"
    )
    entry: dict[str, Any] = {
        "jobs": len(requests),
        "images": images,
        "size": first.width,
        "steps": first.steps,
    }
    for mode in modes:
        settings = base_settings.model_copy(update={**MODES[mode], **overrides})
        system = SystemRun(settings, engine, requests)
        bare_t, system_t = measure_pair(
            lambda: run_bare(engine, requests), system, repeats=repeats, warmup=warmup
        )
        bare_rate, system_rate = images / bare_t.median, images / system_t.median
        report.line(f"  bare loop        {bare_rate:7.2f} img/s   {bare_t.summary()}")
        report.line(f"  system ({mode:10s}) {system_rate:5.2f} img/s   {system_t.summary()}")
        stages = stage_medians(system.views)
        report.line(
            "  per job (median, worker's timings): "
            + ", ".join(f"{name.removesuffix('_s')} {value * 1000:.1f} ms" for name, value in stages.items())
        )
        ratio = report.ratio(
            f"system/bare [{label}, {mode}]", system_rate, bare_rate, GOAL if label == "standin" else None
        )
        # A burst worker's start and stop (store check, boto3 client, rq registration) is paid once
        # per pass, not per job: measured alone on an empty queue, so the per-job cost can be read.
        empty_t = measure(system.empty_pass, repeats=repeats, warmup=0)
        steady_rate = images / max(system_t.median - empty_t.median, 1e-9)
        report.line(f"  worker start+stop on an empty queue: {empty_t.summary()}")
        report.line(
            f"  derived, start/stop excluded: {steady_rate:.2f} img/s, ratio {steady_rate / bare_rate:.3f}"
        )
        entry[mode] = {
            "bare_s": bare_t.samples,
            "system_s": system_t.samples,
            "bare_img_per_s": bare_rate,
            "system_img_per_s": system_rate,
            "ratio": ratio,
            "empty_worker_pass_s": empty_t.samples,
            "ratio_start_stop_excluded": steady_rate / bare_rate,
            "per_job_median_s": stages,
        }
    report.results[label] = entry


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in Settings.model_fields:
            raise SystemExit(f"--set takes KEY=VALUE with KEY a Settings field, got {pair!r}")
        overrides[key] = value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=["standin", "tiny", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--render-s", type=float, default=0.3, help="stand-in seconds per render")
    parser.add_argument("--size", type=int, default=512, help="stand-in image size (px)")
    parser.add_argument("--steps", type=int, default=20, help="stand-in steps (progress callbacks)")
    parser.add_argument("--tiny-size", type=int, default=128)
    parser.add_argument("--tiny-steps", type=int, default=10)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads for the tiny model (1: load from others cannot stall OpenMP barriers)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mode", action="append", choices=sorted(MODES), help="worker variant(s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a worker setting")
    parser.add_argument("--s3-in-process", action="store_true", help="moto in this process (shares the GIL)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    modes = args.mode or ["sequential"]
    quiet_libraries()
    overrides = parse_overrides(args.set)

    report = Report("system overhead: enqueue -> worker -> PNG -> S3 -> status, vs a bare loop")
    report.header()
    with redis_server() as redis_url, s3_server(in_process=args.s3_in_process) as s3_url:
        base = Settings(
            redis_url=redis_url,
            queue=f"bench-{uuid.uuid4().hex[:8]}",
            storage_url="s3://sdq-bench/renders",
            s3_endpoint_url=s3_url,
            s3_create_bucket=True,
            device="cpu",
            log_level="WARNING",
        )
        report.line(f"S3: moto {'in this process' if args.s3_in_process else 'in a child process'}")
        if args.engine in ("standin", "both"):
            engine: Engine = StandinEngine(args.render_s)
            requests = make_requests(args.jobs, args.size, args.steps)
            report.line(f"GPU STAND-IN: render = time.sleep({args.render_s}) per image, noise images")
            bench_engine(
                report, "standin", engine, requests, base, modes, overrides, args.repeats, args.warmup
            )
        if args.engine in ("tiny", "both"):
            import torch

            from sdqueue.engine import DiffusersEngine

            # Measured: with 2 threads on 2 shared cores, one pass took 6 s alone and 107 s while
            # another process ran torch; one thread leaves the other core to Redis, moto and others.
            torch.set_num_threads(args.torch_threads)
            started = time.perf_counter()
            engine = DiffusersEngine.load(Settings(model=str(tiny_model_dir()), device="cpu"))
            report.line(
                f"tiny model loaded in {time.perf_counter() - started:.2f} s (CPU, fp32, "
                f"{args.torch_threads} torch thread(s))"
            )
            requests = make_requests(args.jobs, args.tiny_size, args.tiny_steps)
            bench_engine(report, "tiny", engine, requests, base, modes, overrides, args.repeats, args.warmup)
    report.write(args.json)


if __name__ == "__main__":
    main()

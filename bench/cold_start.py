"""Cold start: from `sdq worker` process start to ready, with a full-size SD 1.5 pipeline.

The model is SD 1.5's architecture with random weights, saved once in fp16 safetensors under
.bench-cache/ by bench/fullsize.py (2.1 GB, nothing downloaded). Reported separately, medians:

- imports: fresh interpreters timing `pass`, the worker's own modules, `import torch`, and
  `from diffusers import StableDiffusionPipeline` (what DiffusersEngine.load imports first);
- the worker: `sdq worker --burst` on an empty queue; "ready" is the engine's log line
  "model ... loaded on ... in X s, warmed up in Y s", so start-to-ready splits into
  startup+imports (the rest), load (X) and warm-up (Y). Page cache warm, and once cold
  (the model's files evicted with posix_fadvise(DONTNEED), nobody else's);
- the load alone, several ways in fresh interpreters (imports excluded): what production does,
  and the alternatives that show where load time goes (dtype, low_cpu_mem_usage).

    python bench/cold_start.py [--repeats 3] [--skip-fp16-worker]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/x.py` finds sdqueue/bench

from bench.common import ROOT, Report, redis_server
from bench.fullsize import DEFAULT_DIR, ensure_fullsize

READY = re.compile(r"model .* loaded on (\S+) \((\S+)\) in ([\d.]+) s, warmed up in ([\d.]+) s")

IMPORTS = {
    "python -c pass": "pass",
    "sdqueue worker modules (cli, worker, rq)": "import sdqueue.cli, sdqueue.worker",
    "import torch": "import torch",
    "torch + diffusers StableDiffusionPipeline": (
        "import torch\nfrom diffusers import StableDiffusionPipeline"
    ),
}

# Each load variant runs in a fresh interpreter; imports happen before the clock starts.
LOAD_CHILD = """
import json, sys, time
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging
logging.set_verbosity_error()
logging.disable_progress_bar()
path, dtype, extra = sys.argv[1], getattr(torch, sys.argv[2]), json.loads(sys.argv[3])
started = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(
    path, dtype=dtype, safety_checker=None, requires_safety_checker=False, **extra
)
pipe = pipe.to("cpu")
loaded = time.perf_counter()
# Touch every weight once, so lazily mapped pages are counted here and not in the first render.
modules = (pipe.unet, pipe.vae, pipe.text_encoder)
total = sum(float(p.detach().float().abs().sum()) for m in modules for p in m.parameters())
touched = time.perf_counter()
print(json.dumps({"load_s": loaded - started, "touch_s": touched - loaded, "finite": total == total}))
"""

# The proposal measured: read the weights into the page cache on a thread while the main thread
# imports torch and diffusers (CPU-bound, ~5 s here), instead of reading them after the imports.
PREFETCH_CHILD = """
import json, sys, threading, time
from pathlib import Path
started = time.perf_counter()
path, prefetch = sys.argv[1], sys.argv[2] == "prefetch"

def read_all():
    buffer = bytearray(16 << 20)
    for file in sorted(Path(path).rglob("*.safetensors"), key=lambda f: -f.stat().st_size):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass

if prefetch:
    threading.Thread(target=read_all, daemon=True).start()
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging
logging.set_verbosity_error()
logging.disable_progress_bar()
imported = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(
    path, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
).to("cpu")
done = time.perf_counter()
print(json.dumps({"imports_s": imported - started, "load_s": done - imported, "total_s": done - started}))
"""

LOAD_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "production (fp32 on CPU from fp16 files)": ("float32", {}),
    "fp32, low_cpu_mem_usage=False": ("float32", {"low_cpu_mem_usage": False}),
    "fp16 (the files' own dtype)": ("float16", {}),
}


def evict(directory: Path) -> None:
    """Drop DIRECTORY's files from the page cache (only these files: the machine is shared)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_import(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started


def run_worker_process(model: Path, env: dict[str, str]) -> dict[str, float]:
    """Start `sdq worker --burst`, return seconds to ready, the logged load and warm-up, and exit."""
    cmd = [sys.executable, "-m", "sdqueue", "worker", "--burst", "--model", str(model)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    found: dict[str, float] = {}
    tail: list[str] = []
    for line in proc.stderr:
        tail = [*tail[-20:], line]
        match = READY.search(line)
        if match and not found:
            found = {
                "ready_s": time.perf_counter() - started,
                "load_s": float(match.group(3)),
                "warmup_s": float(match.group(4)),
            }
    proc.wait()
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{''.join(tail)}")
    found["exit_s"] = time.perf_counter() - started
    found["startup_s"] = found["ready_s"] - found["load_s"] - found["warmup_s"]
    return found


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR, help="built there if missing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-imports", action="store_true")
    parser.add_argument("--skip-fp16-worker", action="store_true", help="fp16 warm-up on CPU is slow")
    parser.add_argument("--skip-load-variants", action="store_true")
    parser.add_argument("--skip-prefetch", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    report = Report("cold start: `sdq worker` start to ready, full-size SD 1.5 architecture (random weights)")
    report.header()
    model = ensure_fullsize(args.model)
    size_gb = sum(p.stat().st_size for p in model.rglob("*.safetensors")) / 1e9
    report.line(f"model: {model} ({size_gb:.2f} GB fp16 safetensors)")

    if not args.skip_imports:
        imports: dict[str, list[float]] = {}
        for label, code in IMPORTS.items():
            time_import(code)  # warm-up: .pyc files and the page cache
            imports[label] = [time_import(code) for _ in range(args.repeats)]
            report.line(f"import  {label:45s} median {median(imports[label]):6.2f} s")
        report.results["imports_s"] = imports

    with redis_server() as redis_url, tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
        env |= {
            "SDQ_REDIS_URL": redis_url,
            "SDQ_STORAGE_URL": Path(tmp).as_uri(),
            "SDQ_QUEUE": "bench-cold",
            "SDQ_DEVICE": "cpu",
            "SDQ_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
        workers: dict[str, Any] = {}
        configs = [("fp32 (CPU default)", {"SDQ_DTYPE": "float32"})]
        if not args.skip_fp16_worker:
            configs.append(("fp16 on CPU", {"SDQ_DTYPE": "float16"}))
        for label, extra in configs:
            run_worker_process(model, env | extra)  # warm-up: page cache, .pyc
            runs = [run_worker_process(model, env | extra) for _ in range(args.repeats)]
            s = summarize(runs)
            report.line(
                f"worker {label:20s} ready {s['ready_s']:6.2f} s = startup+imports {s['startup_s']:5.2f} "
                f"+ load {s['load_s']:5.2f} + warm-up {s['warmup_s']:5.2f}  (exit {s['exit_s']:.2f}; "
                f"median of {len(runs)}, page cache warm)"
            )
            workers[label] = {"runs": runs, "median": s}
        evict(model)
        cold = run_worker_process(model, env | {"SDQ_DTYPE": "float32"})
        report.line(
            f"worker fp32, model files evicted: ready {cold['ready_s']:6.2f} s = startup+imports "
            f"{cold['startup_s']:5.2f} + load {cold['load_s']:5.2f} + warm-up {cold['warmup_s']:5.2f} (1 run)"
        )
        workers["fp32, page cache cold"] = {"runs": [cold], "median": cold}
        report.results["worker"] = workers

    if not args.skip_load_variants:
        import json

        variants: dict[str, Any] = {}
        baseline = None
        for label, (dtype, extra) in LOAD_VARIANTS.items():
            runs = []
            for _ in range(args.repeats):
                done = subprocess.run(
                    [sys.executable, "-c", LOAD_CHILD, str(model), dtype, json.dumps(extra)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-2000:])
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            load = median(run["load_s"] for run in runs)
            touch = median(run["touch_s"] for run in runs)
            baseline = baseline or load
            report.line(
                f"load    {label:45s} median {load:6.2f} s (then touching every weight {touch:5.2f} s); "
                f"vs production x{baseline / load:.2f}"
            )
            variants[label] = {"runs": runs, "load_s": load, "touch_s": touch}
        report.results["load_variants"] = variants

    if not args.skip_prefetch:
        import json

        prefetch: dict[str, Any] = {}
        for _ in range(args.repeats):
            for mode in ("baseline", "prefetch"):  # interleaved, each from a cold page cache
                evict(model)
                done = subprocess.run(
                    [sys.executable, "-c", PREFETCH_CHILD, str(model), mode],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-2000:])
                prefetch.setdefault(mode, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
        medians = {mode: summarize(runs) for mode, runs in prefetch.items()}
        for mode, s in medians.items():
            report.line(
                f"cold cache, imports then fp32 load, {mode:8s}: imports {s['imports_s']:5.2f} + load "
                f"{s['load_s']:5.2f} = {s['total_s']:5.2f} s (median of {args.repeats})"
            )
        gain = medians["baseline"]["total_s"] / medians["prefetch"]["total_s"]
        report.line(f"ratio import+load time baseline/prefetch (cold cache): x{gain:.2f}")
        report.results["prefetch"] = {"runs": prefetch, "median": medians, "speedup": gain}
    report.write(args.json)


if __name__ == "__main__":
    main()

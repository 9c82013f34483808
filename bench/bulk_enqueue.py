"""Bulk enqueue: Producer.enqueue_many vs a loop of single Producer.enqueue, and the CLI.

    in-process: enqueue_many(10,000 requests), one MULTI/EXEC round trip, vs enqueue() per request
                (2,000 by default: the loop is the slow baseline); jobs/s of both, same Redis;
                and vs rq's own Queue.enqueue_many for the same jobs in one pipeline (what
                Producer.enqueue_many did before it stamped the hashes itself, sdqueue/rqhash.py)
    CLI:        `sdq enqueue --file requests.jsonl` for 10,000 lines, process start included,
                beside `sdq --help` (the interpreter and import cost alone)

Goal: >= 5,000 jobs/s in-process for the bulk path. Every pass starts from an empty database.

    python bench/bulk_enqueue.py [--bulk 10000] [--single 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/x.py` finds sdqueue/bench

import redis

from bench.common import Report, measure, measure_pair, redis_server
from sdqueue.config import Settings
from sdqueue.jobs import RENDER_FUNC, GenerationRequest
from sdqueue.producer import Producer
from sdqueue.rqhash import write_jobs_with_rq

GOAL_JOBS_PER_S = 5000


def make_requests(n: int) -> list[GenerationRequest]:
    # Validated objects, as the CLI and API hand them over; half with a seed, half choosing one.
    return [
        GenerationRequest(prompt=f"a red fox in snow, number {i}", steps=25, seed=i if i % 2 else None)
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bulk", type=int, default=10_000, help="requests per enqueue_many pass")
    parser.add_argument("--single", type=int, default=2_000, help="requests per loop-of-enqueue pass")
    parser.add_argument("--cli", type=int, default=10_000, help="lines in the CLI's --file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    report = Report("bulk enqueue: enqueue_many vs a loop of enqueue, and `sdq enqueue --file`")
    report.header()
    with redis_server() as redis_url:
        settings = Settings(redis_url=redis_url, queue="bench-bulk")
        client = redis.Redis.from_url(redis_url)
        producer = Producer(settings)
        bulk_requests = make_requests(args.bulk)
        single_requests = make_requests(args.single)

        def bulk() -> None:
            client.flushdb()
            ids = producer.enqueue_many(bulk_requests)
            assert len(ids) == args.bulk

        def rq_bulk() -> None:
            client.flushdb()
            jobs = [producer._new_job(request, None, None) for request in bulk_requests]
            with client.pipeline() as pipe:
                write_jobs_with_rq(pipe, producer.queue, RENDER_FUNC, jobs, **producer._shared_options())
                pipe.execute()

        def single() -> None:
            client.flushdb()
            for request in single_requests:
                producer.enqueue(request)

        # flushdb is inside the timed call for both; it is ~1 ms for 10,000 jobs (measured below).
        flush_t = measure(client.flushdb, repeats=args.repeats, warmup=0)
        rq_bulk_t, bulk_t = measure_pair(rq_bulk, bulk, repeats=args.repeats, warmup=args.warmup)
        single_t = measure(single, repeats=args.repeats, warmup=args.warmup)
        assert client.llen(f"rq:queue:{settings.queue}") == args.single
        bulk_rate, single_rate = args.bulk / bulk_t.median, args.single / single_t.median
        rq_bulk_rate = args.bulk / rq_bulk_t.median
        report.line(f"flushdb alone: {flush_t.summary()}")
        report.line(f"enqueue_many x {args.bulk:>6}: {bulk_rate:8.0f} jobs/s   {bulk_t.summary()}")
        report.line(f"rq's enqueue_many x {args.bulk:>6}: {rq_bulk_rate:8.0f} jobs/s   {rq_bulk_t.summary()}")
        report.line(f"enqueue loop x {args.single:>6}: {single_rate:8.0f} jobs/s   {single_t.summary()}")
        report.ratio("enqueue_many / enqueue loop (jobs/s)", bulk_rate, single_rate)
        report.ratio("enqueue_many / rq's enqueue_many (jobs/s)", bulk_rate, rq_bulk_rate)
        met = "met" if bulk_rate >= GOAL_JOBS_PER_S else "MISSED"
        report.line(f"goal >= {GOAL_JOBS_PER_S} jobs/s in-process for enqueue_many: {met}")
        report.results["in_process"] = {
            "bulk_n": args.bulk,
            "bulk_s": bulk_t.samples,
            "bulk_jobs_per_s": bulk_rate,
            "rq_bulk_s": rq_bulk_t.samples,
            "rq_bulk_jobs_per_s": rq_bulk_rate,
            "single_n": args.single,
            "single_s": single_t.samples,
            "single_jobs_per_s": single_rate,
            "ratio": bulk_rate / single_rate,
        }

        with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
            path = Path(tmp) / "requests.jsonl"
            lines = (
                json.dumps(r.model_dump(mode="json", exclude_none=True)) for r in make_requests(args.cli)
            )
            path.write_text("\n".join(lines) + "\n")
            env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
            env |= {"SDQ_REDIS_URL": redis_url, "SDQ_QUEUE": settings.queue}
            sdq = [sys.executable, "-m", "sdqueue"]

            def cli() -> None:
                client.flushdb()
                done = subprocess.run([*sdq, "enqueue", "--file", str(path)], env=env, capture_output=True)
                if done.returncode != 0 or len(done.stdout.split()) != args.cli:
                    raise RuntimeError(f"sdq enqueue --file failed: {done.stderr.decode()[-500:]}")

            def cli_help() -> None:
                subprocess.run([*sdq, "--help"], env=env, capture_output=True, check=True)

            help_t = measure(cli_help, repeats=args.repeats, warmup=1)
            cli_t = measure(cli, repeats=args.repeats, warmup=args.warmup)
        cli_rate = args.cli / cli_t.median
        report.line(f"`sdq --help` (start + imports): {help_t.summary()}")
        report.line(
            f"`sdq enqueue --file` x {args.cli}: {cli_rate:8.0f} jobs/s end to end   {cli_t.summary()}"
        )
        report.line(
            f"  of which process start ~{help_t.median:.2f} s; the rest "
            f"{args.cli / max(cli_t.median - help_t.median, 1e-9):.0f} jobs/s (read, validate, enqueue)"
        )
        report.ratio("CLI end to end / in-process enqueue_many (jobs/s)", cli_rate, bulk_rate)
        report.results["cli"] = {
            "lines": args.cli,
            "cli_s": cli_t.samples,
            "cli_jobs_per_s": cli_rate,
            "help_s": help_t.samples,
        }
    report.write(args.json)


if __name__ == "__main__":
    main()

"""Fault injection for the reliability tests: real processes, real sockets, real signals."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import settings_env

from sdqueue.config import Settings
from sdqueue.producer import Producer


class TcpProxy:
    """A loopback TCP forwarder that can be cut and restored: storage 'goes down' for real."""

    def __init__(self, target_port: int, port: int) -> None:
        self.target_port = target_port
        self.port = port
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening and reset every open connection."""
        with self._lock:
            if self._listener is not None:
                # shutdown() wakes the thread blocked in accept(); close() alone would not on Linux.
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


class WorkerProcess:
    """A real `sdq worker` process with its log kept for failure messages."""

    def __init__(self, settings: Settings, log: Path, *args: str) -> None:
        self.log = log
        self._sink = log.open("w")
        cmd = [sys.executable, "-m", "sdqueue", "worker", *args]
        self.proc = subprocess.Popen(
            cmd, env=settings_env(settings), stdout=self._sink, stderr=subprocess.STDOUT
        )

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._sink.close()

    def text(self) -> str:
        self._sink.flush()
        return self.log.read_text()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class StatusRecorder(threading.Thread):
    """Polls a job's status in the background: the sequence proves it never goes backwards."""

    def __init__(self, producer: Producer, job_id: str) -> None:
        super().__init__(daemon=True)
        self.producer, self.job_id = producer, job_id
        self.seen: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            self._poll()

    def _poll(self) -> None:
        with contextlib.suppress(Exception):
            status = self.producer.status(self.job_id).status.value
            if not self.seen or self.seen[-1] != status:
                self.seen.append(status)

    def stop(self) -> list[str]:
        """The statuses seen, the last one read after polling stopped: a job that ended just
        before stop() is seen ending, however the 50 ms polls fell."""
        self._halt.set()
        self.join(timeout=5)
        self._poll()
        return self.seen


def status_json(settings: Settings, job_id: str) -> dict[str, Any]:
    return json.loads(Producer(settings).status(job_id).model_dump_json())  # type: ignore[no-any-return]

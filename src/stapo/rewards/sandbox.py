"""Bounded-time math-verify calls: persistent worker processes that are killed when late.

    verify_in_worker(pred, gold, timeout) -> (verdict, status)

Works the same from a main thread, a worker thread, a daemonic multiprocessing worker or a Ray
actor: workers are plain ``subprocess.Popen`` children spoken to over pipes, and the deadline is
a ``select`` on the reply pipe, not a signal. A late worker is killed (SIGKILL) and replaced on
the next call. Workers are reused across calls (start-up imports sympy, ~1 s; it is not charged
to the item's timeout) and exit by themselves when their parent closes the pipes or dies.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time

__all__ = ["WORKER_START_TIMEOUT", "WorkerError", "shutdown_workers", "verify_in_worker", "warmup"]

WORKER_START_TIMEOUT = 120.0  # seconds; importing sympy on a loaded 2-core machine can be slow
_WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")
# How much of the item's time the worker may use before giving up by itself (a soft timeout
# costs no restart); the parent's hard kill comes at the full timeout.
_SOFT_FRACTION = 0.8


class WorkerError(RuntimeError):
    """A grading worker could not be started."""


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONHASHSEED"] = env.get("PYTHONHASHSEED", "0")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-s", _WORKER_PATH],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        line = self._read_line(time.monotonic() + WORKER_START_TIMEOUT)
        if line is None or b"ready" not in line:
            self.kill()
            raise WorkerError(
                f"the grading worker ({_WORKER_PATH}) did not start within "
                f"{WORKER_START_TIMEOUT:.0f} s; is math-verify installed for {sys.executable}?"
            )

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # the worker died
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def request(self, pred: str, gold: str, timeout: float) -> dict | None:
        """The worker's reply, or None if it did not come within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        msg = json.dumps({"pred": pred, "gold": gold, "soft_timeout": timeout * _SOFT_FRACTION})
        try:
            self.proc.stdin.write(msg.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._read_line(deadline)
        if line is None:
            return None
        try:
            return json.loads(line)
        except ValueError:
            return None

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class _WorkerPool:
    """Idle workers for this process (a forked child starts its own: pipes are not shareable)."""

    def __init__(self, max_idle: int | None = None) -> None:
        self.max_idle = max_idle or max(2, min(8, os.cpu_count() or 1))
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.started = 0
        self.killed = 0

    def acquire(self) -> _Worker:
        with self._lock:
            if self._pid != os.getpid():  # we are a fork: the parent's workers are not ours
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                w = self._idle.pop()
                if w.proc.poll() is None:
                    return w
        w = _Worker()
        with self._lock:
            self.started += 1
        return w

    def release(self, w: _Worker, healthy: bool) -> None:
        if healthy and w.proc.poll() is None:
            with self._lock:
                if self._pid == os.getpid() and len(self._idle) < self.max_idle:
                    self._idle.append(w)
                    return
        w.kill()
        with self._lock:
            self.killed += 1

    def shutdown(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            mine = self._pid == os.getpid()
        if mine:
            for w in idle:
                w.kill()


_POOL = _WorkerPool()
atexit.register(_POOL.shutdown)


def warmup(n: int = 1) -> None:
    """Start ``n`` workers now (a trainer calls this once so the first batch is not slower)."""
    workers = [_POOL.acquire() for _ in range(n)]
    for w in workers:
        _POOL.release(w, healthy=True)


def shutdown_workers() -> None:
    """Stop this process's idle grading workers (they also stop by themselves at exit)."""
    _POOL.shutdown()


def pool_counters() -> dict[str, int]:
    return {"workers_started": _POOL.started, "workers_killed": _POOL.killed}


def verify_in_worker(pred: str, gold: str, timeout: float) -> tuple[float, str]:
    """math-verify's verdict on (pred, gold) within ``timeout`` seconds: (1.0 | 0.0, status).

    status: ``ok``, ``no_parse``, ``gold_no_parse``, ``timeout`` (the worker gave up or was
    killed), ``error`` (the worker failed; the verdict is 0.0).
    """
    try:
        w = _POOL.acquire()
    except (WorkerError, OSError) as e:
        return 0.0, f"error:{e}"
    reply = w.request(pred, gold, timeout)
    if reply is None:
        _POOL.release(w, healthy=False)  # late or dead: kill it, the next call starts another
        return 0.0, "timeout"
    _POOL.release(w, healthy=True)
    status = reply.get("status", "error")
    if status == "soft_timeout":
        status = "timeout"
    verdict = 1.0 if reply.get("verdict") == 1.0 and status == "ok" else 0.0
    return verdict, status

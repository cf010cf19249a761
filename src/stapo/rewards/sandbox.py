"""Bounded-time math-verify calls: persistent worker processes that are killed when late.

    verify_in_worker(pred, gold, timeout) -> (verdict, status)

Works the same from a main thread, a worker thread, a daemonic multiprocessing worker or a Ray
actor: workers are plain ``subprocess.Popen`` children spoken to over pipes, and the deadline is
a ``select`` on the reply pipe, not a signal. A late worker is killed (SIGKILL) and a replacement
starts in the background. Workers are reused across calls (start-up imports sympy, ~1-3 s: ``warmup`` pays it when
grading is set up; without it, the first start in a process is waited for outside the item's
timeout) and exit by themselves when their parent closes the pipes or dies.
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
from typing import Any

__all__ = [
    "WORKER_START_TIMEOUT",
    "WorkerError",
    "default_workers",
    "ensure_workers",
    "shutdown_workers",
    "verify_in_worker",
    "warmup",
]

WORKER_START_TIMEOUT = 120.0  # seconds; importing sympy on a loaded 2-core machine can be slow
_WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")
# How much of the item's time the worker may use before giving up by itself (a soft timeout
# costs no restart); the parent's hard kill comes at the full timeout.
_SOFT_FRACTION = 0.8


def cpu_count() -> int:
    """CPUs this process may run on (affinity-aware: taskset, some container runtimes)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
        assert self.proc.stdout is not None  # opened with stdout=PIPE
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

    def request(self, pred: str, gold: str, timeout: float) -> dict[str, Any] | None:
        """The worker's reply, or None if it did not come within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        msg = json.dumps({"pred": pred, "gold": gold, "soft_timeout": timeout * _SOFT_FRACTION})
        assert self.proc.stdin is not None  # opened with stdin=PIPE
        try:
            self.proc.stdin.write(msg.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._read_line(deadline)
        if line is None:
            return None
        try:
            reply: dict[str, Any] = json.loads(line)
        except ValueError:
            return None
        return reply

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is None:  # never: both are pipes
                continue
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class _WorkerPool:
    """This process's grading workers (a forked child starts its own: pipes are not shareable).

    ``target`` workers are kept alive. A caller takes an idle one, or waits (within its deadline)
    for one to be released or started; workers are started in background threads, so a killed
    worker's replacement never blocks the next item. Only the very first start in a process is
    waited for without a deadline (it imports sympy, ~1-3 s): otherwise the first items of a run
    would score 0 for want of a worker.
    """

    def __init__(self, target: int | None = None) -> None:
        env = os.environ.get("STAPO_GRADER_WORKERS")
        self.target = target or (int(env) if env else max(2, min(8, cpu_count())))
        # the pool grows up to this when callers have to wait for a worker
        self.max_target = max(self.target, min(16, 2 * cpu_count()))
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live = 0  # started and not killed (idle or busy)
        self._spawning = 0
        self._pid = os.getpid()
        self._last_error: str | None = None
        self.started = 0
        self.killed = 0

    def _check_fork(self) -> None:
        """Called before taking the lock: in a forked child the parent's lock may be held
        forever (by a thread that does not exist here) and its workers are not ours."""
        if self._pid != os.getpid():
            self._reset()

    def _top_up(self) -> None:
        """Start workers in the background until ``target`` are alive or starting (lock held)."""
        while self._live + self._spawning < self.target:
            self._spawning += 1
            threading.Thread(target=self._spawn, daemon=True, name="stapo-grader-start").start()

    def _spawn(self) -> None:
        try:
            w, error = _Worker(), None
        except (WorkerError, OSError) as e:
            w, error = None, str(e)
        with self._cond:
            self._spawning -= 1
            if w is not None and self._pid == os.getpid():
                self.started += 1
                self._live += 1
                self._idle.append(w)
            else:
                self._last_error = error or self._last_error
            self._cond.notify_all()
        if w is not None and self._pid != os.getpid():
            w.kill()

    def ensure(self, n: int) -> None:
        """Keep at least ``n`` workers alive from now on."""
        self._check_fork()
        with self._cond:
            self.target = max(self.target, n)
            self.max_target = max(self.max_target, n)
            self._top_up()

    def acquire(self, deadline: float) -> _Worker | None:
        """An idle worker, or None if none is free before ``deadline`` (time.monotonic())."""
        self._check_fork()
        with self._cond:
            self._top_up()
            while True:
                while self._idle:
                    w = self._idle.pop()
                    if w.proc.poll() is None:
                        return w
                    self._live -= 1  # died while idle
                    self._top_up()
                if self.started == 0:
                    # cold start: wait for the first worker however long sympy takes to import
                    if self._spawning == 0:
                        raise WorkerError(self._last_error or "no grading worker could be started")
                    self._cond.wait(WORKER_START_TIMEOUT)
                    continue
                if self.target < self.max_target:
                    # callers are queueing: grow the pool (in the background) for the next ones
                    self.target += 1
                    self._top_up()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def release(self, w: _Worker, healthy: bool) -> None:
        with self._cond:
            mine = self._pid == os.getpid()
            if healthy and mine and w.proc.poll() is None:
                self._idle.append(w)
                self._cond.notify()
                return
            if mine:
                self._live -= 1
                self.killed += 1
                self._top_up()  # the replacement starts in the background
        w.kill()

    def shutdown(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            mine = self._pid == os.getpid()
            if mine:
                self._live -= len(idle)
        if mine:
            for w in idle:
                w.kill()


_POOL = _WorkerPool()
atexit.register(_POOL.shutdown)


def default_workers() -> int:
    """How many answers ``grade_batch`` grades at once by default: one per core, at most 8."""
    return max(1, min(8, cpu_count()))


def warmup(n: int | None = None, wait: bool = True) -> None:
    """Start ``n`` grading workers now (default: ``default_workers()``), so that no answer waits
    for a worker's start-up (sympy imports, 1-3 s) and every answer's latency stays within its
    timeout. Grading set-up calls it (``trl_reward_fn``, ``stapo eval``); ``n`` = the number of
    threads that grade at once. ``wait=False`` starts them in the background (while a model
    loads) and returns at once; the default waits until they are ready, and raises
    :class:`WorkerError` if none can start."""
    n = default_workers() if n is None else n
    _POOL.ensure(n)
    if not wait:
        return
    taken = [_POOL.acquire(time.monotonic() + WORKER_START_TIMEOUT) for _ in range(n)]
    for w in taken:
        if w is not None:
            _POOL.release(w, healthy=True)


def ensure_workers(n: int) -> None:
    """Keep at least ``n`` grading workers alive in this process (started in the background)."""
    _POOL.ensure(n)


def shutdown_workers() -> None:
    """Stop this process's idle grading workers (they also stop by themselves at exit)."""
    _POOL.shutdown()


def pool_counters() -> dict[str, int]:
    return {"workers_started": _POOL.started, "workers_killed": _POOL.killed}


def verify_in_worker(pred: str, gold: str, timeout: float) -> tuple[float, str]:
    """math-verify's verdict on (pred, gold) within about ``timeout`` seconds: (1.0 | 0.0, status).

    status: ``ok``, ``no_parse``, ``gold_no_parse``, ``timeout`` (the worker gave up or was
    killed), ``busy`` (no worker came free in time), ``error`` (the worker failed; 0.0).
    When the caller had to wait for a worker, the request still gets half of ``timeout``, so
    the worst case under contention is about 1.5 x ``timeout``.
    """
    start = time.monotonic()
    try:
        w = _POOL.acquire(start + timeout / 2)
    except (WorkerError, OSError) as e:
        return 0.0, f"error:{e}"
    if w is None:
        return 0.0, "busy"
    left = max(timeout - (time.monotonic() - start), timeout / 2)
    reply = w.request(pred, gold, left)
    if reply is None:
        _POOL.release(w, healthy=False)  # late or dead: kill it; a replacement starts now
        return 0.0, "timeout"
    _POOL.release(w, healthy=True)
    status = reply.get("status", "error")
    if status == "soft_timeout":
        status = "timeout"
    verdict = 1.0 if reply.get("verdict") == 1.0 and status == "ok" else 0.0
    return verdict, status

"""Math answer grading: 1.0 if the completion's final answer equals the gold, else 0.0.

    math_reward(completion, gold, timeout=5.0)            one completion
    grade_batch(completions, golds, timeout=5.0, workers) many, in parallel worker processes
    grading_stats() / reset_grading_stats()               counters a trainer can log

Pipeline for one item (every step bounded; nothing evaluates the text):

    extract_answer  ->  clean / normalize_gold  ->  fast_verdict (no sympy)
        -> pathological_reason (refuse, score 0)  ->  math-verify in a killable worker process

A timeout, a parse failure or any internal error scores 0.0 and is counted; nothing is raised
into the training loop (bad *arguments*, such as mismatched list lengths or a completion that is
neither text nor a chat-message list, still raise).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stapo.rewards.extract import EXTRACTION_MODES, all_boxed, extract_answer
from stapo.rewards.normalize import (
    MAX_ANSWER_CHARS,
    clean_answer,
    control_character,
    fast_verdict,
    normalize_gold,
    pathological_reason,
    split_top_level,
)
from stapo.rewards.sandbox import default_workers, ensure_workers, pool_counters, verify_in_worker

__all__ = ["completion_text", "grade_batch", "grade_answer", "grading_stats", "math_reward", "reset_grading_stats"]

_COUNTER_NAMES = (
    "graded",  # items scored
    "correct",  # items scored 1.0
    "no_answer",  # nothing extracted
    "fast_path",  # decided without sympy
    "rejected",  # refused as pathological (scored 0)
    "worker_calls",  # sent to math-verify
    "timeouts",  # math-verify ran out of time (scored 0)
    "busy",  # no grading worker came free in time (scored 0)
    "parse_failures",  # math-verify could not parse the answer (scored 0)
    "gold_parse_failures",  # ... or the gold (scored 0 unless the fast path matched)
    "errors",  # anything else that went wrong (scored 0)
)


class _Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.counts = {k: 0 for k in _COUNTER_NAMES}
            self.max_latency_s = 0.0
            self.reasons: dict[str, int] = {}

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                self.counts[k] += v

    def record(self, verdict: float, latency: float) -> None:
        with self._lock:
            self.counts["graded"] += 1
            self.counts["correct"] += int(verdict == 1.0)
            self.max_latency_s = max(self.max_latency_s, latency)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.counts["rejected"] += 1
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self.counts)
            out["max_latency_s"] = self.max_latency_s
            out["rejected_reasons"] = dict(self.reasons)
        out.update(pool_counters())
        return out


_STATS = _Stats()


def grading_stats() -> dict[str, Any]:
    """Counters since the last reset (this process): graded, correct, no_answer, fast_path,
    rejected (+ rejected_reasons), worker_calls, timeouts, busy, parse_failures, gold_parse_failures,
    errors, max_latency_s, workers_started, workers_killed."""
    return _STATS.snapshot()


def reset_grading_stats() -> None:
    _STATS.reset()


def _check_timeout(timeout: float) -> float:
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}") from None
    if not t > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return t


def _check_mode(mode: str | None, require_boxed: bool) -> str:
    m = mode or ("boxed" if require_boxed else "auto")
    if m not in EXTRACTION_MODES:
        raise ValueError(f"mode must be one of {EXTRACTION_MODES}, got {mode!r}")
    return m


def _check_gold(gold: object, where: str = "gold") -> None:
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise ValueError(f"{where} must be a string (or a number), got {type(gold).__name__}: {gold!r}")


def _message_text(message: dict[str, Any], where: str) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        strings = [t for t in texts if isinstance(t, str)]
        if len(strings) == len(texts):
            return "".join(strings)
    raise TypeError(f"{where}: message content must be text or a list of text parts, got {type(content).__name__}")


def completion_text(completion: object, where: str = "completion") -> str:
    """A completion as text: a string as is; a conversational completion (what TRL passes for chat
    prompts, ``[{"role": "assistant", "content": ...}]``, or one such message) as its assistant
    messages' content joined. Anything else is a ``TypeError``: scoring an unreadable completion 0
    would hide the caller's bug as a bad policy."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and all(isinstance(m, dict) for m in completion):
        return "".join(_message_text(m, where) for m in completion if m.get("role", "assistant") == "assistant")
    raise TypeError(
        f"{where} must be a string or a list of chat messages ({{'role': 'assistant', 'content': ...}}), "
        f"got {type(completion).__name__}: {completion!r:.80}"
    )


def _prepare(completion: str, gold: str, mode: str) -> tuple[float | None, str, str]:
    """(verdict if already decided, cleaned answer, cleaned gold). Runs in the caller, cheap."""
    pred = extract_answer(completion, mode=mode)
    if pred is None:
        _STATS.add(no_answer=1)
        return 0.0, "", ""
    if len(pred) > MAX_ANSWER_CHARS:  # before any other string work on it
        _STATS.reject("too_long")
        return 0.0, "", ""
    if control_character(pred) is not None:  # before cleaning, which would strip it
        _STATS.reject("control_character")
        return 0.0, "", ""
    g = normalize_gold(gold)
    p = clean_answer(pred)
    gold_parts = split_top_level(g)
    if len(gold_parts) >= 2 and len(split_top_level(p)) == 1:
        # gold "69,84" and a completion that boxes each answer: \boxed{69} and \boxed{84}
        boxes = all_boxed(completion, max_count=len(gold_parts))
        if len(boxes) == len(gold_parts):
            p = clean_answer(", ".join(boxes))
    verdict = fast_verdict(p, g)
    if verdict is not None:
        _STATS.add(fast_path=1)
        return verdict, p, g
    reason = pathological_reason(p, g)
    if reason is not None:
        _STATS.reject(reason)
        return 0.0, p, g
    return None, p, g


def _finish(p: str, g: str, timeout: float) -> float:
    _STATS.add(worker_calls=1)
    verdict, status = verify_in_worker(p, g, timeout)
    if status == "timeout":
        _STATS.add(timeouts=1)
    elif status == "busy":
        _STATS.add(busy=1)
    elif status == "no_parse":
        _STATS.add(parse_failures=1)
    elif status == "gold_no_parse":
        _STATS.add(gold_parse_failures=1)
    elif status != "ok":
        _STATS.add(errors=1)
    return verdict


def grade_answer(answer: str, gold: str, timeout: float = 5.0) -> float:
    """Grade an already-extracted answer (no extraction step): 1.0 or 0.0."""
    return math_reward("\\boxed{" + answer + "}", gold, timeout=timeout, require_boxed=True)


def math_reward(
    completion: str, gold: str, timeout: float = 5.0, require_boxed: bool = False, mode: str | None = None
) -> float:
    """1.0 if the final answer of ``completion`` equals ``gold`` (math-verify semantics), else 0.0.

    Returns within about ``timeout`` seconds from any thread or process, once the grading
    workers run: call :func:`stapo.rewards.warmup` when grading is set up (``trl_reward_fn`` and
    ``stapo eval`` do); otherwise the first call in a process also waits for a worker's start-up
    (sympy imports, 1-3 s). ``require_boxed=True`` scores only a
    ``\\boxed{}`` / ``\\fbox{}`` answer (``mode="boxed"``); the default also accepts "answer is X"
    and, failing that, the last number (see :func:`stapo.rewards.extract_answer`).
    ``completion`` is text or a chat-message list (:func:`completion_text`); anything else is a
    ``TypeError``.
    """
    t = _check_timeout(timeout)
    m = _check_mode(mode, require_boxed)
    _check_gold(gold)
    text = completion_text(completion)
    start = time.monotonic()
    try:
        verdict, p, g = _prepare(text, str(gold), m)
        if verdict is None:
            verdict = _finish(p, g, t)
    except Exception:  # noqa: BLE001 - a grading bug must not kill a training run
        _STATS.add(errors=1)
        verdict = 0.0
    _STATS.record(verdict, time.monotonic() - start)
    return verdict


def grade_batch(
    completions: list[str],
    golds: list[str],
    timeout: float = 5.0,
    workers: int | None = None,
    require_boxed: bool = False,
    mode: str | None = None,
) -> list[float]:
    """``[math_reward(c, g, timeout) for c, g in zip(completions, golds)]``, in parallel.

    Extraction and the fast path run here; only the items that need sympy go to worker
    processes, ``workers`` of them at a time (None: one per CPU core, at most 8; 1: one worker,
    in order). Each item keeps its own ``timeout``.
    """
    if len(completions) != len(golds):
        raise ValueError(f"grade_batch: {len(completions)} completions but {len(golds)} golds")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    t = _check_timeout(timeout)
    m = _check_mode(mode, require_boxed)
    for i, g in enumerate(golds):
        _check_gold(g, f"golds[{i}]")
    texts = [completion_text(c, f"completions[{i}]") for i, c in enumerate(completions)]
    out: list[float] = [0.0] * len(completions)
    slow: list[tuple[int, str, str, float]] = []
    for i, (c, g) in enumerate(zip(texts, golds)):
        start = time.monotonic()
        try:
            verdict, p, gc = _prepare(c, str(g), m)
        except Exception:  # noqa: BLE001
            _STATS.add(errors=1)
            verdict, p, gc = 0.0, "", ""
        if verdict is None:
            slow.append((i, p, gc, start))
        else:
            out[i] = verdict
            _STATS.record(verdict, time.monotonic() - start)

    def run(item: tuple[int, str, str, float]) -> None:
        i, p, gc, _ = item
        begin = time.monotonic()
        try:
            out[i] = _finish(p, gc, t)
        except Exception:  # noqa: BLE001
            _STATS.add(errors=1)
            out[i] = 0.0
        _STATS.record(out[i], time.monotonic() - begin)

    if not slow:
        return out
    n = workers or default_workers()
    n = min(n, len(slow))
    ensure_workers(n)
    if n == 1:
        for item in slow:
            run(item)
    else:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="stapo-grade") as ex:
            list(ex.map(run, slow))
    return out

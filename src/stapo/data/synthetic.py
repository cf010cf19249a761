"""Offline synthetic arithmetic tasks with difficulty levels and a held-out split.

    synthetic_task(task, n, seed=0, split="train") -> list[dict]
    load_prompts("synthetic:add2?n=256&seed=0&split=heldout")

Tasks (difficulty level in brackets):

    add1     [1]  a + b, single digits                          100 problems
    chain3   [2]  a + b + c, single digits                      1,000
    add2     [3]  a + b or a - b, two digits (a - b >= 0)       16,200
    mul1     [4]  a * b, digits 2..9                            64
    mul2     [5]  a * b, two digits times one digit             720
    linear   [6]  solve a x + b = c for an integer x            6,888

Each task's problems are split once and for all by a hash of the problem text: about 20% are
``heldout``, the rest ``train``; the two never share a problem, whatever the seed. ``seed``
picks and orders the problems of a split; asking for more problems than a split has repeats
them (each pass reshuffled). Answers are strings, e.g. ``"-3"``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

__all__ = ["SPLITS", "SYNTHETIC_TASKS", "synthetic_from_spec", "synthetic_task", "task_for_difficulty"]

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 20


def _add1() -> Iterator[tuple[str, str]]:
    for a in range(10):
        for b in range(10):
            yield f"What is {a} + {b}?", str(a + b)


def _chain3() -> Iterator[tuple[str, str]]:
    for a in range(10):
        for b in range(10):
            for c in range(10):
                yield f"What is {a} + {b} + {c}?", str(a + b + c)


def _add2() -> Iterator[tuple[str, str]]:
    for a in range(10, 100):
        for b in range(10, 100):
            yield f"What is {a} + {b}?", str(a + b)
            if a >= b:
                yield f"What is {a} - {b}?", str(a - b)


def _mul1() -> Iterator[tuple[str, str]]:
    for a in range(2, 10):
        for b in range(2, 10):
            yield f"What is {a} * {b}?", str(a * b)


def _mul2() -> Iterator[tuple[str, str]]:
    for a in range(10, 100):
        for b in range(2, 10):
            yield f"What is {a} * {b}?", str(a * b)


def _linear() -> Iterator[tuple[str, str]]:
    for a in range(2, 10):
        for x in range(-10, 11):
            for b in range(-20, 21):
                c = a * x + b
                lhs = f"{a}x + {b}" if b >= 0 else f"{a}x - {-b}"
                yield f"Solve for x: {lhs} = {c}.", str(x)


# name -> (difficulty level, generator of every (problem, answer) of the task)
SYNTHETIC_TASKS: dict[str, tuple[int, Callable[[], Iterator[tuple[str, str]]]]] = {
    "add1": (1, _add1),
    "chain3": (2, _chain3),
    "add2": (3, _add2),
    "mul1": (4, _mul1),
    "mul2": (5, _mul2),
    "linear": (6, _linear),
}


def task_for_difficulty(level: int) -> str:
    """The task name of a difficulty level (1 = easiest)."""
    for name, (lvl, _) in SYNTHETIC_TASKS.items():
        if lvl == level:
            return name
    raise ValueError(f"no synthetic task has difficulty {level!r}; levels: 1..{len(SYNTHETIC_TASKS)}")


def _split_of(task: str, problem: str) -> str:
    h = int.from_bytes(hashlib.sha256(f"{task}\0{problem}".encode()).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


_CACHE: dict[tuple[str, str], list[tuple[str, str]]] = {}


def _split_pool(task: str, split: str) -> list[tuple[str, str]]:
    key = (task, split)
    if key not in _CACHE:
        _CACHE[key] = [pa for pa in SYNTHETIC_TASKS[task][1]() if _split_of(task, pa[0]) == split]
    return _CACHE[key]


def synthetic_task(task: str | int, n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """``n`` rows ``{"id", "problem", "answer", "meta"}`` of a synthetic task (a name or a
    difficulty level), deterministic in (task, n, seed, split)."""
    if isinstance(task, int) or (isinstance(task, str) and task.isdigit()):
        task = task_for_difficulty(int(task))
    if task not in SYNTHETIC_TASKS:
        raise ValueError(
            f"unknown synthetic task {task!r}; known: {', '.join(SYNTHETIC_TASKS)} "
            f"(or a difficulty level 1..{len(SYNTHETIC_TASKS)})"
        )
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    pool = _split_pool(task, split)
    rng = random.Random(f"{task}:{split}:{seed}")
    chosen: list[tuple[str, str]] = []
    while len(chosen) < n:
        order = pool[:]
        rng.shuffle(order)
        chosen.extend(order[: n - len(chosen)])
    level = SYNTHETIC_TASKS[task][0]
    return [
        {
            "id": f"synthetic-{task}-{split}-{seed}-{i}",
            "problem": p,
            "answer": a,
            "meta": {"task": task, "difficulty": level, "split": split, "seed": seed},
        }
        for i, (p, a) in enumerate(chosen)
    ]


def synthetic_from_spec(spec: str) -> list[dict[str, Any]]:
    """Rows for ``"synthetic:<task or level>?n=256&seed=0&split=train"`` (defaults as shown)."""
    body = spec.split(":", 1)[1] if spec.startswith("synthetic:") else spec
    task, _, query = body.partition("?")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(params) - {"n", "seed", "split"}
    if unknown:
        raise ValueError(f"{spec}: unknown parameter(s) {sorted(unknown)}; use n, seed, split")
    try:
        n = int(params.get("n", 256))
        seed = int(params.get("seed", 0))
    except ValueError:
        raise ValueError(f"{spec}: n and seed must be integers") from None
    try:
        return synthetic_task(task, n=n, seed=seed, split=params.get("split", "train"))
    except ValueError as err:  # name the spec the user wrote, e.g. a config's train_data
        raise ValueError(f"{spec}: {err}") from None

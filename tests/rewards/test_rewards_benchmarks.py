"""Acceptance over the six benchmark files: `\\boxed{gold}` scores 1.0 for every row, and wrong
answers score 0.0. The files come from the `benchmark_dir` fixture (never copied here)."""

from __future__ import annotations

import random

import pytest

from stapo.data import BENCHMARKS, load_benchmark
from stapo.rewards import grade_batch, grading_stats, normalize_gold, reset_grading_stats
from stapo.rewards.normalize import as_number

pytestmark = pytest.mark.usefixtures("benchmark_dir")  # STAPO_DATA_DIR: the six files


def _rows(name):
    return load_benchmark(name)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_boxed_gold_scores_one_for_every_row(name):
    rows = _rows(name)
    golds = [r["answer"] for r in rows]
    completions = [f"Reasoning... Therefore the answer is $\\boxed{{{g}}}$." for g in golds]
    reset_grading_stats()
    verdicts = grade_batch(completions, golds, timeout=10.0)
    failed = [(r["id"], r["answer"]) for r, v in zip(rows, verdicts) if v != 1.0]
    assert failed == []  # no exceptions needed: every row of every file passes
    s = grading_stats()
    assert s["timeouts"] == 0 and s["errors"] == 0


def _wrong_number(gold: str) -> str | None:
    g = normalize_gold(gold)
    value = as_number(g)
    if value is None:
        return None
    if value.denominator == 1 and not any(c in g for c in ".e\\"):
        return str(value.numerator + 1)  # an exact gold: off by one must fail
    return f"{float(value) * 1.5:.6g}"  # an approximate gold: off by 50% must fail


@pytest.mark.parametrize("name", BENCHMARKS)
def test_wrong_answers_score_zero(name):
    rows = _rows(name)
    golds = [r["answer"] for r in rows]
    completions, targets = [], []
    # every numeric gold, perturbed
    for g in golds:
        w = _wrong_number(g)
        if w is not None:
            completions.append(f"The answer is \\boxed{{{w}}}.")
            targets.append(g)
    # a sample of the non-numeric golds, answered with another row's (different) gold
    symbolic = [i for i, g in enumerate(golds) if _wrong_number(g) is None]
    rng = random.Random(name)
    for i in rng.sample(symbolic, min(12, len(symbolic))):
        others = [j for j in symbolic if normalize_gold(golds[j]) != normalize_gold(golds[i])]
        j = rng.choice(others)
        completions.append(f"The answer is \\boxed{{{golds[j]}}}.")
        targets.append(golds[i])
    assert len(completions) >= min(len(rows), 12)
    verdicts = grade_batch(completions, targets, timeout=10.0)
    wrongly_accepted = [(c, t) for c, t, v in zip(completions, targets, verdicts) if v != 0.0]
    assert wrongly_accepted == []


@pytest.mark.slow
def test_every_gold_self_verifies_in_math_verify():
    """Beyond the fast path: math-verify itself parses every non-numeric gold and accepts it
    against itself (so a differently written correct answer has a chance). ~50 s on 2 cores."""
    from concurrent.futures import ThreadPoolExecutor

    from stapo.rewards.sandbox import verify_in_worker

    golds = [normalize_gold(r["answer"]) for name in BENCHMARKS for r in _rows(name)]
    symbolic = [g for g in golds if as_number(g) is None]
    assert len(symbolic) > 400
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda g: verify_in_worker(g, g, 20.0), symbolic))
    failed = [(g, r) for g, r in zip(symbolic, results) if r != (1.0, "ok")]
    assert failed == []

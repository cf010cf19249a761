"""Evaluation metrics over k sampled completions per problem (pure Python, float64).

For one problem with n graded samples, c of them correct:

    avg@n   = c / n                                             (mean accuracy over the samples)
    pass@k  = 1 - C(n - c, k) / C(n, k)                         (unbiased estimator, Chen et al. 2021)
    maj@n   = 1[ the most frequent extracted answer is correct ]

A benchmark's score is the mean of the per-problem values; its standard error is the sample standard
deviation of the per-problem values over sqrt(#problems) (the spread *across problems*, the quantity
that decides whether two runs differ). The average over benchmarks is unweighted (each benchmark
counts once, whatever its size), and its standard error combines the benchmarks' as independent:
SE(avg) = sqrt(sum_b SE_b^2) / B.

Majority vote (maj@k): answers are grouped into equivalence classes and the largest class wins.
  - every sample the grader marked correct is in one class: each is equivalent to the gold answer, so
    (equivalence being transitive) to each other — this is "equivalence via the grader";
  - the remaining answers are grouped by `normalize_answer` (whitespace, `$`, `\\left`/`\\right`,
    `\\!`, a trailing period, leading zeros of integers); wrong answers that are equal but written
    differently (`0.5` vs `\\frac12`) therefore split their votes — grading every pair of wrong answers
    would cost O(k^2) grader calls per problem;
  - samples without an extracted answer do not vote; if nobody votes the problem scores 0;
  - ties go to the class whose first member has the lowest sample index (deterministic).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = [
    "aggregate_problems",
    "average_over_benchmarks",
    "avg_at_k",
    "maj_at_k",
    "mean_and_se",
    "normalize_answer",
    "pass_at_k",
    "pass_at_k_ladder",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (no huge binomials, exact for n = k).
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"pass_at_k: {name} must be an int, got {value!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_ladder(n: int) -> list[int]:
    """The k values reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def avg_at_k(verdicts: Sequence[bool]) -> float:
    """Mean accuracy over one problem's samples."""
    if len(verdicts) == 0:
        raise ValueError("avg_at_k: no samples")
    return sum(1.0 for v in verdicts if v) / len(verdicts)


_SPACES = re.compile(r"\s+")
_LEADING_ZEROS = re.compile(r"^(-?)0+(\d)")


def normalize_answer(answer: str) -> str:
    """A canonical string for grouping answers in the majority vote (never for grading)."""
    s = answer.strip()
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "$"):
        s = s.replace(token, "")
    s = _SPACES.sub("", s).rstrip(".")
    if s.lstrip("-").isdigit():
        s = _LEADING_ZEROS.sub(r"\1\2", s)
    return s


def maj_at_k(answers: Sequence[str | None], verdicts: Sequence[bool]) -> float:
    """1.0 if the majority answer class is correct, else 0.0 (see the module docstring)."""
    if len(answers) != len(verdicts):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(verdicts)} verdicts")
    classes: dict[object, list[int]] = {}  # key -> [count, first index]; insertion order = first seen
    correct_key = object()
    for i, (answer, ok) in enumerate(zip(answers, verdicts)):
        if ok:
            key = correct_key
        elif answer is None or not str(answer).strip():
            continue
        else:
            key = normalize_answer(str(answer))
        entry = classes.setdefault(key, [0, i])
        entry[0] += 1
    if not classes:
        return 0.0
    winner = max(classes.items(), key=lambda kv: (kv[1][0], -kv[1][1]))[0]
    return 1.0 if winner is correct_key else 0.0


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (ddof = 1; 0.0 for fewer than two values)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate_problems(problems: Sequence[tuple[Sequence[str | None], Sequence[bool]]]) -> dict:
    """Benchmark metrics from per-problem (extracted answers, verdicts), all with the same n samples.

    Returns {"n_problems", "k", "avg@k", "avg@k_se", "maj@k", "maj@k_se", "pass@k" (at k = n),
    "pass@k_se", "pass@j" for j in pass_at_k_ladder(n)} with accuracies as fractions in [0, 1].
    """
    if not problems:
        raise ValueError("aggregate_problems: no problems")
    ns = {len(v) for _, v in problems}
    if len(ns) != 1:
        raise ValueError(f"aggregate_problems: problems have different sample counts {sorted(ns)}")
    n = ns.pop()
    avg = [avg_at_k(v) for _, v in problems]
    maj = [maj_at_k(a, v) for a, v in problems]
    counts = [sum(1 for x in v if x) for _, v in problems]
    out: dict = {"n_problems": len(problems), "k": n}
    out["avg@k"], out["avg@k_se"] = mean_and_se(avg)
    out["maj@k"], out["maj@k_se"] = mean_and_se(maj)
    out["pass@k"], out["pass@k_se"] = mean_and_se([pass_at_k(n, c, n) for c in counts])
    out["pass@j"] = {str(j): mean_and_se([pass_at_k(n, c, j) for c in counts])[0] for j in pass_at_k_ladder(n)}
    return out


def average_over_benchmarks(per_benchmark: dict[str, dict], metrics=("avg@k", "pass@k", "maj@k")) -> dict:
    """Unweighted mean over benchmarks of each metric, SE = sqrt(sum SE_b^2) / B."""
    if not per_benchmark:
        raise ValueError("average_over_benchmarks: no benchmarks")
    b = len(per_benchmark)
    out: dict = {"benchmarks": list(per_benchmark)}
    for m in metrics:
        out[m] = math.fsum(r[m] for r in per_benchmark.values()) / b
        out[f"{m}_se"] = math.sqrt(math.fsum(r[f"{m}_se"] ** 2 for r in per_benchmark.values())) / b
    return out

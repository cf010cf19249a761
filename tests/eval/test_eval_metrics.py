"""avg@k, pass@k (vs brute-force enumeration), maj@k and aggregation on hand-worked cases."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from stapo.eval.metrics import (
    aggregate_problems,
    average_over_benchmarks,
    avg_at_k,
    maj_at_k,
    mean_and_se,
    normalize_answer,
    pass_at_k,
    pass_at_k_ladder,
)


def brute_force_pass_at_k(verdicts: list[bool], k: int) -> float:
    """Fraction of all size-k subsets of the samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(range(len(verdicts)), k))
    return sum(any(verdicts[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        verdicts = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(verdicts, k), abs=1e-12), (n, c, k)


def test_pass_at_k_hand_cases_and_large_n():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    # n = 32 (the AIME protocol) against exact binomials
    for c in (0, 1, 5, 31):
        for k in (1, 8, 32):
            exact = 1 - math.comb(32 - c, k) / math.comb(32, k)
            assert pass_at_k(32, c, k) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("bad", [(0, 0, 1), (4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1), (4.0, 1, 1)])
def test_pass_at_k_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(*bad)


def test_ladder():
    assert pass_at_k_ladder(1) == [1]
    assert pass_at_k_ladder(4) == [1, 2, 4]
    assert pass_at_k_ladder(32) == [1, 2, 4, 8, 16, 32]
    assert pass_at_k_ladder(6) == [1, 2, 4, 6]


def test_avg_at_k():
    assert avg_at_k([True, False, False, True]) == 0.5
    assert avg_at_k([False] * 3) == 0.0
    with pytest.raises(ValueError):
        avg_at_k([])


def test_maj_at_k_hand_cases():
    # the two correct samples (written differently) form one class and beat the single "7"s
    assert maj_at_k(["1/2", "0.5", "7", "8"], [True, True, False, False]) == 1.0
    # the wrong answer 7 appears three times (modulo $, spaces) against two correct ones
    assert maj_at_k(["7", "$7$", " 7 ", "1/2", "0.5"], [False, False, False, True, True]) == 0.0
    # leading zeros are the same integer
    assert maj_at_k(["025", "25", "3"], [False, False, True]) == 0.0
    # tie 2-2: the class whose first member comes first wins
    assert maj_at_k(["3", "x", "3", "x"], [False, True, False, True]) == 0.0
    assert maj_at_k(["x", "3", "x", "3"], [True, False, True, False]) == 1.0
    # samples without an answer don't vote
    assert maj_at_k([None, None, None, "5"], [False, False, False, True]) == 1.0
    assert maj_at_k([None, ""], [False, False]) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False])


def test_normalize_answer():
    assert normalize_answer(" $\\left( 3, \\frac{\\pi}{2} \\right)$ ") == "(3,\\frac{\\pi}{2})"
    assert normalize_answer("007") == "7"
    assert normalize_answer("-0012.") == "-12"
    assert normalize_answer("10,\\!080") == "10,080"


def test_mean_and_se_float64_reference():
    rng = random.Random(0)
    xs = [rng.random() for _ in range(50)]
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    assert mean_and_se(xs) == pytest.approx((m, sd / len(xs) ** 0.5), rel=1e-12)
    assert mean_and_se([0.3]) == (0.3, 0.0)


def test_aggregate_problems_hand_worked():
    # 3 problems x 4 samples: 2/4, 0/4, 4/4 correct
    problems = [
        (["1", "2", "1", "1"], [True, False, True, False]),  # majority "1"? no: correct class (2) vs "1"(1),"2"(1)
        (["5", "5", None, "6"], [False, False, False, False]),
        (["9", "9", "9", "9"], [True] * 4),
    ]
    out = aggregate_problems(problems)
    assert out["n_problems"] == 3 and out["k"] == 4
    assert out["avg@k"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert out["avg@k_se"] == pytest.approx(0.5 / math.sqrt(3))  # sd of (0.5, 0, 1) = 0.5
    assert out["maj@k"] == pytest.approx(2 / 3)
    assert out["pass@k"] == pytest.approx(2 / 3)
    assert out["pass@j"]["1"] == pytest.approx(out["avg@k"])
    # pass@2 per problem: 1 - C(2,2)/C(4,2) = 5/6, 0, 1
    assert out["pass@j"]["2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="different sample counts"):
        aggregate_problems([(["1"], [True]), (["1", "2"], [True, False])])


def test_average_over_benchmarks_unweighted():
    per = {
        "a": {"avg@k": 0.2, "avg@k_se": 0.03, "pass@k": 0.5, "pass@k_se": 0.0, "maj@k": 0.1, "maj@k_se": 0.04},
        "b": {"avg@k": 0.6, "avg@k_se": 0.04, "pass@k": 0.7, "pass@k_se": 0.0, "maj@k": 0.3, "maj@k_se": 0.03},
    }
    out = average_over_benchmarks(per)
    assert out["avg@k"] == pytest.approx(0.4)
    assert out["avg@k_se"] == pytest.approx(0.05 / 2)  # sqrt(0.03^2 + 0.04^2) / 2
    assert out["maj@k"] == pytest.approx(0.2)
    assert out["benchmarks"] == ["a", "b"]

"""Grading under fuzz: >= 10,000 adversarial completions (hand-written nasties + generated
mixtures + hypothesis), graded in the main thread, in worker threads and in a process pool.

Every item must return 0.0 or 1.0 within its time bound; no hangs, no crashes (no exception, no
grading error), and no execution: injection payloads name files in a fresh directory, which must
stay empty. Times on 2 cores: main thread ~30 s, threads ~25 s, process pool ~40 s,
hypothesis ~25 s (all marked slow; ~2 min together).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stapo.rewards import grade_batch, grading_stats, math_reward, reset_grading_stats, warmup
from stapo.rewards.corpus import GOLDS, adversarial_corpus, injection_payloads, nasty_answers

N_ITEMS = 10_000
TIMEOUT = 1.0
# The bound each item must meet: 1.5 x its timeout (the documented worst case when it has to
# wait for a worker) plus slack for extracting megabyte strings on a loaded 2-core machine.
# A hang (no return) fails it by far.
BOUND = TIMEOUT * 1.5 + 2.0


@pytest.fixture(scope="module")
def marker_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def corpus(marker_dir):
    items = adversarial_corpus(N_ITEMS, seed=0, marker_dir=str(marker_dir))
    assert len(items) >= N_ITEMS
    assert sum("PWNED_" in c for c, _ in items) > 300  # payloads are really in there
    return items


def _grade_timed(item):
    completion, gold = item
    start = time.monotonic()
    verdict = math_reward(completion, gold, timeout=TIMEOUT)
    return verdict, time.monotonic() - start


def _check(results, marker_dir, stats):
    verdicts = [v for v, _ in results]
    latencies = [t for _, t in results]
    assert set(verdicts) <= {0.0, 1.0}
    worst = max(latencies)
    assert worst < BOUND, f"worst-case latency {worst:.2f} s"
    assert stats["errors"] == 0
    assert os.listdir(marker_dir) == []
    return worst


@pytest.mark.slow
def test_fuzz_main_thread(corpus, marker_dir):
    warmup(1)
    reset_grading_stats()
    start = time.monotonic()
    results = [_grade_timed(item) for item in corpus]
    elapsed = time.monotonic() - start
    stats = grading_stats()
    worst = _check(results, marker_dir, stats)
    assert stats["graded"] == len(corpus)
    assert stats["rejected"] > 100 and stats["worker_calls"] > 500  # both bounded paths were used
    print(f"\nmain thread: {len(corpus)} items in {elapsed:.1f} s ({len(corpus) / elapsed:.0f}/s), "
          f"worst {worst:.2f} s, {stats}")


@pytest.mark.slow
def test_fuzz_worker_threads(corpus, marker_dir):
    warmup(4)
    reset_grading_stats()
    with ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(_grade_timed, corpus))
    stats = grading_stats()
    _check(results, marker_dir, stats)
    assert stats["graded"] == len(corpus)


def _pool_chunk(chunk):
    """In a pool process: grade_batch on half the chunk, math_reward per item on the rest."""
    from stapo.rewards import grade_batch as gb
    from stapo.rewards import grading_stats as gs
    from stapo.rewards import reset_grading_stats as rs
    from stapo.rewards import warmup as wu

    wu(1)
    rs()
    half = len(chunk) // 2
    start = time.monotonic()
    batch = gb([c for c, _ in chunk[:half]], [g for _, g in chunk[:half]], timeout=TIMEOUT, workers=1)
    single = [_grade_timed(item) for item in chunk[half:]]
    return batch, single, gs(), time.monotonic() - start


@pytest.mark.slow
def test_fuzz_process_pool(corpus, marker_dir):
    chunks = [corpus[i::2] for i in range(2)]
    with mp.get_context("spawn").Pool(2) as pool:
        outs = pool.map(_pool_chunk, chunks)
    results, errors, graded = [], 0, 0
    for batch, single, stats, _ in outs:
        assert set(batch) <= {0.0, 1.0}
        assert stats["max_latency_s"] < BOUND
        results.extend(single)
        errors += stats["errors"]
        graded += stats["graded"]
    assert graded == len(corpus)
    _check(results, marker_dir, {"errors": errors})


def test_fuzz_grade_batch_pool_sample(corpus, marker_dir):
    """Fast variant for every run: the nasties and payloads through grade_batch's worker pool."""
    head = corpus[: 2 * (len(nasty_answers()) + len(injection_payloads("x"))) + 6]
    reset_grading_stats()
    verdicts = grade_batch([c for c, _ in head], [g for _, g in head], timeout=TIMEOUT, workers=2)
    stats = grading_stats()
    assert set(verdicts) <= {0.0, 1.0}
    assert stats["max_latency_s"] < BOUND and stats["errors"] == 0
    assert os.listdir(marker_dir) == []


# ---------------------------------------------------------------- hypothesis

_FRAGMENTS = nasty_answers()[:60] + ["\\boxed{", "}", "{", "\\fbox{", "$", "\\frac{", "^", "!", "\\sqrt{",
                                     "Answer:", "final answer is", "\x00", "５", "𝟓", "х", "\\left(", "\\right)"]


@st.composite
def completions(draw):
    parts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(_FRAGMENTS),
                st.text(max_size=20),
                st.integers(-(10**30), 10**30).map(str),
                st.from_regex(r"\\boxed\{[-0-9./^{}a-z\\]{0,20}\}", fullmatch=True),
            ),
            max_size=12,
        )
    )
    return "".join(parts)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(completion=completions(), gold=st.sampled_from(GOLDS))
def test_fuzz_hypothesis(completion, gold):
    start = time.monotonic()
    verdict = math_reward(completion, gold, timeout=TIMEOUT)
    assert verdict in (0.0, 1.0)
    assert time.monotonic() - start < BOUND

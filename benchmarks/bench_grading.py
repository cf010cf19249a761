"""Grading throughput (answers/s) and worst-case latency, serial vs worker pool, timeouts on.

    python benchmarks/bench_grading.py            # ~3 min on 2 cores
    python benchmarks/bench_grading.py --quick    # ~1 min

Three loads, each graded (a) serially with math_reward in the main thread, (b) with grade_batch
and one worker process, (c) with grade_batch and one worker per core:

    realistic   completions answering MATH-500 / OlympiadBench / Minerva golds (a paragraph of
                reasoning, then \\boxed{answer}): half correct as written, half another row's
                gold (so symbolic items reach sympy); the benchmark files from
                STAPO_DATA_DIR, else synthetic tasks (the table's heading says which)
    integer     DAPO-like: integer golds, right or wrong integer answers (the fast path)
    adversarial stapo.rewards.corpus.adversarial_corpus (towers, huge factorials, 1 MB strings,
                injection payloads, ...), the fuzz suite's load

Prints a markdown table: answers/s, speed-up over serial, worst item latency, timeouts.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from functools import partial

os.environ.setdefault("OMP_NUM_THREADS", "1")

from stapo.data import load_benchmark, synthetic_task
from stapo.data.loaders import DataError
from stapo.rewards import (
    grade_batch,
    grading_stats,
    math_reward,
    reset_grading_stats,
    shutdown_workers,
    warmup,
)
from stapo.rewards.corpus import adversarial_corpus
from stapo.rewards.sandbox import cpu_count

REASONING = (
    "Let us work through the problem step by step. First we set up the equations from the "
    "statement, then simplify: $2x + 3 = 11$ gives $x = 4$, and substituting back we check the "
    "constraint holds. Next we consider the cases $n$ even and $n$ odd separately; in both "
    "cases the bound is attained, so the extremal value follows. "
)


def realistic_golds(seed: int = 0) -> tuple[list[str], str]:
    """The golds of the realistic load, and where they came from."""
    try:
        golds = [r["answer"] for name in ("math500", "olympiadbench", "minerva")
                 for r in load_benchmark(name) if r["ungradable"] is None]
        return golds, "MATH-500 / OlympiadBench / Minerva"
    except DataError:
        return ([r["answer"] for r in synthetic_task("linear", 500, seed=seed)],
                "synthetic:linear (no benchmark files: set STAPO_DATA_DIR)")


def realistic(n: int, golds: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    comps, gs = [], []
    for _ in range(n):
        g = rng.choice(golds)
        a = g if rng.random() < 0.5 else rng.choice(golds)
        comps.append(REASONING * rng.randint(1, 4) + f"Therefore the answer is $\\boxed{{{a}}}$.")
        gs.append(g)
    return comps, gs


def integer_load(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    comps, gs = [], []
    for _ in range(n):
        g = rng.randint(0, 999)
        a = g if rng.random() < 0.3 else rng.randint(0, 999)
        style = rng.random()
        if style < 0.7:
            comps.append(REASONING + f"The answer is $\\boxed{{{a}}}$.")
        elif style < 0.9:
            comps.append(REASONING + f"Answer: {a}")
        else:
            comps.append(REASONING + f"so we get {a}")
        gs.append(str(g))
    return comps, gs


def run_serial(comps, golds, timeout):
    reset_grading_stats()
    worst = 0.0
    start = time.monotonic()
    for c, g in zip(comps, golds):
        t = time.monotonic()
        math_reward(c, g, timeout=timeout)
        worst = max(worst, time.monotonic() - t)
    return time.monotonic() - start, worst, grading_stats()


def run_batch(comps, golds, timeout, workers):
    reset_grading_stats()
    start = time.monotonic()
    grade_batch(comps, golds, timeout=timeout, workers=workers)
    elapsed = time.monotonic() - start
    stats = grading_stats()
    return elapsed, stats["max_latency_s"], stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller loads")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-item timeout for realistic loads")
    ap.add_argument("--fuzz-timeout", type=float, default=1.0, help="per-item timeout for the adversarial load")
    ap.add_argument("--loads", default="realistic,integer,adversarial", help="comma-separated subset")
    args = ap.parse_args(argv)
    cores = cpu_count()  # affinity-aware: `taskset -c 0,1` measures 2 cores on a bigger machine
    n_real = 400 if args.quick else 1500
    n_int = 2000 if args.quick else 10000
    n_adv = 2000 if args.quick else 10000
    real_golds, golds_source = realistic_golds()
    loads = [
        ("realistic", *realistic(n_real, real_golds), args.timeout),
        ("integer", *integer_load(n_int), args.timeout),
        ("adversarial", *zip(*adversarial_corpus(n_adv)), args.fuzz_timeout),
    ]
    wanted = set(args.loads.split(","))
    loads = [load for load in loads if load[0] in wanted]
    warmup(cores)
    print(f"# Grading throughput ({cores} cores, python {sys.version.split()[0]}; realistic golds: "
          f"{golds_source})\n")
    print("| load | items | mode | answers/s | vs serial | worst item (s) | sent to sympy | timeouts | rejected |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, comps, golds, timeout in loads:
        comps, golds = list(comps), list(golds)
        base = None
        for mode, fn in (  # each mode starts from fresh workers (cold gold caches), same conditions
            ("serial (math_reward)", partial(run_serial, comps, golds, timeout)),
            ("grade_batch, 1 worker", partial(run_batch, comps, golds, timeout, 1)),
            (f"grade_batch, {cores} workers", partial(run_batch, comps, golds, timeout, cores)),
        ):
            shutdown_workers()
            warmup(cores)
            elapsed, worst, s = fn()
            rate = len(comps) / elapsed
            base = base or rate
            print(
                f"| {name} (timeout {timeout:g} s) | {len(comps)} | {mode} | {rate:,.0f} | "
                f"{rate / base:.2f}x | {worst:.2f} | {s['worker_calls']} | {s['timeouts']} | {s['rejected']} |"
            )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

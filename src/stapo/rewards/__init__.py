"""Math answer grading that is safe on untrusted model output and bounded in time.

    extract_answer(completion, mode="auto") -> str | None   the final answer text
    math_reward(completion, gold, timeout=5.0) -> float     1.0 / 0.0, from any thread or process
    grade_batch(completions, golds, timeout, workers)       many at once, in worker processes
    normalize_gold(gold)                                    the gold as the grader reads it
    grading_stats() / reset_grading_stats()                 timeouts, parse failures, ...
    trl_reward_fn(answer_key="answer") / compute_score(...)  TRL / verl reward-function shapes
    warmup(n=None, wait=True)                                start the grading workers before answers are due

See docs/rewards.md for the extraction order, the fast path and the safety design.
"""

from stapo.rewards.adapters import completion_text, compute_score, trl_reward_fn
from stapo.rewards.extract import EXTRACTION_MODES, all_boxed, extract_answer, last_boxed
from stapo.rewards.grader import (
    grade_answer,
    grade_batch,
    grading_stats,
    math_reward,
    reset_grading_stats,
)
from stapo.rewards.normalize import fast_verdict, normalize_gold, pathological_reason
from stapo.rewards.sandbox import WorkerError, shutdown_workers, warmup

__all__ = [
    "EXTRACTION_MODES",
    "WorkerError",
    "all_boxed",
    "completion_text",
    "compute_score",
    "extract_answer",
    "fast_verdict",
    "grade_answer",
    "grade_batch",
    "grading_stats",
    "last_boxed",
    "math_reward",
    "normalize_gold",
    "pathological_reason",
    "reset_grading_stats",
    "shutdown_workers",
    "trl_reward_fn",
    "warmup",
]

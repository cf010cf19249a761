"""The grader in the shapes TRL and verl call reward functions (no trl / verl import needed).

    trl_reward_fn(answer_key="answer", timeout=5.0, require_boxed=False)
        -> reward_func(prompts, completions, **columns) -> list[float]      # GRPOTrainer(reward_funcs=[...])
    compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float   # verl: pkg://stapo.rewards
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stapo.rewards.grader import completion_text, grade_batch, grading_stats, math_reward
from stapo.rewards.sandbox import warmup

__all__ = ["completion_text", "compute_score", "trl_reward_fn"]


def trl_reward_fn(answer_key: str = "answer", timeout: float = 5.0, require_boxed: bool = False,
                  workers: int | None = None) -> Callable[..., list[float]]:
    """A reward function for TRL's ``GRPOTrainer``: TRL passes the dataset's other columns as
    keyword arguments, so the gold answers arrive as ``kwargs[answer_key]``. When TRL passes
    ``log_metric`` (TRL >= 1.x), the batch's timeout / parse-failure / no-answer / refused
    fractions are logged as ``grading/<name>_frac``. (Counts are per process, so concurrent
    graders in one process share them.) The grading workers start here, before the first answer
    is due, so every answer is graded within about ``timeout`` (:func:`stapo.rewards.warmup`)."""
    warmup(workers)

    def math_accuracy(prompts: Any = None, completions: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
        if completions is None:
            raise ValueError("math_accuracy: TRL passed no completions")
        if answer_key not in kwargs:
            raise ValueError(
                f"math_accuracy: no {answer_key!r} column in the dataset (columns: {sorted(kwargs)}); "
                "pass answer_key= to trl_reward_fn"
            )
        texts = [completion_text(c, f"completions[{i}]") for i, c in enumerate(completions)]
        before = grading_stats()
        scores = grade_batch(texts, list(kwargs[answer_key]), timeout=timeout, workers=workers,
                             require_boxed=require_boxed)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and texts:
            # TRL averages these per logging step: the share of this batch that timed out, failed
            # to parse, had no answer, or was refused as pathological
            after = grading_stats()
            for name in ("timeouts", "parse_failures", "no_answer", "rejected", "busy"):
                log_metric(f"grading/{name}_frac", (after[name] - before[name]) / len(texts))
        return scores

    math_accuracy.__name__ = "math_accuracy"  # TRL logs rewards under the function's name
    return math_accuracy


def compute_score(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = "",
    extra_info: Any = None,
    timeout: float = 5.0,
    require_boxed: bool = False,
    **_: Any,
) -> float:
    """verl's custom reward function: 1.0 / 0.0 for one decoded response against its gold answer.

        reward.custom_reward_function.path=pkg://stapo.rewards
        reward.custom_reward_function.name=compute_score

    verl's reward managers call it per response with `data_source`, `solution_str`, `ground_truth`,
    `extra_info` (and accept a float or a dict with "score"). `timeout` (seconds) and `require_boxed`
    come from the config's `reward_kwargs`; a row's `extra_info` may override them. `ground_truth`
    is a string or a list of accepted gold strings (the best match counts). Grading is
    `stapo.rewards.math_reward`: safe on untrusted text and bounded in time.
    """
    if not isinstance(solution_str, str):
        raise ValueError(f"solution_str must be a string, got {type(solution_str).__name__}")
    golds = [str(g) for g in ground_truth] if isinstance(ground_truth, (list, tuple)) else [str(ground_truth)]
    if not any(g.strip() for g in golds):
        raise ValueError(f"empty ground_truth for data_source={data_source!r}")
    info = extra_info if isinstance(extra_info, dict) else {}
    timeout = float(info.get("timeout", timeout))
    require_boxed = bool(info.get("require_boxed", require_boxed))
    return max(math_reward(solution_str, g, timeout=timeout, require_boxed=require_boxed) for g in golds if g.strip())

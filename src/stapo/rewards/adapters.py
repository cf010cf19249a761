"""The grader in the shapes TRL and verl call reward functions (no trl / verl import needed).

    trl_reward_fn(answer_key="answer", timeout=5.0, require_boxed=False)
        -> reward_func(prompts, completions, **columns) -> list[float]      # GRPOTrainer(reward_funcs=[...])
    compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float   # verl custom_reward_function
"""

from __future__ import annotations

from typing import Any

from stapo.rewards.grader import completion_text, grade_batch, grading_stats, math_reward

__all__ = ["completion_text", "compute_score", "trl_reward_fn"]


def trl_reward_fn(answer_key: str = "answer", timeout: float = 5.0, require_boxed: bool = False, workers: int | None = None):
    """A reward function for TRL's ``GRPOTrainer``: TRL passes the dataset's other columns as
    keyword arguments, so the gold answers arrive as ``kwargs[answer_key]``. When TRL passes
    ``log_metric`` (TRL >= 1.x), the batch's timeout / parse-failure / no-answer / refused
    fractions are logged as ``grading/<name>_frac``. (Counts are per process, so concurrent
    graders in one process share them.)"""

    def math_accuracy(prompts=None, completions=None, **kwargs) -> list[float]:
        if completions is None:
            raise ValueError("math_accuracy: TRL passed no completions")
        if answer_key not in kwargs:
            raise ValueError(
                f"math_accuracy: no {answer_key!r} column in the dataset (columns: {sorted(kwargs)}); "
                "pass answer_key= to trl_reward_fn"
            )
        texts = [completion_text(c, f"completions[{i}]") for i, c in enumerate(completions)]
        before = grading_stats()
        scores = grade_batch(texts, list(kwargs[answer_key]), timeout=timeout, workers=workers, require_boxed=require_boxed)
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


def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any) -> float:
    """verl's ``custom_reward_function`` signature: 1.0 / 0.0 for one response.

    ``extra_info`` may carry ``{"timeout": s, "require_boxed": bool}``. ``ground_truth`` may be a
    string or a one-element list (verl datasets store ``reward_model.ground_truth``).
    """
    info = extra_info if isinstance(extra_info, dict) else {}
    if isinstance(ground_truth, (list, tuple)) and len(ground_truth) == 1:
        ground_truth = ground_truth[0]
    return math_reward(
        solution_str if isinstance(solution_str, str) else "",
        ground_truth,
        timeout=float(info.get("timeout", 5.0)),
        require_boxed=bool(info.get("require_boxed", False)),
    )

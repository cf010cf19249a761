"""The math reward as verl's custom reward function.

    reward.custom_reward_function.path=pkg://stapo.verl.reward
    reward.custom_reward_function.name=compute_score

verl's reward managers call `compute_score(data_source=, solution_str=, ground_truth=,
extra_info=)` per response; this grades with `stapo.rewards.math_reward` (safe, bounded in
time, never executes model output). Extra keyword arguments of the config's
`reward_kwargs` are accepted: `timeout` (seconds, default 5.0) and `require_boxed` (default False).
"""

from __future__ import annotations

from stapo.rewards import math_reward


def compute_score(
    data_source: str | None = None,
    solution_str: str = "",
    ground_truth: str = "",
    extra_info: dict | None = None,
    timeout: float = 5.0,
    require_boxed: bool = False,
    **_: object,
) -> dict:
    """{"score": 1.0 | 0.0, "acc": same} for one decoded response against its gold answer."""
    if not isinstance(solution_str, str):
        raise ValueError(f"solution_str must be a string, got {type(solution_str).__name__}")
    gold = ground_truth
    if isinstance(gold, (list, tuple)):  # some datasets store one or several gold strings
        golds = [str(g) for g in gold]
    else:
        golds = [str(gold)]
    if not any(g.strip() for g in golds):
        raise ValueError(f"empty ground_truth for data_source={data_source!r}")
    score = max(math_reward(solution_str, g, timeout=timeout, require_boxed=require_boxed) for g in golds)
    return {"score": float(score), "acc": float(score)}

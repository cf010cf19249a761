"""Prompt sources, benchmark loaders, prompt formats and offline synthetic tasks.

    load_prompts(source, problem_key="problem", answer_key="answer", ...) -> list[dict]
    load_benchmark(name, data_dir=None) -> list[dict]
    format_prompt(problem, tokenizer=None, template="boxed", system_prompt=None)
    synthetic_task(task, n, seed=0, split="train") -> list[dict]
    prompt_token_limit / long_prompts: prompt lengths against the model's context

See docs/data.md.
"""

from stapo.data.lengths import check_eval_prompts, fit_training_prompts, long_prompts, prompt_token_limit
from stapo.data.loaders import (
    BENCHMARK_HUB_IDS,
    BENCHMARKS,
    DataError,
    PromptRows,
    find_benchmark_dir,
    load_benchmark,
    load_prompts,
    ungradable_reason,
)
from stapo.data.prompts import PROMPT_TEMPLATES, build_messages, format_prompt, render_instruction
from stapo.data.synthetic import SPLITS, SYNTHETIC_TASKS, synthetic_task, task_for_difficulty

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_HUB_IDS",
    "PROMPT_TEMPLATES",
    "SPLITS",
    "SYNTHETIC_TASKS",
    "DataError",
    "PromptRows",
    "build_messages",
    "check_eval_prompts",
    "fit_training_prompts",
    "find_benchmark_dir",
    "format_prompt",
    "load_benchmark",
    "load_prompts",
    "long_prompts",
    "prompt_token_limit",
    "render_instruction",
    "synthetic_task",
    "task_for_difficulty",
    "ungradable_reason",
]

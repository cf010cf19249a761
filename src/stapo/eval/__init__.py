"""Evaluation on the paper's six math benchmarks: generation backends, metrics, reports.

    evaluate(EvalConfig(...))       generate (resumably), grade, write results.{json,md}, samples.jsonl
    HFBackend / VLLMBackend         one interface: generate(list[SampleRequest]) -> list[Completion]
    pass_at_k, avg_at_k, maj_at_k   per-problem metrics; aggregate_problems per benchmark
    run_table / compare_table       the markdown tables (one run; several runs side by side)

Heavy dependencies (torch, transformers, vllm) are imported inside the functions that need them.
"""

from stapo.eval.backends import Completion, HFBackend, SampleRequest, SeededSampler, VLLMBackend, vllm_requests
from stapo.eval.metrics import (
    aggregate_problems,
    average_over_benchmarks,
    avg_at_k,
    maj_at_k,
    mean_and_se,
    pass_at_k,
)
from stapo.eval.protocol import BENCHMARKS, DEFAULT_SAMPLES, SETTINGS, sample_seed
from stapo.eval.report import compare_table, load_results, run_table
from stapo.eval.runner import EvalConfig, EvalError, evaluate
from stapo.eval.store import SampleLog

__all__ = [
    "BENCHMARKS",
    "DEFAULT_SAMPLES",
    "SETTINGS",
    "Completion",
    "EvalConfig",
    "EvalError",
    "HFBackend",
    "SampleLog",
    "SampleRequest",
    "SeededSampler",
    "VLLMBackend",
    "aggregate_problems",
    "average_over_benchmarks",
    "avg_at_k",
    "compare_table",
    "evaluate",
    "load_results",
    "maj_at_k",
    "mean_and_se",
    "pass_at_k",
    "run_table",
    "sample_seed",
    "vllm_requests",
]
